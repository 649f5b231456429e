"""Step and Trace: what a decode returns, and their JSON.  The CLI, the evaluator, the benchmarks and the app all
render these records; nothing that produces them prints."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .engines import topk_probs  # noqa: F401  (colm.trace.topk_probs: where callers have always found it)

TopK = list  # [(token_id, text, prob), ...]


@dataclass
class Step:
    position: int                         # index among generated tokens, 0-based
    token_id: int
    text: str                             # display text (incrementally decoded; "" for special tokens)
    source: str                           # "base" | "expert"
    p_defer: float                        # NaN when no head was run
    base_topk: TopK
    expert_topk: TopK | None = None       # known for every position a catch-up forward covered
    forced: bool = False                  # source set by a branch (CoLLM.branch), not by the policy

    def to_dict(self, full: bool = True) -> dict:
        d = asdict(self)
        if not self.forced:
            d.pop("forced")               # listed only where true: most steps are the policy's own
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
    expert_fed: int = 0                   # tokens the expert processed in its catch-ups (this trace's decoding)
    decode_seconds: float = 0.0
    stop_reason: str = ""                 # "eos" | "answer" (a "#### n" line) | "length" | "cancelled"
    reused_steps: int = 0                 # steps kept from a previous trace by redecode()
    base_model: str = ""
    expert_model: str = ""
    head: str = ""
    head_trained: bool = False
    engine: str = ""                      # which engine ran: "torch" | "llamacpp"
    prefill_seconds: float = 0.0          # time before the first token (prompt prefill, or re-decode set-up)
    rollbacks: list = field(default_factory=list)   # course corrections (colm.backtrack.Rollback as dicts)
    state: object = field(default=None, repr=False, compare=False)   # colm.decode.DecodeState: caches to continue

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    @property
    def forced_positions(self) -> list[int]:
        return [s.position for s in self.steps if s.forced]

    @property
    def deferral_rate(self) -> float:
        return sum(s.source == "expert" for s in self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        new = len(self.steps) - self.reused_steps
        return new / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def release(self) -> None:
        """Free the KV caches (engine rows) this trace holds; it can no longer be re-decoded."""
        if self.state is not None:
            self.state.close()
            self.state = None

    def to_dict(self, full: bool = True) -> dict:
        return {
            "prompt": self.prompt, "text": self.text, "policy": self.policy,
            "deferral_rate": self.deferral_rate, "expert_calls": self.expert_calls, "expert_fed": self.expert_fed,
            "decode_seconds": self.decode_seconds, "tokens_per_second": self.tokens_per_second,
            "stop_reason": self.stop_reason, "reused_steps": self.reused_steps,
            "base_model": self.base_model, "expert_model": self.expert_model,
            "head": self.head, "head_trained": self.head_trained, "engine": self.engine,
            "forced_positions": self.forced_positions, "rollbacks": self.rollbacks, "steps": [s.to_dict(full) for s in self.steps],
        }




def topk_records(tok, ids: list[int], probs: list[float]) -> TopK:
    return [(i, tok.decode([i]), round(p, 5)) for i, p in zip(ids, probs)]
