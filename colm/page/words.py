"""How a step, a policy and an answer are said in words: one wording for the hover box, the details panel, the
before/after panel and the Compare table.  Plain text (callers escape it for HTML)."""
from __future__ import annotations

import re

from .. import viz
from ..data import extract_answer, normalize_number

WRITER = {"base": "the base model", "expert": "the expert"}


def p_text(step) -> str:
    p = viz.p_of(step)
    return "n/a" if p is None else f"{p:.3f}"


def corrected_positions(trace) -> set[int]:
    """Positions the expert wrote because course correction rolled their line back (colm.backtrack): from each
    rollback's position, the forced steps that follow it without a gap."""
    out = set()
    for r in getattr(trace, "rollbacks", []):
        i = r["position"]
        while i < len(trace.steps) and trace.steps[i].forced:
            out.add(i)
            i += 1
    return out


def why(step, policy: dict, corrected: bool = False) -> str:
    """Who wrote ``step`` and by which rule.  Steps a user forced (what-if) or course correction gave to the expert
    (``corrected``) say so before any rule."""
    writer, p = WRITER.get(step.source, step.source), p_text(step)
    if corrected:
        return f"course correction: the checker found this line wrong, so {writer} rewrote it (p_defer {p})"
    if getattr(step, "forced", False):
        return f"you chose {writer} here (what-if); the head's p_defer was {p}"
    name = policy.get("name")
    if name == "colm":
        eta = viz.fmt_threshold(policy.get("threshold", 0.5))
        value = viz.p_of(step)
        if value is None:
            return f"no deferral head ran; {writer} wrote it"
        above = value > float(policy.get("threshold", 0.5))
        if above == (step.source == "expert"):
            return (f"p_defer {p} > η {eta}: the head deferred this token to the expert" if above
                    else f"p_defer {p} ≤ η {eta}: the base model kept this token")
        return f"p_defer {p} {'>' if above else '≤'} η {eta}, yet {writer} wrote it (not by this threshold's rule)"
    if name == "base":
        return f"base only: the base model writes every token (the head's p_defer {p} is not used)"
    if name == "expert":
        return f"expert only: the expert writes every token (the head's p_defer {p} is not used)"
    if name == "random":
        return (f"random: a draw at rate {policy.get('rate', 0):.0%} gave it to {writer} "
                f"(the head's p_defer {p} is not used)")
    if name == "confidence":
        top = step.base_topk[0][2] if step.base_topk else float("nan")
        bound = viz.fmt_threshold(policy.get("min_prob", 0.5))
        rel = "<" if step.source == "expert" else "≥"
        return f"the base model's top probability {top:.1%} {rel} {bound}: {writer} wrote it"
    return f"{writer} wrote it"


def topk_text(cands, n: int = 3) -> str:
    """"' the' 61.0% · ' a' 20.0%": the first ``n`` candidates, whitespace made visible."""
    if not cands:
        return "not computed"
    return " · ".join(f"'{viz.display_token(t, visible=True)}' {p:.1%}" for _, t, p in list(cands)[:n])


def tip_text(step, policy: dict, corrected: bool = False) -> str:
    """The chart's hover box for one position (plain text, one line per fact)."""
    lines = [f"#{step.position} '{viz.label_text(step)}' from {WRITER.get(step.source, step.source)}",
             why(step, policy, corrected),
             f"base: {topk_text(step.base_topk)}"]
    if step.expert_topk:
        lines.append(f"expert: {topk_text(step.expert_topk)}")
    return "\n".join(lines)


def final_answer(text: str) -> str:
    """What a reader calls the answer: the number of a '#### n' line, otherwise the last non-empty line."""
    if re.search(r"####\s*\$?\s*-?[\d,]*\.?\d", text or ""):
        return extract_answer(text) or ""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    last = viz.display_token(lines[-1]) if lines else ""
    return last if len(last) <= 60 else last[:57] + "…"


def is_right(answer: str, gold: str | None) -> bool | None:
    """Whether ``answer`` is the known ``gold`` number; None where nothing is known."""
    if gold is None:
        return None
    return answer != "" and normalize_number(answer) == normalize_number(str(gold))
