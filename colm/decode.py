"""The Co-LLM decode loop.

A ladder of small functions, gpt-fast style:  ``prefill`` -> ``decode_one`` (one lockstep token for B rows) ->
``CoLLM.stream`` / ``generate`` / ``generate_batch`` / ``redecode``.  Every function returns records
(``Step``, ``Trace``); nothing here prints.

The rule, per generated position t (paper, Sec. 3):
    p_t = sigmoid(head(h_t)),  h_t = base model's final hidden state after x_<t
                                (a confidence head also reads the base's logits there: colm.head)
    x_t = argmax P_expert(. | x_<t)   if policy defers (Co-LLM: p_t > eta)
          argmax P_base(.   | x_<t)   otherwise
The expert is fed lazily: tokens it has not seen wait as *pending* and go through it in one forward pass only when
a position is deferred, so expert forward passes == deferred tokens (its prompt prefill included in the first).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from .head import DeferralHead
from .models import ColmError, Pair

TopK = list  # [(token_id, text, prob), ...]


# ----------------------------------------------------------------------------------------------- records
@dataclass
class Step:
    position: int                         # index among generated tokens, 0-based
    token_id: int
    text: str                             # display text (incrementally decoded; "" for special tokens)
    source: str                           # "base" | "expert"
    p_defer: float                        # NaN when no head was run
    base_topk: TopK
    expert_topk: TopK | None = None       # known for every position a catch-up forward covered

    def to_dict(self, full: bool = True) -> dict:
        d = asdict(self)
        if isinstance(self.p_defer, float) and math.isnan(self.p_defer):
            d["p_defer"] = None
        if not full:
            for k in ("base_topk", "expert_topk"):
                d.pop(k)
        return d


@dataclass
class Trace:
    prompt: object                        # what the caller passed: str or chat messages
    prompt_ids: list[int]
    policy: dict                          # {"name": ..., and its parameters}
    steps: list[Step] = field(default_factory=list)
    expert_calls: int = 0
    decode_seconds: float = 0.0
    stop_reason: str = ""                 # "eos" | "length" | "cancelled"
    reused_steps: int = 0                 # steps kept from a previous trace by redecode()
    base_model: str = ""
    expert_model: str = ""
    head: str = ""
    head_trained: bool = False
    prefill_seconds: float = 0.0          # time before the first token (prompt prefill, or re-decode set-up)
    state: "DecodeState | None" = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    @property
    def deferral_rate(self) -> float:
        return sum(s.source == "expert" for s in self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        new = len(self.steps) - self.reused_steps
        return new / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self, full: bool = True) -> dict:
        return {
            "prompt": self.prompt, "text": self.text, "policy": self.policy,
            "deferral_rate": self.deferral_rate, "expert_calls": self.expert_calls,
            "decode_seconds": self.decode_seconds, "tokens_per_second": self.tokens_per_second,
            "stop_reason": self.stop_reason, "reused_steps": self.reused_steps,
            "base_model": self.base_model, "expert_model": self.expert_model,
            "head": self.head, "head_trained": self.head_trained,
            "steps": [s.to_dict(full) for s in self.steps],
        }


# ----------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Policy:
    """When to hand a position to the expert.  ``defer`` sees p_defer [B], the base's top probability [B] and
    the policy's random generator, and returns a bool mask [B]."""
    name: str = "colm"
    threshold: float = 0.5      # colm: defer when p_defer > threshold
    rate: float = 0.0           # random: defer with this probability
    min_prob: float = 0.5       # confidence: defer when the base's top probability < min_prob
    seed: int = 0

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ColmError(f"unknown policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        for key in ("threshold", "rate", "min_prob"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0:
                raise ColmError(f"{key} must be a number in [0, 1], got {v!r}")

    @property
    def needs_head(self) -> bool:
        return self.name == "colm"

    def rng(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def defer(self, p: torch.Tensor, top_prob: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if self.name == "colm":
            return p > self.threshold
        if self.name == "base":
            return torch.zeros_like(p, dtype=torch.bool)
        if self.name == "expert":
            return torch.ones_like(p, dtype=torch.bool)
        if self.name == "random":
            return torch.rand(p.shape, generator=rng) < self.rate
        return top_prob < self.min_prob  # confidence

    def describe(self) -> dict:
        keep = {"colm": ("threshold",), "random": ("rate", "seed"), "confidence": ("min_prob",)}.get(self.name, ())
        return {"name": self.name, **{k: getattr(self, k) for k in keep}}


POLICIES = ("colm", "base", "expert", "random", "confidence")


# ----------------------------------------------------------------------------------------------- model steps
@dataclass
class DecodeState:
    """What a decode leaves behind so it can be continued or re-decoded.  Owned by one Trace at a time."""
    ids: torch.Tensor               # [B, L] padded prompt + generated tokens
    mask: torch.Tensor              # [B, L] 1 for real tokens
    prompt_len: int                 # P, padded prompt length
    base_cache: DynamicCache        # holds ids[:, :L]
    expert_cache: DynamicCache      # holds ids[:, :expert_len]
    expert_len: int
    h: torch.Tensor | None          # [B, H] base final hidden state for the next position
    logits: torch.Tensor | None     # [B, V] base logits for the next position


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, L] -> position ids [B, L]; left padding keeps every row's first real token at position 0."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def base_forward(model, ids, mask, pos, cache, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, k] new tokens, mask [B, L_total], pos [B, k] -> (h [B, H], logits [B, V]) at the last position.

    V is the tokenizer's vocabulary: rows a checkpoint pads its embedding with are never real tokens, and a
    token one model could emit but the other cannot embed would break the hand-over.

    Runs the backbone and applies the LM head to the last position only: no per-layer hidden states, no logits
    for positions nobody reads.
    """
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    h = out.last_hidden_state[:, -1]
    return h, model.lm_head(h)[:, :n_vocab]


def expert_forward(model, ids, mask, pos, cache, keep: int, n_vocab: int) -> torch.Tensor:
    """Catch the expert up on pending ids [B, k]; return logits [B, keep, V] for the last ``keep`` positions.

    When keep < k the kept positions are passed as an index tensor, so they are gathered into a contiguous
    [B, keep, H] tensor.  An int slices a strided view, which torch.matmul cannot fold into one matrix; it then
    broadcasts the LM head into a batched matmul and copies all of it once per row (~1.4 s and 0.47 GB per row
    for the 1.5B expert on a 2-core CPU: the first catch-up of every decode, which includes the prompt).
    """
    k = ids.shape[1]
    keep_at = keep if keep >= k else torch.arange(k - keep, k, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=keep_at)
    return out.logits[..., :n_vocab]


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (probs [..., k], ids [..., k]) without materialising a full softmax."""
    logits = logits.float()
    vals, ids = logits.topk(k, dim=-1)
    return (vals - logits.logsumexp(-1, keepdim=True)).exp(), ids


class _Detok:
    """Incremental detokenisation, so multi-byte characters split across tokens print whole and the step texts
    concatenate to the decoded answer."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        new = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev):]
        return ""

    @classmethod
    def resume(cls, tokenizer, steps) -> "_Detok":
        """The state a fresh pass over ``steps`` leaves (re-decode).  Anchors move only at steps that emitted
        text, so the bytes of a character still incomplete at the branch point come out with the token that
        completes it, exactly as in a full decode."""
        d = cls(tokenizer)
        d.ids = [s.token_id for s in steps]
        emitted = [i + 1 for i, s in enumerate(steps) if s.text]
        d.read = emitted[-1] if emitted else 0
        d.prefix = emitted[-2] if len(emitted) > 1 else 0
        return d


# ----------------------------------------------------------------------------------------------- decoder
class CoLLM:
    """A base/expert pair plus a deferral head.  Stateless between calls: every call returns its own Trace."""

    def __init__(self, pair: Pair, head: DeferralHead | None = None, top_k: int = 5, max_prompt_tokens: int = 4096):
        self.pair, self.head, self.top_k, self.max_prompt_tokens = pair, head, top_k, max_prompt_tokens
        tok = pair.tokenizer
        eos = set()
        for src in (tok.eos_token_id, getattr(pair.base.generation_config, "eos_token_id", None)):
            eos.update(src if isinstance(src, (list, tuple)) else [src] if src is not None else [])
        for special in ("<|im_end|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(special) if special in tok.get_vocab() else None
            if tid is not None:
                eos.add(tid)
        self.eos_ids = sorted(eos)
        self.n_vocab = len(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        self._eos = torch.tensor(self.eos_ids, device=pair.device)
        if head is not None:
            head.to(pair.device)
        self._lock = threading.Lock()

    # -- prompts ------------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Chat messages (or a str, when the tokenizer has a chat template) -> token ids.

        Prompt text is always tokenised as text: a user typing ``<|im_start|>`` gets those characters, not the
        control token, so a prompt cannot forge turns of the conversation.
        """
        tok = self.pair.tokenizer
        if isinstance(prompt, str):
            prompt = clean_text(prompt)
            if not prompt.strip():
                raise ColmError("the prompt is empty")
            use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
            messages = [{"role": "user", "content": prompt}] if use_chat else None
        else:
            messages = [{**m, "content": clean_text(str(m.get("content", "")))} for m in prompt]
            if not messages or not any(str(m.get("content", "")).strip() for m in messages):
                raise ColmError("the prompt is empty")
        if messages is None:
            ids = tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            # Render the template around placeholders, then splice in the user text tokenised as plain text.
            ids = _chat_ids(tok, messages)
        if len(ids) > self.max_prompt_tokens:
            raise ColmError(f"the prompt is {len(ids)} tokens; the limit is {self.max_prompt_tokens}")
        return ids

    def check_room(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request that would run past either model's context window."""
        ctx = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in (self.pair.base, self.pair.expert))
        if prompt_len + max_new_tokens > ctx:
            raise ColmError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the models' "
                            f"context of {ctx} tokens")

    # -- core ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: Sequence[list[int]]) -> DecodeState:
        """Left-pad B prompts and run the base on them; the expert sees nothing yet (all of it is pending)."""
        dev = self.pair.device
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r, device=dev)
            mask[i, P - len(r):] = 1
        cache = DynamicCache(config=self.pair.base.config)
        h, logits = base_forward(self.pair.base, ids, mask, _positions(mask), cache, self.n_vocab)
        return DecodeState(ids, mask, P, cache, DynamicCache(config=self.pair.expert.config), 0, h, logits)

    @torch.inference_mode()
    def decode_one(self, st: DecodeState, policy: Policy, rng, active: torch.Tensor, feed: bool):
        """Choose the next token for every row of ``st`` and (if ``feed``) advance the base past it.

        Returns (tokens [B], deferred [B] bool, p [B], base (probs, ids) [B, k], expert catch-up or None) where the
        catch-up is (first generated position it covers, probs [B, n, k], ids [B, n, k]).
        """
        p = self.head.p_defer(st.h, st.logits) if self.head is not None else torch.full(st.h.shape[:1], float("nan"))
        base_p, base_i = topk_probs(st.logits, self.top_k)
        defer = policy.defer(p.cpu(), base_p[:, 0].cpu(), rng).to(st.ids.device) & active
        token = base_i[:, 0].clone()
        catch = None
        if bool(defer.any()):
            # Catch-up: every pending token in one forward; one call per deferred position, all rows at once.
            L = st.ids.shape[1]
            first = max(st.expert_len, st.prompt_len - 1)   # logits at index j predict token j + 1
            logits = expert_forward(self.pair.expert, st.ids[:, st.expert_len:], st.mask,
                                    _positions(st.mask)[:, st.expert_len:], st.expert_cache, keep=L - first,
                                    n_vocab=self.n_vocab)
            st.expert_len = L
            ep, ei = topk_probs(logits, self.top_k)
            token = torch.where(defer, ei[:, -1, 0], token)
            catch = (first + 1 - st.prompt_len, ep, ei)
        token = torch.where(active, token, torch.full_like(token, self.pad_id))
        st.ids = torch.cat([st.ids, token[:, None]], 1)
        st.mask = torch.cat([st.mask, torch.ones_like(token)[:, None]], 1)
        if feed:
            st.h, st.logits = base_forward(self.pair.base, token[:, None], st.mask,
                                           _positions(st.mask)[:, -1:], st.base_cache, self.n_vocab)
        return token, defer, p, (base_p, base_i), catch

    def _run(self, st: DecodeState, traces: list[Trace], detoks: list[_Detok], policy: Policy,
             max_new_tokens: int, stop: threading.Event | None) -> Iterator[None]:
        """Advance all rows in lockstep until each hits EOS or the length; yield after every token."""
        if policy.needs_head and self.head is None:
            raise ColmError("the colm policy needs a deferral head; pass one (or train one with `colm train`)")
        rng = policy.rng()
        B = len(traces)
        active = torch.ones(B, dtype=torch.bool, device=st.ids.device)
        t0 = time.perf_counter()
        n = len(traces[0].steps)
        tok = self.pair.tokenizer
        while n < max_new_tokens and bool(active.any()):
            if stop is not None and stop.is_set():
                for tr in traces:
                    tr.stop_reason = tr.stop_reason or "cancelled"
                break
            token, defer, p, (bp, bi), catch = self.decode_one(st, policy, rng, active,
                                                               feed=n + 1 < max_new_tokens)
            token_l, defer_l, p_l = token.tolist(), defer.tolist(), p.tolist()
            bp_l, bi_l = bp.tolist(), bi.tolist()
            if catch is not None:
                c0, ep, ei = catch
                ep_l, ei_l = ep.tolist(), ei.tolist()
            for b, tr in enumerate(traces):
                if not bool(active[b]):
                    continue
                if catch is not None:
                    # Back-fill the expert's view of every position this catch-up covered.
                    for j, (probs, ids) in enumerate(zip(ep_l[b], ei_l[b])):
                        pos = c0 + j
                        if pos < len(tr.steps):
                            tr.steps[pos].expert_topk = _topk(tok, ids, probs)
                    if defer_l[b]:
                        tr.expert_calls += 1
                step = Step(n, token_l[b], detoks[b].push(token_l[b]), "expert" if defer_l[b] else "base",
                            float(p_l[b]), _topk(tok, bi_l[b], bp_l[b]),
                            _topk(tok, ei_l[b][-1], ep_l[b][-1]) if catch is not None else None)
                tr.steps.append(step)
                if token_l[b] in self.eos_ids:
                    tr.stop_reason = "eos"
                    active[b] = False
            n += 1
            dt = time.perf_counter() - t0
            for tr in traces:
                tr.decode_seconds = tr.prefill_seconds + dt
            yield
        for tr in traces:
            tr.stop_reason = tr.stop_reason or "length"

    def _new_trace(self, prompt, ids: list[int], policy: Policy) -> Trace:
        tr = Trace(prompt, ids, policy.describe(), base_model=self.pair.base_id, expert_model=self.pair.expert_id,
                   head=self.head.identity if self.head is not None else "none",
                   head_trained=bool(self.head is not None and self.head.trained))
        return tr

    # -- public ---------------------------------------------------------------------------------------------
    def stream(self, prompt, policy: Policy | None = None, max_new_tokens: int = 256,
               stop: threading.Event | None = None, chat: bool | None = None) -> Iterator[Trace]:
        """Yield the growing Trace after every token (the same object, updated in place)."""
        policy = policy or self.default_policy()
        max_new_tokens = _check_max_new(max_new_tokens)
        ids = self.encode(prompt, chat)
        self.check_room(len(ids), max_new_tokens)
        tr = self._new_trace(prompt, ids, policy)
        t0 = time.perf_counter()
        st = self.prefill([ids])
        tr.prefill_seconds = time.perf_counter() - t0
        tr.state = st
        for _ in self._run(st, [tr], [_Detok(self.pair.tokenizer)], policy, max_new_tokens, stop):
            yield tr
        yield tr

    def generate(self, prompt, threshold: float | None = None, policy: Policy | None = None,
                 max_new_tokens: int = 256, stop: threading.Event | None = None, chat: bool | None = None) -> Trace:
        """Decode one prompt; ``threshold`` is shorthand for the Co-LLM policy at that threshold."""
        if policy is None:
            policy = Policy("colm", threshold=threshold) if threshold is not None else self.default_policy()
        tr = None
        for tr in self.stream(prompt, policy, max_new_tokens, stop, chat):
            pass
        return tr

    def default_policy(self) -> Policy:
        return Policy("colm", threshold=self.head.threshold) if self.head is not None else Policy("base")

    def generate_batch(self, prompts: Sequence, policy: Policy, max_new_tokens: int = 256,
                       chat: bool | None = None) -> list[Trace]:
        """Decode B prompts in lockstep (left padding; one expert catch-up serves every row)."""
        max_new_tokens = _check_max_new(max_new_tokens)
        rows = [self.encode(p, chat) for p in prompts]
        self.check_room(max(map(len, rows)), max_new_tokens)
        traces = [self._new_trace(p, r, policy) for p, r in zip(prompts, rows)]
        t0 = time.perf_counter()
        st = self.prefill(rows)
        for tr in traces:
            tr.prefill_seconds = time.perf_counter() - t0
        for _ in self._run(st, traces, [_Detok(self.pair.tokenizer) for _ in rows], policy, max_new_tokens, None):
            pass
        return traces

    @torch.inference_mode()
    def redecode_stream(self, trace: Trace, policy: Policy, max_new_tokens: int = 256,
                        stop: threading.Event | None = None) -> Iterator[Trace]:
        """Continue ``trace`` under a new threshold policy, re-decoding only from the first flipped decision.

        Greedy decoding is deterministic given the policy, so steps before the first position t whose decision
        flips are unchanged.  The base cache is cropped to the tokens before t (the last one re-fed to rebuild
        the state at t), the expert cache to at most that, and decoding continues from t.  The given trace's
        state is consumed: the returned trace owns it.
        """
        st = trace.state
        if st is None or st.ids.shape[0] != 1:
            raise ColmError("this trace cannot be re-decoded (no decode state kept); run generate again")
        if policy.name != "colm" or trace.policy.get("name") != "colm":
            raise ColmError("re-decode applies to threshold (colm) policies only")
        max_new_tokens = _check_max_new(max_new_tokens)
        t = next((i for i, s in enumerate(trace.steps)
                  if (s.p_defer > policy.threshold) != (s.source == "expert")), len(trace.steps))
        if t == len(trace.steps) and (trace.stop_reason == "eos" or t >= max_new_tokens):
            t = min(t, max_new_tokens)  # nothing flips: the old answer stands (truncated if asked for fewer)
        t0 = time.perf_counter()
        keep = st.prompt_len + t
        st.base_cache.crop(keep - 1 - st.base_cache.get_seq_length())
        new_expert_len = min(st.expert_len, keep - 1)  # >= 1 token pending, whose logits are position t's
        if new_expert_len < st.expert_cache.get_seq_length():
            st.expert_cache.crop(new_expert_len - st.expert_cache.get_seq_length())
        st.expert_len = new_expert_len
        st.ids, st.mask = st.ids[:, :keep], st.mask[:, :keep]
        st.h, st.logits = base_forward(self.pair.base, st.ids[:, -1:], st.mask, _positions(st.mask)[:, -1:],
                                       st.base_cache, self.n_vocab)
        tr = self._new_trace(trace.prompt, trace.prompt_ids, policy)
        tr.steps = [Step(**{**asdict(s)}) for s in trace.steps[:t]]
        tr.expert_calls = sum(s.source == "expert" for s in tr.steps)
        tr.reused_steps = t
        tr.state = st
        trace.state = None
        detok = _Detok.resume(self.pair.tokenizer, tr.steps)
        tr.prefill_seconds = time.perf_counter() - t0
        if t >= max_new_tokens or (t and tr.steps[-1].token_id in self.eos_ids):
            tr.stop_reason = "eos" if t and tr.steps[-1].token_id in self.eos_ids else "length"
            tr.decode_seconds = tr.prefill_seconds
            yield tr
            return
        for _ in self._run(st, [tr], [detok], policy, max_new_tokens, stop):
            yield tr
        yield tr

    def redecode(self, trace: Trace, threshold: float, max_new_tokens: int = 256) -> Trace:
        tr = None
        for tr in self.redecode_stream(trace, Policy("colm", threshold=threshold), max_new_tokens):
            pass
        return tr


def clean_text(text: str) -> str:
    """Make any Python str encodable: lone UTF-16 surrogates (which JSON clients can send) become U+FFFD;
    everything else, control characters included, is kept and tokenised as text."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_max_new(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ColmError(f"max_new_tokens must be a positive integer, got {n!r}")
    return n


def _topk(tok, ids: list[int], probs: list[float]) -> TopK:
    return [(i, tok.decode([i]), round(p, 5)) for i, p in zip(ids, probs)]


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    """Apply the chat template with user text tokenised as plain text (special-token strings stay literal)."""
    marks = [f"\x00COLM{i}\x00" for i in range(len(messages))]
    templated = tok.apply_chat_template(
        [{**m, "content": mk} for m, mk in zip(messages, marks)], tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    rest = templated
    for m, mk in zip(messages, marks):
        before, _, rest = rest.partition(mk)
        ids += tok(before, add_special_tokens=False)["input_ids"]
        ids += tok(str(m.get("content", "")), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tok(rest, add_special_tokens=False)["input_ids"]
    return ids
