"""Traces and results -> things a person looks at: the palette, token text made safe to show, the
accuracy-vs-deferral figure, a summary line, JSON.  The page's own views (answer + chart, panels) are in colm.page.

Knows nothing of Gradio, so the app stays a thin binding and every picture here is unit-testable.
Colours are Okabe-Ito (colour-blind safe); figures have transparent backgrounds and mid-grey text so they read
on light and dark page themes alike.
"""
from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass

import plotly.graph_objects as go



@dataclass(frozen=True)
class Colour:
    hex: str
    name: str        # the word the page's text uses for it: the About text and the legends say this


# The one palette (Okabe-Ito: colour-blind safe).  Text, chart, legends and the About text all read it from here, so
# the words and the pixels cannot drift apart.  One meaning per colour; nothing is told by hatching.
PALETTE = {
    "base": Colour("#0072B2", "blue"),
    "expert": Colour("#E69F00", "orange"),
    "flip": Colour("#CC79A7", "pink"),             # a decision a pending threshold would change (preview only)
    "threshold": Colour("#888888", "grey"),        # neutral: visible on white and on near-black
    "colm": Colour("#D55E00", "vermillion"),       # accuracy-vs-deferral curves
    "random": Colour("#56B4E9", "sky blue"),
    "confidence": Colour("#009E73", "green"),
}
BASE_COLOR, EXPERT_COLOR, FLIP_COLOR = PALETTE["base"].hex, PALETTE["expert"].hex, PALETTE["flip"].hex
THRESHOLD_COLOR = PALETTE["threshold"].hex
INK = "#888888"               # axis text; ~3.5:1 on white, ~5:1 on Gradio's dark background
GRID = "rgba(136,136,136,0.25)"
POLICY_NAMES = {"colm": "Co-LLM", "base": "base only", "expert": "expert only", "random": "random",
                "confidence": "confidence"}


def fmt_threshold(x) -> str:
    """A threshold as people read it: 2-3 significant digits (0.1446664 -> 0.145, 0.5 -> 0.5)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{x:.3g}" if math.isfinite(x) else str(x)


# Characters that would reorder or hide the surrounding text if shown raw.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_VISIBLE = {" ": "·", "\n": "⏎", "\t": "\\t"}


# ----------------------------------------------------------------------------------------------- token text
def _escape(ch: str) -> str:
    c = ord(ch)
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"


def display_token(text, visible: bool = False) -> str:
    """The one place token text is cleaned for display.

    visible=False (answer text): spaces, newlines and tabs stay as they are, so the answer reads as generated.
    visible=True (chart labels): whitespace gets a visible stand-in (space ·, newline ⏎, tab \\t) and invisible
    format characters are escaped, since a hover label of "" or " " tells nobody anything.
    Either way control characters, lone surrogates and bidi overrides become escapes like \\x07: they would
    otherwise corrupt the page (or its JSON) rather than show anything.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    out = []
    for ch in text:
        if visible and ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch in "\n\t":
            out.append(ch)
        else:
            cat = unicodedata.category(ch)
            hidden = cat in ("Cc", "Cs") or ch in _BIDI or (visible and cat == "Cf" and ch != "\u200d")
            out.append(_escape(ch) if hidden else ch)
    return "".join(out)


def label_text(step) -> str:
    """Visible text of a step; special tokens (empty display text) fall back to the token's own spelling."""
    if step.text:
        return display_token(step.text, visible=True)
    for cands in (step.base_topk, step.expert_topk or []):
        for tid, text, _ in cands:
            if tid == step.token_id and text:
                return display_token(text, visible=True)
    return f"<token {step.token_id}>"


def p_of(step) -> float | None:
    p = step.p_defer
    return None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p)


# ----------------------------------------------------------------------------------------------- answer
def flips(trace, new_threshold: float) -> list[int]:
    """Positions whose Co-LLM decision would change at ``new_threshold``.  Only the first is exact: everything
    after it will be re-decoded, so the rest are a preview of where the current trace disagrees.  A position a
    what-if forced is no threshold's decision: a re-decode keeps it, so it never flips."""
    return [s.position for s in trace.steps
            if p_of(s) is not None and not getattr(s, "forced", False)
            and (p_of(s) > new_threshold) != (s.source == "expert")]


# ----------------------------------------------------------------------------------------------- figures
def _style(fig: go.Figure, legend_rows: int = 1, **layout) -> go.Figure:
    axis = dict(color=INK, gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    fig.update_layout(
        template="none", paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
        font=dict(color=INK, size=13), margin=dict(l=60, r=70, t=36, b=legend_rows * 22 + 60),
        # At the bottom of the figure: above the plot, Gradio's label (top-left) and Plotly's modebar (top-right)
        # would cover it.
        legend=dict(orientation="h", yref="container", yanchor="bottom", y=0.01, xanchor="center", x=0.5),
        hoverlabel=dict(bgcolor="white", font=dict(color="black", family="monospace"), align="left"),
        **layout)
    fig.update_xaxes(**axis)
    fig.update_yaxes(**axis)
    return fig


def _ci_bars(pts, color: str) -> dict:
    """95 % (Wilson) error bars from each point's ``accuracy_ci``; hidden unless every point has one (results from
    before intervals draw plain)."""
    have = all(p.get("accuracy_ci") for p in pts)
    return dict(type="data", symmetric=False, visible=have, color=color, thickness=1.2, width=3,
                array=[p["accuracy_ci"][1] - p["accuracy"] if have else 0.0 for p in pts],
                arrayminus=[p["accuracy"] - p["accuracy_ci"][0] if have else 0.0 for p in pts])


def _ci_text(p: dict) -> str:
    ci = p.get("accuracy_ci")
    return f"accuracy {p['accuracy']:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}] (95 %)" if ci else "")


