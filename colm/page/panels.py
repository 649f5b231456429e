"""The panels around the view: the selected token's details, what a threshold change did (or would do), progress
while decoding, and the Compare table.  HTML or Markdown strings; model text escaped as in colm.page.view."""
from __future__ import annotations

import html

from .. import viz
from .words import WRITER, corrected_positions, final_answer, is_right, why

NO_SELECTION = '<div class="colm-details colm-muted">Click a token or a bar to see who wrote it and why.</div>'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _tok(text: str) -> str:
    return f"<code>'{_e(viz.display_token(text, visible=True))}'</code>"


def _topk_table(name: str, cands, chosen: int, colour: str) -> str:
    rows = []
    for tid, text, p in cands:
        mark = " ← written" if tid == chosen else ""
        rows.append(f'<tr{" class=colm-chosen" if mark else ""}><td>{_tok(text)}</td><td>{p:.1%}</td>'
                    f'<td><i class="colm-pbar" style="width:{100 * p:.1f}%;background:{colour}"></i>{mark}</td></tr>')
    return f'<table class="colm-topk"><caption>{_e(name)}</caption>{"".join(rows)}</table>'


def details_html(trace, position) -> str:
    """Everything known about one position: the token, who wrote it and by which rule, the base's top-k and, where
    the expert read that position, the expert's.  Actions on a position (what-if, flags) go below this panel."""
    if trace is None or position is None or not 0 <= int(position) < len(trace.steps):
        return NO_SELECTION
    s = trace.steps[int(position)]
    colour = viz.PALETTE[s.source].hex if s.source in viz.PALETTE else viz.INK
    head = (f'<div class="colm-dhead"><b>Token #{s.position}</b> of {len(trace.steps)}: {_tok(viz.label_text(s))}, '
            f'written by <b style="color:{colour}">{WRITER.get(s.source, s.source)}</b></div>')
    tables = [_topk_table("the base model's top candidates", s.base_topk, s.token_id, viz.PALETTE["base"].hex)]
    if s.expert_topk:
        tables.append(_topk_table("the expert's top candidates", s.expert_topk, s.token_id, viz.PALETTE["expert"].hex))
    else:
        tables.append('<p class="colm-muted">The expert\'s top candidates are not known here: the expert runs only '
                      'when a token is deferred.  On llama.cpp and on an expert server its view is kept for the '
                      'deferred tokens only; on torch also for the tokens it caught up on then.</p>')
    corrected = s.position in corrected_positions(trace)
    return (f'<div class="colm-details">{head}<p>Why: {_e(why(s, trace.policy, corrected))}.</p>'
            f'<div class="colm-topks">{"".join(tables)}</div></div>')


def preview_html(trace, threshold: float) -> str:
    """While the slider moves: which decisions the new threshold would change, before any model runs."""
    if trace is None or trace.policy.get("name") != "colm":
        return ""
    old = float(trace.policy.get("threshold", 0.5))
    if threshold == old:
        return ""
    flipped = viz.flips(trace, threshold)
    eta = viz.fmt_threshold(threshold)
    if not flipped:
        return (f'<div class="colm-changes colm-pending-box"><b>Preview, η {viz.fmt_threshold(old)} → {eta}:</b> '
                f'no decision changes; the answer would stay as it is.</div>')
    first = trace.steps[flipped[0]]
    to = "expert" if first.source == "base" else "base model"
    kept = (f"keeps tokens 0–{first.position - 1}" if first.position else "keeps none of them")
    return (f'<div class="colm-changes colm-pending-box"><b>Preview, η {viz.fmt_threshold(old)} → {eta}: not '
            f'decoded yet.</b> {len(flipped)} decision{"s" if len(flipped) != 1 else ""} would change writer '
            f'({viz.PALETTE["flip"].name}). The first is token #{first.position} {_tok(viz.label_text(first))}, '
            f'which would go to the {to}; letting go re-decodes from there and {kept}.</div>')


def _first_difference(a, b) -> int | None:
    for i, (x, y) in enumerate(zip(a.steps, b.steps)):
        if x.token_id != y.token_id:
            return i
    return None if len(a.steps) == len(b.steps) else min(len(a.steps), len(b.steps))


def _n_expert(trace) -> int:
    return sum(s.source == "expert" for s in trace.steps)


def _snippet(trace, start: int, n: int = 12) -> str:
    text = "".join(s.text for s in trace.steps[start:start + n])
    return f"<code>{_e(viz.display_token(text, visible=True)) or '(end)'}</code>"


def _moved(before, after, upto: int) -> str:
    """Positions before ``upto`` (same token on both sides) whose writer changed, in words; "" when none did."""
    pairs = list(zip(before.steps[:upto], after.steps))
    to = sum(x.source == "base" and y.source == "expert" for x, y in pairs)
    back = sum(x.source == "expert" and y.source == "base" for x, y in pairs)
    return (f"{to} token(s) moved to the expert and {back} back to the base model, the two models agreeing on "
            f"them" if to or back else "")


