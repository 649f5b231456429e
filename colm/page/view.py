"""The answer and its p_defer chart as one view.

Every generated position is one token element and one chart column carrying the same ``data-i``, so hovering or
clicking either marks both (VIEW_JS).  A column is the whole height of the plot, so a bar of p_defer 0.01 is as
easy to hover as one of 0.9; its hover box is plain text (``data-tip``) that the script places inside the plot.
Model text is escaped twice over: display_token turns controls, bidi overrides and lone surrogates into visible
escapes, and html.escape makes whatever is left data rather than markup.
"""
from __future__ import annotations

import html
from html.parser import HTMLParser

from .. import viz
from .words import corrected_positions, tip_text

C = {k: v.hex for k, v in viz.PALETTE.items()}
EMPTY = ('<div class="colm-view colm-empty" data-key="" data-n="0">'
         '<p>Pick an example or type a prompt, then <b>Generate</b>: each token appears here, coloured by the model '
         'that wrote it, above a chart of the head\'s p_defer for every token.</p></div>')


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _applied(trace) -> float | None:
    """The threshold the trace was decoded at, or None when its policy has none (the η line is Co-LLM's only)."""
    return float(trace.policy.get("threshold", 0.5)) if trace.policy.get("name") == "colm" else None


def _kind(step, flipped: set) -> str:
    return "flip" if step.position in flipped else step.source


def _dropped(rollback: dict) -> str:
    """A line a course correction took back, struck through where its replacement begins."""
    tip = f"dropped: {rollback['reason']} ({rollback['detector']} check); the expert rewrote the line"
    return f'<del class="colm-dropped" title="{_e(tip)}">{_e(viz.display_token(rollback["discarded"]))}</del>'


def _tokens(trace, flipped: set, interactive: bool) -> str:
    out = []
    rollbacks = {}
    for r in getattr(trace, "rollbacks", []):
        rollbacks.setdefault(r["position"], []).append(r)
    for s in trace.steps:
        out += [_dropped(r) for r in rollbacks.get(s.position, [])]
        attrs = f' data-i="{s.position}"' if interactive else ""
        text = viz.display_token(s.text)
        if text:
            out.append(f'<span class="colm-tok colm-{_kind(s, flipped)}"{attrs}>{_e(text)}</span>')
        elif interactive:   # an end token has no text: a label drawn by CSS keeps it clickable, out of the text
            out.append(f'<span class="colm-tok colm-special colm-{_kind(s, flipped)}"{attrs} '
                       f'data-label="{_e(viz.label_text(s))}"></span>')
    return "".join(out)


def text_html(trace) -> str:
    """The answer alone, coloured by writer (the Compare columns)."""
    return f'<div class="colm-text colm-small">{_tokens(trace, set(), False)}</div>'


def _legend(trace, pending: float | None, flipped: set) -> str:
    eta = _applied(trace)
    items = [f'<span class="colm-key"><i class="colm-sw colm-base"></i>{viz.PALETTE["base"].name}: the base '
             f'model wrote it (plain text)</span>',
             f'<span class="colm-key"><i class="colm-sw colm-expert"></i>{viz.PALETTE["expert"].name}: the expert '
             f'wrote it</span>']
    if eta is not None:
        items.append(f'<span class="colm-key"><i class="colm-sw colm-line"></i>dashed line: η = '
                     f'{viz.fmt_threshold(eta)}; the head defers above it</span>')
    else:
        items.append(f'<span class="colm-key">bars: the head\'s p_defer, which the '
                     f'{_e(viz.policy_label(trace.policy))} policy does not use</span>')
    if flipped:
        items.append(f'<span class="colm-key"><i class="colm-sw colm-flip"></i>{viz.PALETTE["flip"].name}: would '
                     f'change writer at η = {viz.fmt_threshold(pending)} (preview)</span>')
    return f'<div class="colm-legend">{"".join(items)}</div>'


