"""Course correction: check each line of an answer as it completes; when a detector finds the line wrong, crop the
answer back to the line's first token, have the expert write that line, then let the answer's own policy go on.

The crop is the decoder's crop-and-continue (``CoLLM.resume_stream``) and the expert's line a force map over it, so
what follows a rollback is exactly a decode from the kept prefix with those positions forced to the expert
(tests/test_backtrack.py).  The expert's positions are ``Step.forced``: a later threshold re-decode keeps them
where they lie before its first changed decision, as it keeps a what-if's.

Bounded: at most ``max_retries`` rollbacks an answer, and a line is rolled back once (the expert's line stands even
where the checker still disagrees with it: the same span is never retried with the same help).  Every rollback is
kept on the trace (``Trace.rollbacks``): where, which detector and why, the text dropped and the text that replaced
it, and what the dropped span cost the expert.

Only the arithmetic checker detects: colm.signals found no model signal that predicts a wrong answer better than
the answer's length (docs/BENCHMARKS.md), so none rolls anything back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from .checks import check_text
from .models import ColmError
from .policy import Policy
from .trace import Trace

Detector = Callable[[str, int], "tuple[int, str] | None"]   # (text, first char to check) -> (line start, reason)


def arithmetic(text: str, since: int) -> tuple[int, str] | None:
    """The first wrong computation (colm.checks) on a completed line starting at or after character ``since``."""
    done = text[:text.rfind("\n") + 1]
    for c in check_text(done):
        if c.line_start >= since and not c.ok:
            return c.line_start, f"{c.expression} = {c.claimed:g}, but it is {c.actual:g}"
    return None


DETECTORS: dict[str, Detector] = {"arithmetic": arithmetic}


@dataclass(frozen=True)
class Backtrack:
    max_retries: int = 2                          # rollbacks an answer at most
    detectors: tuple[str, ...] = ("arithmetic",)  # names in DETECTORS, run on every completed line
    max_line: int = 256                           # positions forced to the expert for one line (it ends sooner)
    line_break: str = "\n"                        # what ends a line: each is checked once, when it is complete

    def __post_init__(self):
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ColmError(f"unknown detector(s) {unknown or '(none)'}; known: {', '.join(DETECTORS)}")
        if not self.line_break:
            raise ColmError("line_break must be a non-empty string")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise ColmError(f"max_retries must be a whole number >= 0, got {self.max_retries!r}")

    def describe(self) -> dict:
        return {"max_retries": self.max_retries, "detectors": list(self.detectors)}


@dataclass
class Rollback:
    position: int             # first generated position of the rewritten line
    detector: str
    reason: str               # e.g. "12 * 7 = 86, but it is 84"
    discarded: str            # the text dropped (the faulty line as it was written)
    replacement: str = ""     # the expert's line (filled once it is complete)
    expert_written: int = 0   # tokens of the dropped text the expert had written (its work thrown away)


def _starts(trace: Trace) -> list[int]:
    """Character offset of every step in ``trace.text``."""
    out, n = [], 0
    for s in trace.steps:
        out.append(n)
        n += len(s.text)
    return out


def _position_of(trace: Trace, char: int) -> int:
    """The first step that starts at or after character ``char`` (a token spanning a line break stays kept)."""
    return next((i for i, c in enumerate(_starts(trace)) if c >= char), len(trace.steps))


def detect_done(bt: Backtrack, text: str) -> tuple[int, str, str] | None:
    """The first wrong line a backtracking decode would have rolled back in a finished ``text``, if any: (line
    start, detector, reason).  None means backtracking would have left this answer as it is."""
    if bt.max_retries == 0 or bt.line_break not in text:
        return None
    return _detect(bt, text[:text.rfind(bt.line_break) + len(bt.line_break)], 0)


def _detect(bt: Backtrack, text: str, since: int) -> tuple[int, str, str] | None:
    hits = [(hit[0], name, hit[1]) for name in bt.detectors if (hit := DETECTORS[name](text, since))]
    return min(hits) if hits else None


class _Segment(threading.Event):
    """Ends one segment (the stream between two crops): set here to roll back or go on, or by the caller's Stop,
    which the decoder (and a remote expert's request in flight) then sees at once."""

    def __init__(self, outer: threading.Event | None):
        super().__init__()
        self.outer = outer

    def is_set(self) -> bool:
        return super().is_set() or (self.outer is not None and self.outer.is_set())


class _Watch:
    """What the backtracker has seen of one answer: the rollbacks so far, the lines checked, the line the expert
    is rewriting.  ``after(trace)`` says what to do once a token is out: nothing, roll back, or go on."""

    def __init__(self, bt: Backtrack):
        self.bt, self.rollbacks, self.tried = bt, [], set()
        self.since = 0                          # characters of the answer already checked
        self.retry: Rollback | None = None      # the rollback whose expert line is being written

    def after(self, tr: Trace):
        text, lb = tr.text, self.bt.line_break
        if self.retry is not None:              # the expert's line: done at its first line break
            start = sum(len(s.text) for s in tr.steps[:self.retry.position])
            end = text.find(lb, start)
            self.retry.replacement = text[start:] if end < 0 else text[start:end + len(lb)]
            if end < 0:
                return None
            self.since, self.retry = end + len(lb), None
            return ("continue", _position_of(tr, self.since))
        if len(self.rollbacks) >= self.bt.max_retries or lb not in text[self.since:]:
            return None
        hit = _detect(self.bt, text, self.since)
        if hit is None or _position_of(tr, hit[0]) in self.tried:
            self.since = text.rfind(lb) + len(lb)
            return None
        pos = _position_of(tr, hit[0])
        dropped = tr.steps[pos:]
        self.retry = Rollback(pos, hit[1], hit[2], "".join(s.text for s in dropped),
                              expert_written=sum(s.source == "expert" for s in dropped))
        self.rollbacks.append(self.retry)
        self.tried.add(pos)
        return ("rollback", pos)


def backtrack_stream(dec, prompt, policy: Policy, max_new_tokens: int = 256, backtrack: Backtrack = Backtrack(),
                     stop: threading.Event | None = None, chat: bool | None = None) -> Iterator[Trace]:
    """``dec.stream`` with course correction; yields the growing Trace after every token (a new Trace object after
    each crop: the decode state moves on to it).  Every yielded trace carries the answer's ``policy`` with the
    backtrack settings, and its rollbacks so far as dicts (``Rollback``)."""
    described = {**policy.describe(), "backtrack": backtrack.describe()}
    watch = _Watch(backtrack)
    seg = _Segment(stop)
    stream = dec.stream(prompt, policy, max_new_tokens, stop=seg, chat=chat)
    fed = 0                        # the expert's catch-up tokens in segments before this one
    t0 = time.perf_counter()
    while True:
        action = tr = None
        for i, tr in enumerate(stream):
            if i == 0:
                tr.expert_fed += fed       # each segment is a new Trace: the count runs on across them
            if action is None:
                action = ("stop",) if seg.is_set() else watch.after(tr)
                if action is not None:
                    seg.set()      # the segment yields once more (cancelled) and ends
            tr.policy, tr.rollbacks = described, [asdict(r) for r in watch.rollbacks]
            # One answer, however many segments: its time from the start, nothing "reused" from another answer.
            tr.decode_seconds, tr.reused_steps = time.perf_counter() - t0, 0
            yield tr
        done = action is None or action[0] == "stop" or (action[0] == "continue" and tr.stop_reason != "cancelled")
        if done:
            return
        fed = tr.expert_fed
        seg = _Segment(stop)
        if action[0] == "rollback":
            pos = action[1]
            force = {p: "expert" for p in range(pos, min(pos + backtrack.max_line, max_new_tokens))}
            stream = dec.resume_stream(tr, pos, force, policy, max_new_tokens, seg)
        else:                      # the expert's line is written: the policy's own choices from here on
            stream = dec.resume_stream(tr, action[1], {}, policy, max_new_tokens, seg)


def generate_backtracking(dec, prompt, policy: Policy, max_new_tokens: int = 256,
                          backtrack: Backtrack = Backtrack(), chat: bool | None = None) -> Trace:
    """``backtrack_stream`` to the end."""
    *_, tr = backtrack_stream(dec, prompt, policy, max_new_tokens, backtrack, chat=chat)
    return tr