def _before_after(before, after, lines: list[str], label0: str, label1: str) -> str:
    """The panel after a decode that reused ``before``'s prefix: where the text first differs, the counts, and a
    table of the final answers, tokens and expert shares side by side."""
    d = _first_difference(before, after)
    moved = _moved(before, after, len(before.steps) if d is None else d)
    if d is None:
        lines.append(f"The text is the same{'; ' + moved if moved else ''}.")
    else:
        lines.append(f"The text first differs at token #{d}: before {_snippet(before, d)}, after "
                     f"{_snippet(after, d)}.{' Before that, ' + moved + '.' if moved else ''}")
    rate = 100 * (after.deferral_rate - before.deferral_rate)
    lines.append(f"Expert tokens {_n_expert(before)} → {_n_expert(after)}; deferral {before.deferral_rate:.1%} → "
                 f"{after.deferral_rate:.1%} ({rate:+.1f} points).")
    rows = [("final answer", *(f"<code>{_e(final_answer(t.text)) or '—'}</code>" for t in (before, after))),
            ("tokens", len(before.steps), len(after.steps)),
            ("from the expert", f"{_n_expert(before)} ({before.deferral_rate:.1%})",
             f"{_n_expert(after)} ({after.deferral_rate:.1%})")]
    table = "".join(f"<tr><th>{k}</th><td>{a}</td><td>{b}</td></tr>" for k, a, b in rows)
    return (f'<div class="colm-changes colm-done-box"><p>{"<br>".join(lines)}</p><table class="colm-ba">'
            f'<tr><th></th><th>{_e(label0)}</th><th>{_e(label1)}</th></tr>{table}</table></div>')


def changes_html(before, after) -> str:
    """After a re-decode: what changed between ``before`` and ``after`` (same prompt, another threshold)."""
    eta0, eta1 = (viz.fmt_threshold(t.policy.get("threshold")) for t in (before, after))
    start = (f"from token #{after.reused_steps}; the tokens before it were kept" if after.reused_steps
             else "from the first token")
    return _before_after(before, after, [f"<b>Re-decoded at η = {eta1}</b> (was {eta0}), {start}."],
                         f"before (η = {eta0})", f"after (η = {eta1})")


def other_source(step) -> str:
    return "base" if step.source == "expert" else "expert"


def branch_label(trace, position) -> str:
    """The what-if button's words for the selected position: which model would write it instead."""
    if trace is None or position is None or not 0 <= int(position) < len(trace.steps):
        return "Use the other model here (select a token first)"
    s = trace.steps[int(position)]
    return f"What if {WRITER[other_source(s)]} wrote token #{s.position}?"


def branch_html(before, after, position: int) -> str:
    """After a what-if: token ``position`` rewritten by the other model, the rest continued by the same policy."""
    old, new = before.steps[position], after.steps[position]
    kept = f"; tokens 0–{position - 1} were kept" if position else ""
    head = (f"<b>What-if at token #{position}:</b> {WRITER[new.source]} wrote it ({_tok(viz.label_text(new))}; "
            f"{WRITER[old.source]} had written {_tok(viz.label_text(old))}), then "
            f"{_e(viz.policy_label(after.policy))} continued{kept}.")
    forced = ", ".join(f"#{i}" for i in after.forced_positions)
    note = (f"Forced positions in this answer: {forced}.  A later threshold change keeps those before its first "
            f"changed decision and drops those after it.")
    return _before_after(before, after, [head, note], "before", "after the what-if")


def progress_line(trace, max_new: int) -> str:
    """While decoding: tokens so far, speed, and how long at most is left if the answer runs to ``max_new``."""
    n = len(trace.steps) if trace is not None else 0
    if n == 0:
        return "Reading the prompt…"
    rate = trace.tokens_per_second
    kept = f" ({trace.reused_steps} kept)" if trace.reused_steps else ""
    left = max(max_new - n, 0)
    eta = f"at most {left / rate:.0f} s left" if rate > 0 else "time left not known yet"
    return (f"Decoding… {n} tokens{kept} of at most {max_new} · {rate:.1f} tokens/s · {eta} "
            f"(most answers end sooner)")


def compare_table(rows, gold: str | None) -> str:
    """Markdown: one row per finished decode (label, trace) with its final answer, whether it is right (when the
    prompt is a shipped example with a known answer), tokens, deferral rate and time."""
    head = ("| policy | final answer | correct | tokens | from the expert | time |\n"
            "|---|---|---|---|---|---|")
    out = [head]
    for label, trace in rows:
        ans = final_answer(trace.text)
        right = is_right(ans, gold)
        mark = "—" if right is None else "✓ yes" if right else "✗ no"
        shown = viz.display_token(ans).replace("|", "\\|").replace("`", "'") or "—"
        out.append(f"| {label} | `{shown}` | {mark} | {len(trace.steps)} | {trace.deferral_rate:.1%} | "
                   f"{trace.decode_seconds:.1f} s |")
    known = f"The known answer is **{gold}**." if gold is not None else \
        "No known answer for this prompt (the shipped word problems have one)."
    return "\n".join(out) + "\n\n" + known


CSS = f"""
.colm-muted {{ opacity: 0.75; }}
.colm-details, .colm-changes {{ font-size: var(--text-md); }}
.colm-details p, .colm-changes p {{ margin: 4px 0; }}
.colm-topks {{ display: flex; flex-wrap: wrap; gap: 8px 24px; }}
.colm-topk {{ border-collapse: collapse; font-size: var(--text-sm); }}
.colm-topk caption {{ text-align: left; font-weight: 600; }}
.colm-topk td {{ padding: 1px 6px; }}
.colm-topk td:last-child {{ min-width: 120px; }}
.colm-topk tr.colm-chosen {{ font-weight: 700; }}
.colm-pbar {{ display: inline-block; height: 10px; vertical-align: middle; margin-right: 4px; }}
.colm-pending-box {{ border: 2px dashed {viz.PALETTE['flip'].hex}; border-radius: 6px; padding: 6px 10px; }}
.colm-done-box {{ border: 2px solid {viz.PALETTE['threshold'].hex}; border-radius: 6px; padding: 6px 10px; }}
.colm-ba {{ border-collapse: collapse; font-size: var(--text-sm); }}
.colm-ba th, .colm-ba td {{ padding: 2px 10px; text-align: left; }}
"""