def _corrections(trace) -> str:
    """One line per rollback: where, what the checker found, what the expert wrote instead."""
    items = []
    for r in getattr(trace, "rollbacks", []):
        same = " (the same line again: the expert repeated the mistake)" if r["replacement"] == r["discarded"] else ""
        items.append(f'<li>token #{r["position"]}: {_e(r["reason"])}; the expert rewrote the line{same}.</li>')
    if not items:
        return ""
    return (f'<div class="colm-corrections"><b>Course correction</b> (struck-through text was dropped):'
            f'<ul>{"".join(items)}</ul></div>')


def _line(threshold: float, label: str, cls: str) -> str:
    return (f'<div class="colm-eta {cls}" style="bottom:{100 * threshold:.2f}%">'
            f'<span>{_e(label)}</span></div>')


def _chart(trace, pending: float | None, flipped: set) -> str:
    cols = []
    corrected = corrected_positions(trace)
    for s in trace.steps:
        p = viz.p_of(s)
        height = 0.0 if p is None else 100 * min(max(p, 0.0), 1.0)
        cols.append(f'<div class="colm-col" data-i="{s.position}" data-tip="{_e(tip_text(s, trace.policy, s.position in corrected))}">'
                    f'<div class="colm-bar colm-{_kind(s, flipped)}" style="height:{height:.2f}%"></div></div>')
    eta = _applied(trace)
    lines = "" if eta is None else _line(eta, f"η = {viz.fmt_threshold(eta)}", "colm-applied")
    if eta is not None and pending is not None and pending != eta:
        lines += _line(pending, f"η = {viz.fmt_threshold(pending)} (preview)", "colm-pending")
    grid = "".join(f'<div class="colm-grid" style="bottom:{y}%"></div>' for y in (25, 50, 75, 100))
    ticks = "".join(f'<span style="bottom:{y}%">{t}</span>' for y, t in ((0, "0"), (50, "0.5"), (100, "1")))
    n = len(trace.steps)
    return (f'<div class="colm-chart"><div class="colm-ylabels">{ticks}</div>'
            f'<div class="colm-plot" role="img" aria-label="p_defer for each of {n} generated tokens">{grid}'
            f'<div class="colm-cols">{"".join(cols)}</div>{lines}<div class="colm-tip" hidden></div></div>'
            f'<div class="colm-xlabel">p_defer per generated token, 0 … {max(n - 1, 0)} (hover or click a bar or '
            f'a token)</div></div>')


def view_html(trace, pending: float | None = None) -> str:
    """The whole view of ``trace``.  ``pending``: a threshold being previewed (not decoded yet) for a Co-LLM trace:
    the decisions it would change turn pink and its line is drawn beside the applied one."""
    if trace is None:
        return EMPTY
    eta = _applied(trace)
    preview = eta is not None and pending is not None and pending != eta
    flipped = set(viz.flips(trace, pending)) if preview else set()
    banner = ""
    if preview:
        banner = (f'<div class="colm-banner">Preview at η = {viz.fmt_threshold(pending)}: not decoded yet. '
                  f'{len(flipped)} decision{"s" if len(flipped) != 1 else ""} would change; let go of the slider '
                  f'to re-decode.</div>')
    return (f'<div class="colm-view{" colm-previewing" if preview else ""}" data-key="{id(trace):x}" '
            f'data-n="{len(trace.steps)}" tabindex="0" aria-label="answer and p_defer chart; arrow keys move the '
            f'selected token">{banner}{_legend(trace, pending, flipped)}{_corrections(trace)}'
            f'<div class="colm-text">{_tokens(trace, flipped, True)}</div>{_chart(trace, pending, flipped)}</div>')


