"""colm.viz without Gradio: hand-built traces in, figures and records out."""
import json
import re
import sys

import pytest

from colm import stats, viz
from colm.decode import Step, Trace


def step(pos, text, source, p, tid=None, expert=True):
    tid = 100 + pos if tid is None else tid
    base = [(tid, text, 0.6), (7, " the", 0.25), (8, "<b>", 0.1)]
    exp = [(tid, text, 0.9), (9, "\n", 0.05)] if expert else None
    return Step(pos, tid, text, source, p, base, exp)


def make_trace(policy=None):
    steps = [step(0, "Hello", "base", 0.1), step(1, " world", "expert", 0.8), step(2, "\n", "expert", 0.7),
             step(3, "\tx = 1", "base", 0.45), step(4, "  ", "base", 0.2, expert=False),
             step(5, "", "expert", 0.9, tid=2)]  # an end token: no display text
    return Trace("Say hi", [1, 2, 3], policy or {"name": "colm", "threshold": 0.5}, steps, expert_calls=3,
                 decode_seconds=2.0, stop_reason="eos", base_model="tiny-base", expert_model="tiny-expert",
                 head="random-test-head", head_trained=True)


# ----------------------------------------------------------------------------------------------- display_token
@pytest.mark.parametrize("text, faithful, visible", [
    ("abc", "abc", "abc"),
    (" a b", " a b", "·a·b"),
    ("x\ny", "x\ny", "x⏎y"),
    ("\t", "\t", "\\t"),
    ("\x07", "\\x07", "\\x07"),
    ("\r", "\\x0d", "\\x0d"),
    ("\x00", "\\x00", "\\x00"),
    ("\x9b", "\\x9b", "\\x9b"),                # C1 control
    ("\u202e", "\\u202e", "\\u202e"),          # right-to-left override would reverse the page
    ("\ud800", "\\ud800", "\\ud800"),          # lone surrogate
    ("\u200b", "\u200b", "\\u200b"),           # zero-width space: invisible, so escaped on hover only
    ("👩\u200d💻", "👩\u200d💻", "👩\u200d💻"),    # the ZWJ in an emoji sequence is part of the glyph
    ("日本語 é", "日本語 é", "日本語·é"),
    ("\U000e0001", "\U000e0001", "\\U000e0001"),
    ("", "", ""),
])
def test_display_token(text, faithful, visible):
    assert viz.display_token(text) == faithful
    assert viz.display_token(text, visible=True) == visible
    viz.display_token(text).encode("utf-8")  # always encodable


def test_display_token_odd_inputs():
    assert viz.display_token(None) == ""
    assert viz.display_token(12) == "12"


# ----------------------------------------------------------------------------------------------- flips
@pytest.mark.parametrize("threshold, want", [
    (0.5, []),                 # the trace's own threshold: nothing changes
    (0.4, [3]),                # 0.45 now defers
    (0.75, [2]),               # 0.7 no longer defers
    (0.05, [0, 3, 4]),
    (0.95, [1, 2, 5]),
])
def test_flips(threshold, want):
    assert viz.flips(make_trace(), threshold) == want


def test_flips_skip_forced_positions():
    tr = make_trace()
    tr.steps[3].forced = True                  # a what-if put the base there: no threshold moves it
    assert viz.flips(tr, 0.4) == []


def test_flips_skip_positions_without_head():
    tr = make_trace()
    tr.steps[0].p_defer = float("nan")
    assert 0 not in viz.flips(tr, 0.0)


# ----------------------------------------------------------------------------------------------- palette, numbers
def test_one_palette_of_named_distinct_colours():
    hexes = [c.hex.upper() for c in viz.PALETTE.values()]
    assert len(set(hexes)) == len(hexes) and all(re.fullmatch(r"#[0-9A-F]{6}", h) for h in hexes)
    names = [c.name for c in viz.PALETTE.values()]
    assert len(set(names)) == len(names)
    # Okabe-Ito: the colour-blind-safe set every page colour is taken from
    okabe_ito = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"}
    assert set(hexes) - {viz.PALETTE["threshold"].hex} <= okabe_ito
    assert (viz.BASE_COLOR, viz.EXPERT_COLOR, viz.FLIP_COLOR) == tuple(viz.PALETTE[k].hex for k in ("base", "expert", "flip"))


