"""Who writes the next token: the deferral rules.  Each sees p_defer [B], the base's top probability [B] and one
random generator per row, and returns a bool mask [B] (True: the expert writes)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .models import ColmError

POLICIES = ("colm", "base", "expert", "random", "confidence")


@dataclass(frozen=True)
class Policy:
    name: str = "colm"
    threshold: float = 0.5      # colm: defer when p_defer > threshold
    rate: float = 0.0           # random: defer with this probability
    min_prob: float = 0.5       # confidence: defer when the base's top probability < min_prob
    seed: int = 0               # random: with the row's key, fixes that row's draws

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

    def rngs(self, keys) -> list[torch.Generator]:
        """One generator per row, seeded from (seed, the row's key — e.g. the example's index): a row's draws
        do not depend on which other rows share its batch, or on the batch size."""
        return [torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, int(k)]).generate_state(1)[0]))
                for k in keys]

    def defer(self, p: torch.Tensor, top_prob: torch.Tensor, rngs: list[torch.Generator]) -> torch.Tensor:
        if self.name == "colm":
            return p > self.threshold
        if self.name == "base":
            return torch.zeros_like(p, dtype=torch.bool)
        if self.name == "expert":
            return torch.ones_like(p, dtype=torch.bool)
        if self.name == "random":
            # every row draws once a step, finished or not, so its sequence of draws is its own
            return torch.stack([torch.rand((), generator=g) for g in rngs]) < self.rate
        return top_prob < self.min_prob  # confidence

    def describe(self) -> dict:
        keep = {"colm": ("threshold",), "random": ("rate", "seed"), "confidence": ("min_prob",)}.get(self.name, ())
        return {"name": self.name, **{k: getattr(self, k) for k in keep}}