class _Tokens(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self._cur = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "colm-tok" in classes:
            kind = next((c[5:] for c in classes if c in ("colm-base", "colm-expert", "colm-flip")), "")
            self._cur = [int(a["data-i"]) if "data-i" in a else None, "", kind]

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            self.out.append(tuple(self._cur))
            self._cur = None


def tokens_of(view: str) -> list[tuple[int | None, str, str]]:
    """(position, shown text, "base" | "expert" | "flip") for every token element of a view: what a reader of
    the page sees, for tests and for programs that call the page's API."""
    p = _Tokens()
    p.feed(view or "")
    return p.out


# Runs once per view component (gr.HTML js_on_load: ``element``, ``trigger``, ``watch``).  Listeners sit on the
# component, not on tokens, so they survive every re-render of the value.
VIEW_JS = r"""
let hover = null, sel = null, key = null, follow = true;
const view = () => element.querySelector(".colm-view");
const mark = (cls, i, on) => element.querySelectorAll(`[data-i="${i}"]`).forEach(e => e.classList.toggle(cls, on));
function hideTip() { const t = element.querySelector(".colm-tip"); if (t) t.hidden = true; }
function showTip(i) {
  const plot = element.querySelector(".colm-plot"), tip = element.querySelector(".colm-tip");
  const col = element.querySelector(`.colm-col[data-i="${i}"]`);
  if (!plot || !tip || !col) return;
  tip.textContent = col.dataset.tip || "";
  tip.hidden = false;
  const p = plot.getBoundingClientRect(), c = col.getBoundingClientRect();
  const x = c.left + c.width / 2 - p.left - tip.offsetWidth / 2;
  tip.style.left = Math.max(0, Math.min(x, p.width - tip.offsetWidth)) + "px";
  tip.style.top = "0px";
}
function setHover(i) {
  if (hover === i) return;
  if (hover !== null) mark("colm-hl", hover, false);
  hover = i;
  if (i === null) hideTip(); else { mark("colm-hl", i, true); showTip(i); }
}
function select(i) {
  if (sel !== null) mark("colm-sel", sel, false);
  sel = i;
  mark("colm-sel", i, true);
  const tok = element.querySelector(`.colm-tok[data-i="${i}"]`);
  trigger("select", {index: Number(i), value: tok ? tok.textContent : ""});
}
element.addEventListener("mouseover", e => {
  const t = e.target.closest("[data-i]");
  setHover(t && element.contains(t) ? t.dataset.i : null);
});
element.addEventListener("mouseleave", () => setHover(null));
element.addEventListener("click", e => { const t = e.target.closest("[data-i]"); if (t) select(t.dataset.i); });
element.addEventListener("keydown", e => {
  const v = view(), n = v ? Number(v.dataset.n) : 0;
  if (!n || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(e.key)) return;
  e.preventDefault();
  const cur = sel === null ? -1 : Number(sel);
  const next = {ArrowLeft: Math.max(0, cur - 1), ArrowRight: Math.min(n - 1, cur + 1), Home: 0, End: n - 1}[e.key];
  select(String(next));
  setHover(String(next));
});
// The answer's box keeps its newest line in sight while it grows, unless the reader scrolled up in it.
element.addEventListener("scroll", e => {
  const t = e.target;
  if (t.classList && t.classList.contains("colm-text")) follow = t.scrollTop + t.clientHeight >= t.scrollHeight - 8;
}, true);
watch("value", () => {
  const v = view(), k = v ? v.dataset.key : "", text = element.querySelector(".colm-text");
  if (k !== key) { key = k; sel = null; hover = null; follow = true; hideTip(); }
  if (follow && text) text.scrollTop = text.scrollHeight;
  if (sel !== null) mark("colm-sel", sel, true);
  if (hover !== null) { mark("colm-hl", hover, true); showTip(hover); }
});
"""

CSS = f"""
.colm-view {{ outline: none; }}
.colm-text {{ font-family: var(--font-mono); font-size: var(--text-md); line-height: 1.7; white-space: pre-wrap;
  overflow-wrap: anywhere; padding: 6px 2px; max-height: 24em; overflow-y: auto; }}
.colm-text.colm-small {{ font-size: var(--text-sm); max-height: 18em; }}
.colm-tok {{ border-radius: 2px; box-decoration-break: clone; -webkit-box-decoration-break: clone; cursor: pointer; }}
.colm-tok.colm-expert {{ background: {C['expert']}; color: #000; }}
.colm-tok.colm-flip {{ background: {C['flip']}; color: #000; }}
.colm-tok.colm-special::after {{ content: attr(data-label); font-size: 0.75em; opacity: 0.7; }}
.colm-tok.colm-hl {{ outline: 2px solid var(--body-text-color); }}
.colm-tok.colm-sel {{ outline: 3px solid var(--body-text-color); outline-offset: 1px; }}
.colm-legend {{ display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: var(--text-sm); margin: 2px 0 4px; }}
.colm-key {{ display: inline-flex; align-items: center; gap: 6px; }}
.colm-sw {{ display: inline-block; width: 14px; height: 14px; border-radius: 2px; }}
.colm-sw.colm-base {{ background: {C['base']}; }}
.colm-sw.colm-expert {{ background: {C['expert']}; }}
.colm-sw.colm-flip {{ background: {C['flip']}; }}
.colm-sw.colm-line {{ height: 0; width: 22px; border-top: 2px dashed {C['threshold']}; border-radius: 0; }}
.colm-banner {{ border: 2px dashed {C['flip']}; border-radius: 4px; padding: 4px 8px; margin-bottom: 4px;
  font-weight: 600; }}
.colm-previewing .colm-text {{ opacity: 0.85; }}
.colm-chart {{ display: grid; grid-template-columns: 34px 1fr; grid-template-rows: 200px auto; margin-top: 6px;
  font-size: var(--text-sm); color: {viz.INK}; }}
.colm-ylabels {{ position: relative; }}
.colm-ylabels span {{ position: absolute; right: 6px; transform: translateY(50%); }}
.colm-plot {{ position: relative; border-left: 1px solid {viz.GRID}; border-bottom: 1px solid {viz.GRID}; }}
.colm-grid {{ position: absolute; left: 0; right: 0; border-top: 1px solid {viz.GRID}; pointer-events: none; }}
.colm-cols {{ position: absolute; inset: 0; display: flex; }}
.colm-col {{ position: relative; flex: 1 1 0; min-width: 0; cursor: pointer; }}
.colm-col.colm-hl {{ background: rgba(136,136,136,0.18); }}
.colm-col.colm-sel {{ background: rgba(136,136,136,0.32); }}
.colm-bar {{ position: absolute; bottom: 0; left: 12%; right: 12%; min-height: 1px; }}
.colm-bar.colm-base {{ background: {C['base']}; }}
.colm-bar.colm-expert {{ background: {C['expert']}; }}
.colm-bar.colm-flip {{ background: {C['flip']}; }}
.colm-eta {{ position: absolute; left: 0; right: 0; height: 0; border-top: 2px dashed {C['threshold']};
  pointer-events: none; }}
.colm-eta.colm-pending {{ border-top-color: {C['flip']}; }}
.colm-eta span {{ position: absolute; right: 2px; bottom: 2px; background: var(--background-fill-primary);
  padding: 0 3px; }}
.colm-tip {{ position: absolute; z-index: 5; max-width: min(34em, 100%); max-height: 100%; overflow: hidden;
  white-space: pre-wrap; overflow-wrap: anywhere; font-family: var(--font-mono); font-size: 12px; line-height: 1.35;
  background: #fff; color: #000; border: 1px solid {C['threshold']}; border-radius: 4px; padding: 4px 6px;
  pointer-events: none; box-shadow: 0 2px 6px rgba(0,0,0,0.25); }}
.colm-xlabel {{ grid-column: 2; text-align: center; padding-top: 2px; }}
.colm-empty p {{ opacity: 0.75; }}
.colm-dropped {{ text-decoration: line-through; text-decoration-color: {C['flip']}; text-decoration-thickness: 2px;
  opacity: 0.6; }}
.colm-corrections {{ font-size: var(--text-sm); border-left: 3px solid {C['flip']}; padding: 2px 8px; margin: 4px 0; }}
.colm-corrections ul {{ margin: 2px 0 0 1.2em; padding: 0; }}
"""
