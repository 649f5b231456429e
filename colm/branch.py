"""What-if at one token: keep a trace's steps before a position, have a chosen model write that position, and let
the trace's own policy continue from the cached prefix.

One mechanism with re-decode (colm.decode) and backtracking: "crop to t and continue".  Both models' rows are cropped
to the prefix before generated position t (the expert to at most that, so at least one token stays pending for its
next catch-up), the base re-fed its last kept token to rebuild the decoder's state at t, and the loop runs on with a
*force map* {position: "base" | "expert"} on the decode state that ``CoLLM.decode_one`` applies over the policy.
The result equals a decode from scratch under the same policy with the same forced choices (tests/test_branch.py).

Forced positions are recorded on the steps (``Step.forced``) and in the JSON (``forced_positions``).  A later
threshold re-decode keeps the forced positions before its first flipped decision (the search skips them) and
drops those after it, whose text is rewritten (``CoLLM.redecode_stream``).  A branch of a branch keeps the first
branch's forced positions that lie before the new one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Mapping

import torch

from .models import ColmError
from .policy import Policy
from .prompts import Detok, check_max_new
from .trace import Step, Trace

SOURCES = ("base", "expert")


@dataclass(frozen=True)
class Resumed(Policy):
    """A policy picked up at generated position ``drawn``: the random policy's generators first replay the draws
    the kept steps made (one per step, as ``decode_one`` makes them), so its later draws are a fresh decode's."""
    drawn: int = 0

    def rngs(self, keys) -> list[torch.Generator]:
        gens = super().rngs(keys)
        if self.name == "random":
            for g in gens:
                for _ in range(self.drawn):
                    torch.rand((), generator=g)
        return gens


def resumed(policy: dict | Policy, t: int) -> Resumed:
    """A trace's policy (its ``describe()`` dict, or a Policy) continued from generated position ``t``."""
    d = policy.describe() if isinstance(policy, Policy) else dict(policy)
    names = {f.name for f in fields(Policy)}      # a trace's policy may carry more (course correction's settings)
    return Resumed(**{k: v for k, v in d.items() if k in names}, drawn=t)


class Branching:
    """CoLLM's branch methods, kept apart from the decode loop they drive (colm.decode stays one small ladder)."""

    def branch_stream(self, trace: Trace, position: int, source: str, max_new_tokens: int = 256,
                      stop: threading.Event | None = None) -> Iterator[Trace]:
        """Keep ``trace``'s steps before ``position``, have ``source`` ("base" or "expert") write ``position``, then
        continue under the trace's own policy; yield the new Trace after every token.

        ``position`` is a generated position of ``trace`` (0 .. len(steps) - 1) below ``max_new_tokens``.  The new
        trace takes over ``trace``'s decode state (``trace`` can be neither branched nor re-decoded again); it ends by
        the one end-of-answer rule (``end_reason``).  A random policy continues its draws as ``stream(key=0)``
        would.  Errors (bad position or source, a trace without state) are raised here, before anything is cropped.
        """
        self._check_branch(trace, position, source)
        return self.resume_stream(trace, position, {position: source}, max_new_tokens=max_new_tokens, stop=stop)

    def branch(self, trace: Trace, position: int, source: str, max_new_tokens: int = 256) -> Trace:
        """``branch_stream`` to the end."""
        *_, tr = self.branch_stream(trace, position, source, max_new_tokens)
        return tr

    def resume_stream(self, trace: Trace, t: int, force: Mapping[int, str] | None = None,
                      policy: Policy | None = None, max_new_tokens: int = 256,
                      stop: threading.Event | None = None) -> Iterator[Trace]:
        """Crop ``trace`` to its steps before generated position ``t`` and continue under ``policy`` (default: the
        trace's own), with the writers in ``force`` ({position >= t: "base" | "expert"}) overriding it: the
        primitive under ``branch`` and backtracking.  The trace's decode state moves to the new trace."""
        st = self._state_of(trace, "continued")
        if not (isinstance(t, int) and 0 <= t <= len(trace.steps)):
            raise ColmError(f"cannot continue from position {t!r}: the answer has {len(trace.steps)} tokens")
        force = dict(force or {})
        if any(not isinstance(k, int) or k < t or v not in SOURCES for k, v in force.items()):
            raise ColmError(f"force maps positions from {t} on to 'base' or 'expert', got {force!r}")
        max_new_tokens = check_max_new(max_new_tokens)
        if t >= max_new_tokens:
            raise ColmError(f"position {t} lies past max_new_tokens={max_new_tokens}")
        policy = resumed(policy or trace.policy, t)
        if policy.needs_head and self.head is None:
            raise ColmError("the colm policy needs a deferral head")
        return self._resume(trace, st, t, force, policy, max_new_tokens, stop)

    # -- the ladder under it ------------------------------------------------------------------------------
    def _check_branch(self, trace: Trace, position, source) -> None:
        self._state_of(trace, "branched")
        if source not in SOURCES:
            raise ColmError(f"source must be 'base' or 'expert', got {source!r}")
        n = len(trace.steps)
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < n:
            raise ColmError(f"position must be one of the answer's positions 0..{n - 1}, got {position!r}")

    @staticmethod
    def _state_of(trace: Trace, what: str):
        st = trace.state
        if st is None or st.closed or len(st.seqs) != 1:
            raise ColmError(f"this trace cannot be {what} (no decode state kept: it was released, re-decoded or "
                            "branched already, or came from a batch); run generate again")
        return st

    def _crop_to(self, st, t: int) -> None:
        """Rows of a one-row state back to the decoder's state before generated position t: h [1, H] and
        logits [1, V] after the base re-reads the last kept token; the expert holds at most the tokens before it."""
        keep = st.prompt_lens[0] + t
        with self._lock, torch.inference_mode():
            self.pair.base.crop(st.base_rows, [keep - 1])
            self.pair.expert.crop(st.expert_rows, [min(st.expert_rows.lengths[0], keep - 1)])
            st.seqs[0] = st.seqs[0][:keep]
            out = self._roomy(self.pair.base.feed, st.base_rows, [[st.seqs[0][-1]]], keep=1, hidden=True)
        st.h, st.logits = out.hidden, out.logits[0][-1:].clone()

    def _resume(self, trace: Trace, st, t: int, force: dict, policy: Policy, max_new_tokens: int,
                stop) -> Iterator[Trace]:
        st.last_used = -1.0          # in use: not to be evicted while it continues
        t0 = time.perf_counter()
        try:
            self._crop_to(st, t)
        except BaseException:
            trace.release()          # a half-cropped state matches no trace
            raise
        st.force = [force]
        tr = self._new_trace(trace.prompt, trace.prompt_ids, policy)
        tr.steps = [Step(**asdict(s)) for s in trace.steps[:t]]
        tr.expert_calls = sum(s.source == "expert" for s in tr.steps)
        tr.reused_steps = t
        tr.rollbacks = [r for r in trace.rollbacks if r["position"] < t]   # corrections in the kept text stand
        tr.state, trace.state = st, None
        tr.prefill_seconds = time.perf_counter() - t0
        yield from self._follow(tr, Detok.resume(self.pair.tokenizer, tr.steps), policy, max_new_tokens, stop, 0)