@pytest.mark.parametrize("x, shown", [(0.1446664, "0.145"), (0.5, "0.5"), (0.05, "0.05"), (1.0, "1"), (0.0, "0"),
                                      (0.30000000000000004, "0.3"), (0.995, "0.995"), ("x", "x"),
                                      (float("nan"), "nan")])
def test_fmt_threshold_keeps_two_or_three_significant_digits(x, shown):
    assert viz.fmt_threshold(x) == shown


def test_figures_are_theme_neutral():
    for fig in (viz.curve_figure(RESULTS),):
        assert fig.layout.paper_bgcolor == fig.layout.plot_bgcolor == "rgba(0,0,0,0)"
        assert fig.layout.font.color == viz.INK


# ----------------------------------------------------------------------------------------------- curve figure
RESULTS = {
    "colm": [{"threshold": 0.9, "deferral": 0.05, "accuracy": 0.30}, {"threshold": 0.2, "deferral": 0.6, "accuracy": 0.52},
             {"threshold": 0.5, "deferral": 0.2, "accuracy": 0.47}],
    # random deferral as colm.evaluate reports it: the mean over seeds, its sd and min/max, and every seed's point
    "random": [{"rate": 0.5, "seeds": [0, 1, 2], "deferral": 0.5, "deferral_sd": 0.01, "accuracy": 0.38,
                "accuracy_sd": 0.03, "accuracy_min": 0.35, "accuracy_max": 0.41,
                "per_seed": [{"seed": 0, "deferral": 0.49, "accuracy": 0.35},
                             {"seed": 1, "deferral": 0.5, "accuracy": 0.38},
                             {"seed": 2, "deferral": 0.51, "accuracy": 0.41}]},
               {"rate": 0.1, "seeds": [0, 1, 2], "deferral": 0.1, "deferral_sd": 0.0, "accuracy": 0.3,
                "accuracy_sd": 0.02, "accuracy_min": 0.28, "accuracy_max": 0.32,
                "per_seed": [{"seed": 0, "deferral": 0.1, "accuracy": 0.28},
                             {"seed": 1, "deferral": 0.1, "accuracy": 0.3},
                             {"seed": 2, "deferral": 0.1, "accuracy": 0.32}]}],
    "confidence": [{"min_prob": 0.5, "deferral": 0.15, "accuracy": 0.4}],
    "base": {"accuracy": 0.28, "deferral": 0.0},
    "expert": {"accuracy": 0.55, "deferral": 1.0},
    "chosen": {"threshold": 0.5, "deferral": 0.2, "accuracy": 0.47},
}


def test_curve_figure_traces():
    fig = viz.curve_figure(RESULTS)
    by = {t.name.split(" (")[0]: t for t in fig.data}
    colm = by["Co-LLM"]
    assert list(colm.x) == [0.05, 0.2, 0.6] and list(colm.y) == [0.30, 0.47, 0.52]   # sorted by deferral
    assert "threshold 0.5" in colm.hovertext[1]
    assert list(by["random deferral"].x) == [0.1, 0.5]
    assert list(by["base-confidence deferral"].y) == [0.4]
    assert list(by["base only"].y) == [0.28, 0.28] and list(by["base only"].x) == [0, 1]
    assert list(by["expert only"].y) == [0.55, 0.55]
    star = next(t for t in fig.data if t.name.startswith("chosen"))
    assert (star.x[0], star.y[0]) == (0.2, 0.47) and star.marker.symbol == "star"
    assert star.name == "chosen η = 0.5"
    # Colour-blind safety does not rest on colour alone: every curve has its own dash and marker.
    curves = [by["Co-LLM"], by["random deferral"], by["base-confidence deferral"]]
    assert len({(c.line.dash, c.marker.symbol) for c in curves}) == 3