def _curve(fig, points, key: str, name: str, color: str, dash: str, symbol: str) -> None:
    pts = sorted((p for p in points or () if p.get("deferral") is not None and p.get("accuracy") is not None),
                 key=lambda p: (p["deferral"], p.get(key, 0)))
    if not pts:
        return
    fig.add_trace(go.Scatter(
        x=[p["deferral"] for p in pts], y=[p["accuracy"] for p in pts], name=name, mode="lines+markers",
        line=dict(color=color, dash=dash, width=2), marker=dict(symbol=symbol, size=8, color=color),
        error_y=_ci_bars(pts, color),
        hovertext=[f"{name}<br>{key} {p.get(key, float('nan')):.3g}<br>deferral {p['deferral']:.1%}"
                   f"<br>{_ci_text(p)}" for p in pts], hoverinfo="text"))


def _random_curve(fig, points) -> None:
    """Random deferral: the mean over seeds at each rate with ± sd error bars (both axes), and every seed's own point
    faintly.  Points without per-seed data (results from before seeds) are drawn plain."""
    pts = sorted((p for p in points or () if p.get("deferral") is not None and p.get("accuracy") is not None),
                 key=lambda p: (p["deferral"], p.get("rate", 0)))
    if not pts:
        return
    seeds = [q for p in pts for q in p.get("per_seed") or () if q.get("deferral") is not None]
    k = max((len(p.get("per_seed") or ()) for p in pts), default=0)
    name = f"random deferral (mean ± sd, {k} seeds)" if k > 1 else "random deferral"

    def bars(key):
        sd = [p.get(f"{key}_sd") for p in pts]
        return dict(type="data", array=[s or 0.0 for s in sd], visible=any(s is not None for s in sd),
                    color=PALETTE["random"].hex, thickness=1.5, width=4)

    def hover(p):
        text = f"{name}<br>rate {p.get('rate', float('nan')):.3g}<br>deferral {p['deferral']:.1%}"
        if p.get("accuracy_sd") is not None:
            text += f"<br>accuracy {p['accuracy']:.1%} ± {p['accuracy_sd']:.1%}"
            if p.get("accuracy_min") is not None:
                text += f" (min {p['accuracy_min']:.1%}, max {p['accuracy_max']:.1%})"
            return text + f"<br>seeds {', '.join(map(str, p.get('seeds', [])))}"
        return text + f"<br>accuracy {p['accuracy']:.1%}"
    fig.add_trace(go.Scatter(
        x=[p["deferral"] for p in pts], y=[p["accuracy"] for p in pts], name=name, mode="lines+markers",
        line=dict(color=PALETTE["random"].hex, dash="dash", width=2), marker=dict(symbol="square", size=8, color=PALETTE["random"].hex),
        error_y=bars("accuracy"), error_x=bars("deferral"), legendgroup="random",
        hovertext=[hover(p) for p in pts], hoverinfo="text"))
    if seeds:
        fig.add_trace(go.Scatter(
            x=[q["deferral"] for q in seeds], y=[q["accuracy"] for q in seeds], name="random deferral, each seed",
            mode="markers", legendgroup="random", showlegend=False, opacity=0.35,
            marker=dict(symbol="square-open", size=7, color=PALETTE["random"].hex),
            error_y=_ci_bars(seeds, PALETTE["random"].hex),
            hovertext=[f"random, seed {q.get('seed', '?')}<br>deferral {q['deferral']:.1%}<br>{_ci_text(q)}"
                       for q in seeds], hoverinfo="text"))


def corrected_cost(point: dict) -> float:
    """A course-corrected point's cost on the deferral axis: the expert's tokens, those of the lines it dropped
    included, over the answers' tokens (so equal x means equal expert writing, the matched-cost comparison)."""
    return point["expert_written"][1] / max(1.0, point["mean_tokens"] * point["n"])


