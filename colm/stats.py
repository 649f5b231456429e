"""Intervals for accuracies: a Wilson interval for one, and a paired comparison for two policies on the same
problems (exact McNemar test on the discordant problems and a paired bootstrap interval for the difference)."""
from __future__ import annotations

import math
import random


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for k successes in n trials (stays inside [0, 1], sane at k = 0 or n)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact p-value for b problems right only under A and c right only under B (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict[int, bool], b: dict[int, bool], reps: int = 10_000, seed: int = 0) -> dict:
    """A vs B on the problems both answered: accuracies (with Wilson intervals), the difference A − B with a 95 %
    paired-bootstrap interval (problems resampled together), discordant counts and McNemar's exact p."""
    keys = sorted(set(a) & set(b))
    n = len(keys)
    xa, xb = [bool(a[k]) for k in keys], [bool(b[k]) for k in keys]
    d = [int(p) - int(q) for p, q in zip(xa, xb)]
    rng = random.Random(seed)
    boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps)) if n else []
    only_a, only_b = sum(x > 0 for x in d), sum(x < 0 for x in d)
    ka, kb = sum(xa), sum(xb)
    return {"n": n, "accuracy_a": ka / n if n else float("nan"), "accuracy_b": kb / n if n else float("nan"),
            "ci_a": wilson(ka, n), "ci_b": wilson(kb, n), "difference": (ka - kb) / n if n else float("nan"),
            "difference_ci": (boots[int(0.025 * reps)], boots[int(0.975 * reps) - 1]) if n else (math.nan, math.nan),
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}