def test_curve_figure_random_is_mean_with_sd_bars_and_faint_seeds():
    fig = viz.curve_figure(RESULTS)
    mean = next(t for t in fig.data if t.name.startswith("random deferral (mean"))
    assert "3 seeds" in mean.name
    assert list(mean.x) == [0.1, 0.5] and list(mean.y) == [0.3, 0.38]              # the means, sorted by deferral
    assert mean.error_y.visible and list(mean.error_y.array) == [0.02, 0.03]        # ± sd of the accuracy
    assert list(mean.error_x.array) == [0.0, 0.01]
    assert "± 3.0%" in mean.hovertext[1] and "min 35.0%, max 41.0%" in mean.hovertext[1]
    seeds = next(t for t in fig.data if t.name == "random deferral, each seed")
    assert sorted(seeds.y) == [0.28, 0.3, 0.32, 0.35, 0.38, 0.41] and seeds.opacity < 0.5
    assert seeds.legendgroup == mean.legendgroup and seeds.showlegend is False
    assert "seed 2" in seeds.hovertext[2]


def test_curve_figure_draws_each_point_s_95_interval():
    """Issue 18: every accuracy in the curve figure carries its 95 % interval where the results have one."""
    ci = lambda k, n: {"accuracy": k / n, "accuracy_ci": list(stats.wilson(k, n))}
    res = {"colm": [{"threshold": 0.5, "deferral": 0.2, **ci(47, 100)}, {"threshold": 0.1, "deferral": 0.6, **ci(52, 100)}],
           "chosen": {"threshold": 0.5, "deferral": 0.2, **ci(47, 100)},
           "confidence": [{"min_prob": 0.97, "deferral": 0.3, **ci(50, 100)}],
           "random": [{"rate": 0.3, "seeds": [0], "deferral": 0.3, "accuracy": 0.3,
                       "per_seed": [{"seed": 0, "deferral": 0.3, **ci(30, 100)}]}],
           "base": {"deferral": 0.0, **ci(28, 100)}, "expert": {"deferral": 1.0, **ci(55, 100)}}
    fig = viz.curve_figure(res)
    by = {t.name: t for t in fig.data}
    colm = by["Co-LLM (threshold sweep)"]
    lo, hi = stats.wilson(47, 100)
    assert colm.error_y.visible and colm.error_y.symmetric is False
    assert colm.error_y.array[0] == pytest.approx(hi - 0.47) and colm.error_y.arrayminus[0] == pytest.approx(0.47 - lo)
    assert by["base-confidence deferral"].error_y.visible and "(95 %)" in by["base-confidence deferral"].hovertext[0]
    assert next(t for t in fig.data if t.name.startswith("chosen")).error_y.visible
    assert by["random deferral, each seed"].error_y.visible
    band = by["base only, 95 % interval"]
    assert band.fill == "toself" and min(band.y) == pytest.approx(stats.wilson(28, 100)[0])
    assert max(by["expert only, 95 % interval"].y) == pytest.approx(stats.wilson(55, 100)[1])
    # Results from before intervals: no bars, no bands.
    plain = viz.curve_figure(RESULTS)
    assert not any(t.name.endswith("95 % interval") for t in plain.data)
    assert not next(t for t in plain.data if t.name.startswith("Co-LLM")).error_y.visible


def test_curve_figure_random_without_seeds_is_a_plain_curve():
    """Results from before random seeds (one run per rate) still draw, without error bars."""
    fig = viz.curve_figure({"random": [{"rate": 0.3, "deferral": 0.3, "accuracy": 0.27}]})
    (t,) = fig.data
    assert t.name == "random deferral" and not t.error_y.visible and list(t.y) == [0.27]


@pytest.mark.parametrize("drop, traces", [("colm", 6), ("random", 5), ("confidence", 6), ("base", 6),
                                          ("expert", 6), ("chosen", 6)])
def test_curve_figure_parts_optional(drop, traces):
    res = {k: v for k, v in RESULTS.items() if k != drop}
    fig = viz.curve_figure(res)
    assert len(fig.data) == traces      # random deferral is two traces: the means and the single seeds
    fig.to_json()


