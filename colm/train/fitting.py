"""Fitting a linear deferral head to cached features: a held-out split by example, standardised inputs, Adam with
early stopping, and the standardisation folded back into the shipped head."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..head import DeferralHead
from ..models import ColmError
from .labels import disagreement_labels, weak_labels
from .objectives import auc, marginal_nll, recall_at, weighted_bce


@dataclass
class TrainConfig:
    """How ``fit`` trains a head; recorded in the head's metadata (``train_config``)."""
    objective: str = "disagreement"    # marginal | disagreement | gold-disagreement
    init: str = "weak"                 # marginal only: start from the weak-supervision fit ("weak", the paper), the
                                       # base-vs-expert disagreement fit ("disagreement") or zeros ("none")
    val_fraction: float = 0.1          # examples held out for early stopping
    lr: float = 1e-2                   # AdamW learning rate of the linear head
    weight_decay: float = 1e-4         # AdamW weight decay
    batch_size: int = 4096             # tokens per optimiser step
    max_epochs: int = 60               # upper bound on passes over the training tokens
    patience: int = 5                  # epochs without validation improvement before stopping
    seed: int = 0                      # the train/val split, the initial shuffle and the optimiser's order
    confidence: bool = True            # the head also reads the base's top prob / entropy / margin (colm.head)


def split_by_example(f: dict, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token masks (train, val) with whole examples held out, so validation sees unseen problems."""
    ex = f["example"].unique()
    g = torch.Generator().manual_seed(seed)
    val_ex = ex[torch.randperm(len(ex), generator=g)[:max(1, int(len(ex) * val_fraction))]]
    val = torch.isin(f["example"], val_ex)
    return ~val, val


def head_inputs(f: dict, confidence: bool) -> torch.Tensor:
    """The head's input rows [N, H (+3)] from cached features, in the order ``DeferralHead.forward`` concatenates."""
    return torch.cat([f["h"].float(), f["conf"]], 1) if confidence else f["h"].float()


def _standardise(h: torch.Tensor, train: torch.Tensor):
    x = h.float()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-4)
    return (x - mu) / sd, mu, sd


def _loop(x, train, val, loss_fn, cfg: TrainConfig, w0=None):
    """Adam on a linear logit d = x·w + b with early stopping on the validation loss; returns the best (w, b)."""
    torch.manual_seed(cfg.seed)
    lin = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        if w0 is not None:
            lin.weight.copy_(w0[0]), lin.bias.copy_(w0[1])
        else:
            lin.weight.zero_(), lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr_idx, va_idx = train.nonzero().squeeze(1), val.nonzero().squeeze(1)
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(cfg.max_epochs):
        perm = tr_idx[torch.randperm(len(tr_idx))]
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s:s + cfg.batch_size]
            loss = loss_fn(lin(x[b]).squeeze(1), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = loss_fn(lin(x[va_idx]).squeeze(1), va_idx).item()
            t = loss_fn(lin(x[tr_idx]).squeeze(1), tr_idx).item()
        history.append({"epoch": epoch, "train": t, "val": v})
        if v < best - 1e-5:
            best, bad = v, 0
            best_state = (lin.weight.detach().clone(), lin.bias.detach().clone())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    return best_state, history


def fit(f: dict, cfg: TrainConfig, hidden_size: int, meta: dict | None = None) -> tuple[DeferralHead, dict]:
    """Fit a head to cached features under ``cfg.objective``; returns the head and its metrics."""
    if cfg.objective not in ("marginal", "disagreement", "gold-disagreement"):
        raise ColmError(f"unknown objective {cfg.objective!r}")
    if cfg.objective == "marginal" and torch.isnan(f["lp_expert"]).any():
        raise ColmError("objective marginal needs expert features; extract them with the expert")
    train, val = split_by_example(f, cfg.val_fraction, cfg.seed)
    x, mu, sd = _standardise(head_inputs(f, cfg.confidence), train)
    metrics: dict = {"tokens": int(len(x)), "examples": int(f["example"].unique().numel()),
                     "train_tokens": int(train.sum()), "val_tokens": int(val.sum())}

    def bce_fit(z):
        pw = float((1 - z[train]).sum() / z[train].sum().clamp_min(1))
        return _loop(x, train, val, lambda d, i: weighted_bce(d, z[i], pw), cfg), pw

    if cfg.objective == "marginal":
        lb, le = f["lp_base"], f["lp_expert"]
        w0 = None
        if cfg.init in ("weak", "disagreement"):
            z = weak_labels(f) if cfg.init == "weak" else disagreement_labels(f)
            (w0, hist0), _ = bce_fit(z)
            metrics["init_label_rate"] = float(z.mean())
            metrics["init_history"] = hist0[-1:]
        elif cfg.init != "none":
            raise ColmError(f"unknown init {cfg.init!r}: weak, disagreement or none")
        state, hist = _loop(x, train, val, lambda d, i: marginal_nll(d, lb[i], le[i]), cfg, w0)
        with torch.no_grad():
            d = (x @ state[0].T).squeeze(1) + state[1]
        for name, m in (("train", train), ("val", val)):
            metrics[f"{name}_nll"] = float(marginal_nll(d[m], lb[m], le[m]))
            metrics[f"{name}_nll_base"] = float(-lb[m].mean())
            metrics[f"{name}_nll_expert"] = float(-le[m].mean())
            metrics[f"{name}_nll_oracle"] = float(-torch.maximum(lb[m], le[m]).mean())
        z = weak_labels(f)
    else:
        z = disagreement_labels(f)
        (state, hist), pw = bce_fit(z)
        metrics["pos_weight"] = pw
        with torch.no_grad():
            d = (x @ state[0].T).squeeze(1) + state[1]
    metrics["label_rate"] = float(z.mean())
    metrics["val_auc"] = auc(d[val], z[val])
    metrics.update(recall_at(d[val], z[val], 0.3))
    metrics["epochs"] = len(hist)
    metrics["history"] = hist
    # Fold the standardisation into the linear map so the shipped head reads raw hidden states.
    w = state[0] / sd
    b = state[1] - (w * mu).sum()
    head = DeferralHead(hidden_size, {**(meta or {}), "trained": True, "objective": cfg.objective,
                                      "train_config": asdict(cfg),
                                      "metrics": {k: v for k, v in metrics.items() if k != "history"}},
                        confidence=cfg.confidence)
    with torch.no_grad():
        head.linear.weight.copy_(w), head.linear.bias.copy_(b)
    return head, metrics
