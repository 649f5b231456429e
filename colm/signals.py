"""Where to double-check an answer: per-position fragility signals read off a Trace's steps, the flags they raise,
and one answer-level score.  Shared by the page's double-check markers and backtracking's model detectors.

Signals at a generated position (each in [0, 1], higher = more fragile; NaN where what it needs is unknown):
    unsure    1 - P_writer(token): the model that wrote the token gave it little probability
    margin    1 - (p1 - p2) of the writer's top-k: its top two candidates were close
    disagree  P_other(its top token) - P_other(token written), where the other model's top-k is known (the base's
              always; the expert's only where a catch-up covered the position): how strongly the model that did not
              write prefers another token
    near      exp(-|logit p_defer - logit η|): the decision to defer was a near thing (colm policy only)
Probabilities come from the recorded top-k; a token outside the other model's top-k counts as probability 0.

What they are worth (bench/flags_auroc.py: the 200 committed dev Co-LLM answers at η = 0.145, re-scored teacher-
forced on llama.cpp; positive class a wrong final answer): none predicts a wrong answer better than the answer's
length.  Length scores AUROC 0.83, mostly because half the answers are cut off at 256 tokens and nearly all of
those are wrong; ``answer_score`` scores 0.57, the best of 40 candidate aggregates 0.69.  Among finished answers
``answer_score`` scores 0.64 against length's 0.58, an interval for the difference that spans 0.  So the flags say
where a model was unsure or the two disagreed, not that the answer is wrong; ``VERDICT`` says so in words, and a page
must not present them as error detectors (``BEATS_LENGTH``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .trace import Step, Trace

KINDS = ("unsure", "margin", "disagree", "near")
# A flag is raised where a signal reaches its cut-off: the writer gave its token under a half, its top two lay
# within 0.2 of each other, the other model put half its mass more on another token, p_defer within a factor of
# e^0.25 in odds of η.
CUTOFFS = {"unsure": 0.5, "margin": 0.8, "disagree": 0.5, "near": math.exp(-0.25)}


BEATS_LENGTH = False
VERDICT = ("On 200 dev answers these flags did not predict a wrong final answer better than the answer's length: "
           "they mark where a model was unsure or the two models disagreed, not where the answer is wrong.")


@dataclass(frozen=True)
class Flag:
    position: int       # generated position, as Step.position
    kind: str           # one of KINDS
    score: float        # the signal there, in [0, 1]
    reason: str         # one line for a reader


def _prob(topk, token_id: int) -> float:
    """P(token) from a recorded top-k [(id, text, p), ...]; 0 when the token is not among them."""
    return next((p for i, _, p in topk if i == token_id), 0.0)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def writer_topk(step: Step):
    return step.expert_topk if step.source == "expert" else step.base_topk


def other_topk(step: Step):
    return step.base_topk if step.source == "expert" else step.expert_topk


def step_signals(step: Step, threshold: float | None = None) -> dict[str, float]:
    """The four signals at one step (NaN where unknown)."""
    nan = float("nan")
    mine, theirs = writer_topk(step), other_topk(step)
    out = dict.fromkeys(KINDS, nan)
    if mine:
        out["unsure"] = 1.0 - _prob(mine, step.token_id)
        p = sorted((q for *_, q in mine), reverse=True) + [0.0]
        out["margin"] = 1.0 - (p[0] - p[1])
    if theirs:
        out["disagree"] = max(0.0, theirs[0][2] - _prob(theirs, step.token_id))
    if threshold is not None and math.isfinite(step.p_defer):
        out["near"] = math.exp(-abs(_logit(step.p_defer) - _logit(threshold)))
    return out


def trace_threshold(trace: Trace) -> float | None:
    """η of a threshold (colm) trace, else None: only there is p_defer near η a near thing."""
    return float(trace.policy["threshold"]) if trace.policy.get("name") == "colm" else None


def signals(trace: Trace, threshold: float | None = None) -> list[dict[str, float]]:
    """Per generated position, the four signals; ``threshold`` defaults to the trace's own η."""
    thr = trace_threshold(trace) if threshold is None else threshold
    return [step_signals(s, thr) for s in trace.steps]


def _reason(step: Step, kind: str, score: float, threshold: float | None) -> str:
    who, other = step.source, "base" if step.source == "expert" else "expert"
    if kind == "unsure":
        return f"the {who} wrote this token with only {1 - score:.0%} probability"
    if kind == "margin":
        return f"the {who}'s top two candidates were within {1 - score:.0%} of each other"
    if kind == "disagree":
        top = other_topk(step)[0]
        return f"the {other} would have written {top[1]!r} ({top[2]:.0%}) instead"
    return f"p_defer {step.p_defer:.2f} was close to the threshold {threshold:.2g}"


def flags(trace: Trace, threshold: float | None = None, kinds: Sequence[str] = KINDS,
          cutoffs: dict[str, float] | None = None) -> list[Flag]:
    """Fragile positions of ``trace``: one Flag per (position, kind) whose signal reaches its cut-off, by
    position."""
    thr = trace_threshold(trace) if threshold is None else threshold
    cut = {**CUTOFFS, **(cutoffs or {})}
    out = []
    for step in trace.steps:
        sig = step_signals(step, thr)
        for kind in kinds:
            if sig[kind] >= cut[kind]:      # NaN compares False: no flag where the signal is unknown
                out.append(Flag(step.position, kind, sig[kind], _reason(step, kind, sig[kind], thr)))
    return out


def answer_score(trace: Trace, kind: str = "unsure", top: int = 5, threshold: float | None = None) -> float:
    """How likely the final answer is wrong, as the mean of the ``top`` highest ``kind`` signals over the answer
    (NaN for an empty answer): a few very unsure tokens mark a wrong answer; a mean over every token would dilute
    them in a long answer, and a maximum would grow with length alone."""
    vals = sorted((v[kind] for v in signals(trace, threshold) if not math.isnan(v[kind])), reverse=True)[:top]
    return sum(vals) / len(vals) if vals else float("nan")
