"""Training objectives and the metrics that judge a head: the marginal likelihood, weighted BCE, ROC AUC and recall at
a deferral budget."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def marginal_nll(d: torch.Tensor, lp_base: torch.Tensor, lp_expert: torch.Tensor) -> torch.Tensor:
    """-log[(1 - σ(d)) P_base + σ(d) P_expert], stably in log space; mean over tokens."""
    return -torch.logaddexp(F.logsigmoid(-d) + lp_base, F.logsigmoid(d) + lp_expert).mean()


def weighted_bce(d: torch.Tensor, z: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(d, z, pos_weight=torch.tensor(pos_weight))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank statistic (ties averaged)."""
    pos, neg = labels.bool(), ~labels.bool()
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inv = torch.unique(scores, return_inverse=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
        cnt = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
        ranks = (sums / cnt)[inv]
    n_pos, n_neg = pos.sum().item(), neg.sum().item()
    return float((ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at(d: torch.Tensor, z: torch.Tensor, frac: float) -> dict:
    """Share of label-1 tokens caught when deferring the top ``frac`` of tokens by score."""
    k = max(1, int(len(d) * frac))
    top = d.topk(k).indices
    return {f"recall_at_{int(frac * 100)}pct": float(z[top].sum() / z.sum().clamp_min(1))}