@pytest.mark.parametrize("budget", [None, 0.35])
def test_curve_figure_marks_the_deferral_budget(budget):
    fig = viz.curve_figure({**RESULTS, **({} if budget is None else {"max_deferral": budget})})
    lines = [s for s in fig.layout.shapes if s.x0 == s.x1]
    assert [s.x0 for s in lines] == ([] if budget is None else [budget])
    assert any("budget 35%" in a.text for a in fig.layout.annotations) == (budget is not None)


def test_curve_figure_empty():
    assert len(viz.curve_figure({}).data) == 0


# ----------------------------------------------------------------------------------------------- summary / json
def test_summary_line():
    s = viz.summary_line(make_trace())
    for want in ("Co-LLM (η = 0.5)", "6 tokens", "deferral 50.0% (3 from the expert)", "3 expert calls",
                 "3.0 tokens/s", "2.00 s", "finished"):
        assert want in s
    tr = make_trace({"name": "random", "rate": 0.3, "seed": 0})
    tr.reused_steps, tr.stop_reason = 2, "cancelled"
    s = viz.summary_line(tr)
    assert s.startswith("random (30%)") and "2 reused" in s and "stopped" in s and "2.0 tokens/s" in s


@pytest.mark.parametrize("threshold, shown", [(0.1446664, "η = 0.145"), (0.05, "η = 0.05")])
def test_summary_line_threshold_digits(threshold, shown):
    assert viz.summary_line(make_trace({"name": "colm", "threshold": threshold})).startswith(f"Co-LLM ({shown})")


def test_summary_line_names_the_answer_line_stop():
    tr = make_trace()
    tr.stop_reason = "answer"
    assert viz.summary_line(tr).endswith("finished at its '#### n' line")


def test_summary_line_empty_trace():
    assert "0 tokens" in viz.summary_line(Trace("x", [1], {"name": "base"}))


def test_trace_json_roundtrip():
    tr = make_trace()
    tr.prompt = "naïve \ud800 prompt"
    tr.steps[0].p_defer = float("nan")
    settings = {"policy": "colm", "threshold": 0.5, "max_new_tokens": 64}
    text = viz.trace_json(tr, settings)
    text.encode("utf-8")
    doc = json.loads(text)
    assert doc["prompt"] == tr.prompt and "naïve" in text
    assert doc["settings"] == settings
    assert doc["base_model"] == "tiny-base" and doc["expert_model"] == "tiny-expert" and doc["head"] == "random-test-head"
    assert doc["prompt_ids"] == [1, 2, 3]
    assert len(doc["steps"]) == 6 and doc["steps"][0]["p_defer"] is None
    assert doc["steps"][1]["source"] == "expert" and doc["steps"][1]["base_topk"][0][1] == " world"
    assert "NaN" not in text


def test_viz_does_not_import_gradio():
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import sys, colm.viz; print('gradio' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_curve_figure_draws_course_correction_at_its_cost():
    res = {**RESULTS, "backtrack": {"n": 10, "accuracy": 0.5, "mean_tokens": 100.0, "expert_written": [300, 350],
                                    "fired": 2, "fixed": 1, "broke": 0}}
    fig = viz.curve_figure(res)
    t = next(t for t in fig.data if t.name and t.name.startswith("+ course correction"))
    assert list(t.x) == [0.35] and list(t.y) == [0.5] and "1 fixed" in t.name
    assert not any(t.name and "course correction" in t.name for t in viz.curve_figure(RESULTS).data)


def test_curve_figure_draws_the_course_corrected_sweep_at_its_cost():
    """Each η with course correction sits at the expert's tokens it cost (dropped lines included), not at the plain
    point's deferral: the figure is the matched-cost comparison."""
    pt = lambda thr, acc, written: {"threshold": thr, "n": 10, "accuracy": acc, "deferral": 0.0, "mean_tokens": 100.0,
                                    "expert_written": [0, written], "fired": 1, "fixed": 0, "broke": 0}
    res = {**RESULTS, "backtrack_curve": [pt(0.2, 0.55, 640), pt(0.9, 0.33, 90), pt(1.0, 0.29, 30)]}
    t = next(t for t in viz.curve_figure(res).data if t.name and t.name.startswith("Co-LLM + course correction"))
    assert list(t.x) == [0.03, 0.09, 0.64] and list(t.y) == [0.29, 0.33, 0.55]
