"""bench/protocol_table.py renders what an evaluation measured, intervals and paired differences included."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from protocol_table import main  # noqa: E402

from colm.stats import paired, wilson  # noqa: E402


def point(k, n, deferral, **extra):
    return {"n": n, "accuracy": k / n, "accuracy_ci": list(wilson(k, n)), "deferral": deferral, "capped": 1,
            "mean_tokens": 250.0, **extra}


@pytest.mark.parametrize("with_seeds", [1, 3])
def test_protocol_table_renders_every_policy_with_its_interval(tmp_path, with_seeds):
    colm = {i: i % 2 == 0 for i in range(10)}
    expert = {i: i % 3 == 0 for i in range(10)}
    per_seed = [{"seed": s, **point(3 + s, 10, 0.3)} for s in range(with_seeds)]
    res = {"split": "dev-b", "n_examples": 10, "max_new_tokens": 512, "engine": "llamacpp",
           "base": point(2, 10, 0.0), "expert": point(4, 10, 1.0), "chosen": {"threshold": 0.145, **point(5, 10, 0.32)},
           "random": [{"rate": 0.32, "seeds": list(range(with_seeds)), "per_seed": per_seed, "accuracy": 0.4,
                       "accuracy_sd": 0.1, "deferral": 0.3}],
           "confidence": [{"min_prob": 0.9746494, "chosen_on": "dev-a", **point(4, 10, 0.31)}],
           "paired": {"colm_vs_expert": paired(colm, expert)}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    text = main(str(tmp_path / "results.json"))
    lo, hi = wilson(5, 10)
    assert f"50.0 % [{100 * lo:.1f}, {100 * hi:.1f}] (5/10) | 32.0 %" in text
    assert text.count("random deferral, rate 0.320, seed") == with_seeds
    assert ("mean of seeds" in text) == (with_seeds > 1)
    assert "| confidence (base top probability < 0.9746, cut-off chosen on dev-a) | 40.0 % [" in text
    c = res["paired"]["colm_vs_expert"]
    assert f"| Co-LLM − expert | {100 * c['difference']:+.1f} " in text and f"| {c['only_a']} / {c['only_b']} |" in text


def test_matched_cost_table_compares_each_corrected_point_with_the_plain_curve_at_its_cost(tmp_path):
    corrected = lambda thr, k, written: {"threshold": thr, **point(k, 10, 0.0), "expert_written": [0, written],
                                         "expert_fed": [100, 1200], "fired": 2, "fixed": 1, "broke": 0}
    res = {"n_examples": 10, "max_new_tokens": 512, "base": point(2, 10, 0.0), "expert": point(6, 10, 1.0),
           "colm": [{"threshold": 1.0, **point(2, 10, 0.0)}, {"threshold": 0.2, **point(4, 10, 0.2)},
                    {"threshold": 0.1, **point(5, 10, 0.4)}],
           # at 30 % of 2,500 tokens the plain curve reads 45 %; at 90 % it reads between 0.4 (50 %) and expert (60 %)
           "backtrack_curve": [corrected(0.2, 5, 750), corrected(0.1, 5, 2250)]}
    (tmp_path / "results.json").write_text(json.dumps(res))
    rows = [r for r in main(str(tmp_path / "results.json")).splitlines() if r.startswith("| 0.")]
    assert len(rows) == 2
    assert "| 30.0 %, 50.0 %" in rows[0] and "| 45.0 % | +5.0 |" in rows[0] and "| 2 / 1 / 0 | 100 → 1,200 |" in rows[0]
    assert "| 90.0 %, 50.0 %" in rows[1] and "| 58.3 % | -8.3 |" in rows[1]
    res.pop("backtrack_curve")
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert "corrected −" not in main(str(tmp_path / "results.json"))


def test_paired_runs_counts_the_budget_from_each_record_s_stop_reason(tmp_path):
    """bench/paired_runs.py: at a 512 budget an answer of 300 tokens is not capped; older records (no stop_reason)
    fall back to a length count."""
    from paired_runs import main as paired_main
    rows_a = [{"index": 0, "ids": [1] * 300, "correct": True, "stop_reason": "eos", "deferral": 0.3},
              {"index": 1, "ids": [1] * 512, "correct": False, "stop_reason": "length", "deferral": 0.3}]
    rows_b = [{"index": 0, "ids": [1] * 256, "correct": True}, {"index": 1, "ids": [1] * 10, "correct": True}]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = paired_main(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert (r["hit_cap_a"], r["hit_cap_b"]) == (1, 1) and r["only_b"] == 1 and r["deferral_a"] == 0.3
