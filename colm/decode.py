"""The Co-LLM decode loop, engine-agnostic.

A ladder of small functions, gpt-fast style:  ``prefill`` -> ``decode_one`` (one lockstep token for B rows) ->
``CoLLM.stream`` / ``generate`` / ``generate_batch`` / ``redecode_stream``.  Every function returns records
(``Step``, ``Trace``); nothing here prints.  The models sit behind ``colm.engines`` (torch or llama.cpp).

The rule, per generated position t (paper, Sec. 3):
    p_t = sigmoid(head(h_t)),  h_t = base model's final hidden state after x_<t
                                (a confidence head also reads the base's logits there: colm.head)
    x_t = argmax P_expert(. | x_<t)   if policy defers (Co-LLM: p_t > eta)
          argmax P_base(.   | x_<t)   otherwise
The expert is fed lazily: tokens it has not seen wait as *pending* and go through it in one forward pass only when
a position is deferred, so expert forward passes == deferred tokens (its prompt prefill included in the first).

Every answer ends by one rule: one of ``CoLLM.eos_ids`` (the pair's end-of-turn and end-of-text tokens), or, with
``stop_at_answer`` (default), a completed '#### <number>' line (the shared instruction's final line).  Base-only
and expert-only baselines, training rollouts and Co-LLM all decode through this loop, so they all stop alike.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import asdict
from typing import Iterator, Sequence

import torch

from .branch import Branching
from .engines import Interrupted, Pair
from .engines.llamacpp import ContextFull, SlotsExhausted
from .head import DeferralHead
from .models import ColmError
from .policy import POLICIES, Policy  # noqa: F401  (re-exported: colm.decode.Policy is public API)
from .prompts import Detok, check_max_new, clean_text, encode_prompt, ends_answer_line  # noqa: F401
from .state import DecodeState  # noqa: F401  (public as colm.decode.DecodeState too)
from .trace import Step, Trace, TopK, topk_probs, topk_records  # noqa: F401


# ----------------------------------------------------------------------------------------------- decoder
class CoLLM(Branching):
    """A base/expert pair plus a deferral head.  Every call returns its own Trace."""

    def __init__(self, pair: Pair, head: DeferralHead | None = None, top_k: int = 5, max_prompt_tokens: int = 4096,
                 expert_view: str | None = None, stop_at_answer: bool = True):
        """``expert_view``: "all" back-fills the expert's top-k at every position a catch-up covers; "deferred"
        reads the expert's logits at deferred positions only.  Default: "all" on torch, where the extra LM-head rows
        are nearly free, "deferred" on llama.cpp, where each costs about a tenth of an expert step."""
        self.pair, self.head, self.top_k, self.max_prompt_tokens = pair, head, top_k, max_prompt_tokens
        self.stop_at_answer = stop_at_answer
        self.expert_view = expert_view or ("all" if pair.expert.cheap_logits else "deferred")
        if self.expert_view not in ("all", "deferred"):
            raise ColmError(f"expert_view must be 'all' or 'deferred', got {expert_view!r}")
        tok = pair.tokenizer
        eos = set()
        for src in (tok.eos_token_id, getattr(getattr(getattr(pair.base, "model", None), "generation_config", None),
                                              "eos_token_id", None)):
            eos.update(src if isinstance(src, (list, tuple)) else [src] if src is not None else [])
        for special in ("<|im_end|>", "<|endoftext|>"):
            if special in tok.get_vocab():
                eos.add(tok.convert_tokens_to_ids(special))
        self.eos_ids = sorted(eos)
        self.n_vocab = len(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        if head is not None:
            head.to(pair.device)
        self._lock = threading.RLock()          # one engine call at a time; states are opened under it
        self._states: "weakref.WeakSet[DecodeState]" = weakref.WeakSet()

    # -- prompts ------------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Chat messages (or a str, wrapped as one user message) -> token ids; see colm.prompts."""
        # Under the decoder's lock: with encodes from several threads at once, the four-sessions test against a fake
        # server got a wrong first answer about one run in three (the shared HF tokenizer is the suspect); never since.
        with self._lock:
            return encode_prompt(self.pair.tokenizer, prompt, chat, self.max_prompt_tokens)

    def check_room(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request that would run past either model's context window."""
        ctx = min(self.pair.base.n_ctx, self.pair.expert.n_ctx)
        if prompt_len + max_new_tokens > ctx:
            raise ColmError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the models' "
                            f"context of {ctx} tokens")

    # -- rows -----------------------------------------------------------------------------------------------
    def _roomy(self, fn, *args, **kwargs):
        """Call an engine; when its slots or KV cells run out, free the least recently used idle state (kept only
        for a later re-decode) and retry; with none left it is the caller's error.  Engines check room first."""
        while True:
            try:
                return fn(*args, **kwargs)
            except (SlotsExhausted, ContextFull):
                idle = [s for s in list(self._states) if not s.closed and s.last_used >= 0]
                if not idle:
                    raise
                min(idle, key=lambda s: s.last_used).close()

    def _open(self, n: int):
        """n rows on both engines."""
        base = self._roomy(self.pair.base.open, n)
        try:
            return base, self._roomy(self.pair.expert.open, n)
        except BaseException:
            self.pair.base.close(base)
            raise

    @torch.inference_mode()
    def prefill(self, rows: Sequence[list[int]]) -> DecodeState:
        """Run the base on B prompts; the expert sees nothing yet (all of it is pending)."""
        base_rows, expert_rows = self._open(len(rows))
        try:
            out = self._roomy(self.pair.base.feed, base_rows, rows, keep=1, hidden=True)
        except BaseException:
            self.pair.base.close(base_rows)
            self.pair.expert.close(expert_rows)
            raise
        st = DecodeState(self.pair, [list(r) for r in rows], [len(r) for r in rows], base_rows, expert_rows,
                         out.hidden, torch.stack([lg[-1] for lg in out.logits]), -1.0)
        self._states.add(st)
        return st

    @torch.inference_mode()
    def decode_one(self, st: DecodeState, policy: Policy, rngs, active: list[bool], feed: bool):
        """Choose the next token for every active row of ``st`` and (if ``feed``) advance the base past it.

        Returns (tokens [B], deferred [B] bool, p [B], base (probs, ids) [B, k], catch-ups) where catch-ups maps a
        row to (first generated position covered, expert probs [n, k], ids [n, k], tokens the expert was fed).
        """
        B = len(st.seqs)
        p = (self.head.p_defer(st.h, st.logits).cpu() if self.head is not None
             else torch.full((B,), float("nan")))
        base_p, base_i = topk_probs(st.logits, self.top_k)
        on = torch.tensor(active)
        defer = policy.defer(p, base_p[:, 0].cpu(), rngs) & on
        for b in range(B):   # a branch's forced writer overrides the policy at its position (colm.branch)
            if active[b] and (w := st.force[b].get(len(st.seqs[b]) - st.prompt_lens[b])):
                defer[b] = w == "expert"
        token = base_i[:, 0].clone()
        catch = {}
        if bool(defer.any()):
            # Catch-up: every pending token in one expert call.  An engine whose rows share one padded cache
            # (torch) catches all active rows up together; one with rows of their own only the deferring ones.
            who = on if self.pair.expert.shared_cache else defer
            E = st.expert_rows.lengths
            # logits at index j predict token j + 1: generated position g is predicted at P + g - 1
            first = [max(E[b], st.prompt_lens[b] - 1) for b in range(B)]
            if self.expert_view == "deferred":
                first = [len(st.seqs[b]) - 1 for b in range(B)]
            tokens = [st.seqs[b][E[b]:] if who[b] else [] for b in range(B)]
            keep = [len(st.seqs[b]) - first[b] if who[b] else 1 for b in range(B)]
            out = self._roomy(self.pair.expert.feed, st.expert_rows, tokens, keep)
            for b in range(B):
                if who[b]:
                    ep, ei = out.top(b, self.top_k)
                    catch[b] = (first[b] + 1 - st.prompt_lens[b], ep, ei, len(tokens[b]))
                    if defer[b]:
                        token[b] = ei[-1, 0]
        tokens = token.tolist()
        for b in range(B):
            if active[b]:
                st.seqs[b].append(tokens[b])
        if feed:
            out = self._roomy(self.pair.base.feed, st.base_rows, [[tokens[b]] if active[b] else [] for b in range(B)],
                              keep=1, hidden=True)
            for b in range(B):
                if active[b]:
                    st.h[b], st.logits[b] = out.hidden[b], out.logits[b][-1]
        return token, defer, p, (base_p, base_i), catch

    def _run(self, st: DecodeState, traces: list[Trace], detoks: list, policy: Policy, max_new_tokens: int,
             stop: threading.Event | None, keys: Sequence[int]) -> Iterator[None]:
        """Advance all rows in lockstep until each hits EOS or the length; yield after every token."""
        if policy.needs_head and self.head is None:
            raise ColmError("the colm policy needs a deferral head; pass one (or train one with `colm train`)")
        rngs = policy.rngs(keys)
        B = len(traces)
        active = [True] * B
        t0 = time.perf_counter()
        n = len(traces[0].steps)
        tok = self.pair.tokenizer
        if hasattr(self.pair.expert, "watch"):     # an engine that can abandon a slow call (a remote expert)
            self.pair.expert.watch(stop)
        while n < max_new_tokens and any(active):
            if stop is not None and stop.is_set():
                for tr in traces:
                    tr.stop_reason = tr.stop_reason or "cancelled"
                break
            try:
                with self._lock:
                    token, defer, p, (bp, bi), catch = self.decode_one(st, policy, rngs, active, n + 1 < max_new_tokens)
            except Interrupted:      # Stop while a remote expert's request was in flight: nothing was fed
                for tr in traces:
                    tr.stop_reason = tr.stop_reason or "cancelled"
                break
            token_l, defer_l, p_l, bp_l, bi_l = token.tolist(), defer.tolist(), p.tolist(), bp.tolist(), bi.tolist()
            for b, tr in enumerate(traces):
                if not active[b]:
                    continue
                last = None
                if b in catch:
                    # Back-fill the expert's view of every position this catch-up covered.
                    c0, ep, ei, fed = catch[b]
                    tr.expert_fed += fed
                    ep_l, ei_l = ep.tolist(), ei.tolist()
                    for j, (probs, ids) in enumerate(zip(ep_l, ei_l)):
                        if c0 + j < len(tr.steps):
                            tr.steps[c0 + j].expert_topk = topk_records(tok, ids, probs)
                    last = topk_records(tok, ei_l[-1], ep_l[-1])
                    if defer_l[b]:
                        tr.expert_calls += 1
                tr.steps.append(Step(n, token_l[b], detoks[b].push(token_l[b]), "expert" if defer_l[b] else "base",
                                     float(p_l[b]), topk_records(tok, bi_l[b], bp_l[b]), last, n in st.force[b]))
                why = self.end_reason(tr.steps)
                if why:
                    tr.stop_reason, active[b] = why, False
            n += 1
            dt = time.perf_counter() - t0
            for tr in traces:
                tr.decode_seconds = tr.prefill_seconds + dt
            yield
        for tr in traces:
            tr.stop_reason = tr.stop_reason or "length"

    def end_reason(self, steps: list[Step]) -> str | None:
        """The one end-of-answer rule: an end token ("eos"), or a completed '#### <number>' line ("answer")."""
        if steps and steps[-1].token_id in self.eos_ids:
            return "eos"
        if self.stop_at_answer and steps and ends_answer_line([s.text for s in steps[-64:]]):
            return "answer"
        return None

    def _follow(self, tr: Trace, detok, policy: Policy, max_new_tokens: int, stop, key: int) -> Iterator[Trace]:
        """Decode one kept trace to its end, yielding it after every token.  An abandoned or failed decode frees
        its rows; a finished or stopped one keeps them (for a re-decode) and becomes evictable."""
        st = tr.state
        try:
            for _ in self._run(st, [tr], [detok], policy, max_new_tokens, stop, [key]):
                yield tr
        except BaseException:
            tr.release()
            raise
        finally:
            st.last_used = time.monotonic()
        yield tr

    def _new_trace(self, prompt, ids: list[int], policy: Policy) -> Trace:
        return Trace(prompt, ids, policy.describe(), base_model=self.pair.base_id, expert_model=self.pair.expert_id,
                     head=self.head.identity if self.head is not None else "none",
                     head_trained=bool(self.head is not None and self.head.trained), engine=self.pair.engine)

    # -- public ---------------------------------------------------------------------------------------------
    def stream(self, prompt, policy: Policy | None = None, max_new_tokens: int = 256,
               stop: threading.Event | None = None, chat: bool | None = None, key: int = 0) -> Iterator[Trace]:
        """Yield the growing Trace after every token (the same object, updated in place).  The trace keeps its
        decode state (for ``redecode_stream``) until ``trace.release()`` or until it is garbage."""
        policy = policy or self.default_policy()
        max_new_tokens = check_max_new(max_new_tokens)
        ids = self.encode(prompt, chat)
        self.check_room(len(ids), max_new_tokens)
        tr = self._new_trace(prompt, ids, policy)
        t0 = time.perf_counter()
        with self._lock:
            st = self.prefill([ids])
        tr.prefill_seconds = time.perf_counter() - t0
        tr.state = st
        yield from self._follow(tr, Detok(self.pair.tokenizer), policy, max_new_tokens, stop, key)

    def generate(self, prompt, threshold: float | None = None, policy: Policy | None = None,
                 max_new_tokens: int = 256, stop: threading.Event | None = None, chat: bool | None = None) -> Trace:
        """Decode one prompt; ``threshold`` is shorthand for the Co-LLM policy at that threshold."""
        if policy is None:
            policy = Policy("colm", threshold=threshold) if threshold is not None else self.default_policy()
        *_, tr = self.stream(prompt, policy, max_new_tokens, stop, chat)
        return tr

    def default_policy(self) -> Policy:
        return Policy("colm", threshold=self.head.threshold) if self.head is not None else Policy("base")

    def generate_batch(self, prompts: Sequence, policy: Policy, max_new_tokens: int = 256,
                       chat: bool | None = None, keys: Sequence[int] | None = None) -> list[Trace]:
        """Decode B prompts in lockstep (one expert catch-up serves every deferring row).  ``keys`` name the rows
        (e.g. example indices) for the random policy's per-row draws; default 0..B-1.  Rows are freed at the end."""
        max_new_tokens = check_max_new(max_new_tokens)
        rows = [self.encode(p, chat) for p in prompts]
        self.check_room(max(map(len, rows)), max_new_tokens)
        keys = list(range(len(rows))) if keys is None else list(keys)
        traces = [self._new_trace(p, r, policy) for p, r in zip(prompts, rows)]
        t0 = time.perf_counter()
        with self._lock:
            st = self.prefill(rows)
        try:
            for tr in traces:
                tr.prefill_seconds = time.perf_counter() - t0
            for _ in self._run(st, traces, [Detok(self.pair.tokenizer) for _ in rows], policy, max_new_tokens,
                               None, keys):
                pass
        finally:
            st.close()
        return traces

    def redecode_stream(self, trace: Trace, policy: Policy, max_new_tokens: int = 256,
                        stop: threading.Event | None = None) -> Iterator[Trace]:
        """Continue ``trace`` under a new threshold policy, re-decoding only from the first flipped decision.

        Greedy decoding is deterministic given the policy, so steps before the first position t whose decision
        flips are unchanged.  Both models' rows are cropped ("crop to t and continue"): the base to the tokens
        before t, its last one re-fed to rebuild the state at t; the expert to at most that, so at least one token
        is pending.  The given trace's state is consumed: the returned trace owns it.

        Forced positions (``branch``) are not the threshold's decisions: the first-flip search skips them, those
        before the first flip stay forced, those after it are dropped (the text they were chosen in is rewritten).
        """
        st = trace.state
        if st is None or st.closed or len(st.seqs) != 1:
            raise ColmError("this trace cannot be re-decoded (no decode state kept); run generate again")
        if policy.name != "colm" or trace.policy.get("name") != "colm":
            raise ColmError("re-decode applies to threshold (colm) policies only")
        max_new_tokens = check_max_new(max_new_tokens)
        st.last_used = -1.0          # in use: not to be evicted while it is re-decoded
        t = next((i for i, s in enumerate(trace.steps)
                  if not s.forced and (s.p_defer > policy.threshold) != (s.source == "expert")), len(trace.steps))
        t = min(t, max_new_tokens)   # never keep more steps than asked for, wherever the first flip lies
        t0 = time.perf_counter()
        self._crop_to(st, t)          # crop to t and continue: the primitive branch and resume use too
        st.force = [{}]
        tr = self._new_trace(trace.prompt, trace.prompt_ids, policy)
        tr.steps = [Step(**asdict(s)) for s in trace.steps[:t]]
        tr.expert_calls = sum(s.source == "expert" for s in tr.steps)
        tr.reused_steps = t
        tr.rollbacks = [r for r in trace.rollbacks if r["position"] < t]   # corrections in the kept text stand
        tr.state, trace.state = st, None
        detok = Detok.resume(self.pair.tokenizer, tr.steps)
        tr.prefill_seconds = time.perf_counter() - t0
        ended = self.end_reason(tr.steps)
        if t >= max_new_tokens or ended:
            tr.stop_reason = ended or "length"
            tr.decode_seconds = tr.prefill_seconds
            yield tr
            st.last_used = time.monotonic()
            return
        yield from self._follow(tr, detok, policy, max_new_tokens, stop, 0)

    def redecode(self, trace: Trace, threshold: float, max_new_tokens: int = 256) -> Trace:
        """``redecode_stream`` to the end."""
        *_, tr = self.redecode_stream(trace, Policy("colm", threshold=threshold), max_new_tokens)
        return tr
