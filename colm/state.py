"""What a decode leaves behind: the engine rows (KV caches) of both models and the base's state for the next
position, so a trace can be continued, re-decoded or branched (colm.decode)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .engines import Pair


@dataclass(eq=False)   # identity, not value: states are tracked in a WeakSet
class DecodeState:
    """What a decode leaves behind so it can be continued, re-decoded or branched.  Owned by one Trace at a time.
    The base holds every token of ``seqs[b]`` (but the last when a decode ended at its length); the expert the
    first ``expert_rows.lengths[b]``: the rest are pending."""
    pair: Pair
    seqs: list[list[int]]           # per row: prompt + generated token ids
    prompt_lens: list[int]          # P_b
    base_rows: object               # engine rows
    expert_rows: object
    h: torch.Tensor                 # [B, H] base final hidden state for the next position
    logits: torch.Tensor            # [B, V] base logits for the next position
    last_used: float = 0.0
    # per row: generated position -> the model forced to write it ("base" | "expert"), read by decode_one; a
    # branch (colm.branch) sets it, a re-decode clears it (forced positions past its first flip are dropped)
    force: list[dict[int, str]] = field(default_factory=list)

    def __post_init__(self):
        self.force = self.force or [{} for _ in self.seqs]

    def close(self) -> None:
        if self.base_rows is not None:
            self.pair.base.close(self.base_rows)
            self.pair.expert.close(self.expert_rows)
            self.base_rows = self.expert_rows = None

    closed = property(lambda self: self.base_rows is None)

    def __del__(self):   # a trace dropped without release() gives its rows back when it is collected
        with contextlib.suppress(Exception):   # at interpreter exit the engines' modules may be torn down
            self.close()