def curve_figure(results: dict) -> go.Figure:
    """The paper's accuracy-vs-deferral-frequency plot from an evaluation results dict (any part optional).  Every
    point carrying ``accuracy_ci`` gets its 95 % interval (error bars; a band behind the base and expert lines).
    Random deferral is the mean over its seeds with ± sd error bars, each seed's point drawn faintly behind with
    its own interval."""
    fig = go.Figure()
    _curve(fig, results.get("colm"), "threshold", "Co-LLM (threshold sweep)", PALETTE["colm"].hex, "solid", "circle")
    _random_curve(fig, results.get("random"))
    _curve(fig, results.get("confidence"), "min_prob", "base-confidence deferral", PALETTE["confidence"].hex, "dot", "diamond")
    for key, name, color, dash in (("base", "base only", BASE_COLOR, "dot"), ("expert", "expert only", EXPERT_COLOR, "dash")):
        ref = results.get(key)
        if ref and ref.get("accuracy") is not None:
            ci = ref.get("accuracy_ci")
            if ci:   # the 95 % interval as a faint band behind the line
                fig.add_trace(go.Scatter(x=[0, 1, 1, 0, 0], y=[ci[0], ci[0], ci[1], ci[1], ci[0]], fill="toself",
                                         mode="none", fillcolor=color, opacity=0.12, legendgroup=key,
                                         showlegend=False, hoverinfo="skip", name=f"{name}, 95 % interval"))
            fig.add_trace(go.Scatter(x=[0, 1], y=[ref["accuracy"]] * 2, name=f"{name} ({ref['accuracy']:.1%})",
                                     mode="lines", line=dict(color=color, dash=dash, width=1.5), legendgroup=key,
                                     hovertext=f"{name}<br>{_ci_text(ref)}", hoverinfo="text"))
    budget = results.get("max_deferral")
    if budget is not None:   # the choice was restricted to points left of this line
        fig.add_vline(x=budget, line=dict(color=THRESHOLD_COLOR, dash="dashdot", width=1.5),
                      annotation=dict(text=f"deferral budget {budget:.0%}", font=dict(color=INK, size=12)),
                      annotation_position="top left")
    chosen = results.get("chosen")
    if chosen and chosen.get("deferral") is not None:
        fig.add_trace(go.Scatter(
            x=[chosen["deferral"]], y=[chosen["accuracy"]], mode="markers", name=f"chosen η = {fmt_threshold(chosen['threshold'])}",
            error_y=_ci_bars([chosen], FLIP_COLOR),
            marker=dict(symbol="star", size=18, color=FLIP_COLOR, line=dict(color=INK, width=1)), hoverinfo="name"))
    _curve(fig, [{**p, "deferral": corrected_cost(p)} for p in results.get("backtrack_curve") or () if p.get("n")],
           "threshold", "Co-LLM + course correction (at its cost)", FLIP_COLOR, "dash", "star-open")
    corrected = results.get("backtrack")
    if corrected and corrected.get("n"):
        fig.add_trace(go.Scatter(
            x=[corrected_cost(corrected)], y=[corrected["accuracy"]], mode="markers", hoverinfo="name",
            error_y=_ci_bars([corrected], FLIP_COLOR),
            name=(f"+ course correction ({corrected['fired']} fired, {corrected['fixed']} fixed, "
                  f"{corrected['broke']} broke)"),
            marker=dict(symbol="star-open", size=16, color=FLIP_COLOR, line=dict(color=FLIP_COLOR, width=2))))
    return _style(fig, legend_rows=3, height=460, xaxis=dict(title="deferral frequency (share of tokens from the expert)",
                                              tickformat=".0%", range=[-0.02, 1.02]),
                  yaxis=dict(title="accuracy", tickformat=".0%"))


# ----------------------------------------------------------------------------------------------- text records
def policy_label(policy: dict) -> str:
    name = policy.get("name", "?")
    if name == "colm":
        return f"Co-LLM (η = {fmt_threshold(policy.get('threshold', 0.5))})"
    if name == "random":
        return f"random ({policy.get('rate', 0):.0%})"
    if name == "confidence":
        return f"confidence (min p {fmt_threshold(policy.get('min_prob', 0.5))})"
    return POLICY_NAMES.get(name, name)


def summary_line(trace) -> str:
    n = len(trace.steps)
    n_exp = sum(s.source == "expert" for s in trace.steps)
    parts = [policy_label(trace.policy), f"{n} tokens",
             f"deferral {trace.deferral_rate:.1%} ({n_exp} from the expert)",
             f"{trace.expert_calls} expert calls", f"{trace.tokens_per_second:.1f} tokens/s",
             f"{trace.decode_seconds:.2f} s"]
    if trace.reused_steps:
        parts.append(f"{trace.reused_steps} reused")
    if trace.stop_reason:
        parts.append({"eos": "finished", "answer": "finished at its '#### n' line", "length": "hit max tokens",
                                      "cancelled": "stopped"}.get(
            trace.stop_reason, trace.stop_reason))
    return " · ".join(parts)


def trace_json(trace, settings: dict) -> str:
    """The whole trace as one JSON document: prompt, settings, model and head identities, every step."""
    doc = {"format": "colm-trace/1", "settings": settings, "prompt_ids": list(trace.prompt_ids), **trace.to_dict()}
    text = json.dumps(doc, ensure_ascii=False, indent=1, default=str)
    # A lone surrogate (a browser can send one) only occurs inside JSON strings, where \udXXX is its exact
    # escape: the document stays readable and is always writable as UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
