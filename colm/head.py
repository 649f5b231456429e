"""The deferral head: one linear map from the base model's final (post-norm) hidden state to a logit.

p_defer = sigmoid(head(h_t)) is the paper's switch variable Z_t.  A head is stored as safetensors with a JSON
metadata blob (base model identity, hidden size, threshold, training data and metrics); pickle is never used.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .models import DEFAULT_BASE, ColmError

SHIPPED_BASE = DEFAULT_BASE.name


class HeadMismatchError(ColmError):
    pass


SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "assets" / "head-gsm8k.safetensors"


class DeferralHead(torch.nn.Module):
    def __init__(self, hidden_size: int, meta: dict | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        # Start undecided (p = 0.5 everywhere); ``trained`` tells the UI and CLI to warn until fit() replaces it.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.meta = {"hidden_size": hidden_size, "trained": False, "threshold": 0.5, **(meta or {})}

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def trained(self) -> bool:
        return bool(self.meta.get("trained", False))

    @property
    def identity(self) -> str:
        return self.meta.get("name") or ("untrained head" if not self.trained else "deferral head")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., H] in any dtype -> logits [...] in fp32 (the head is tiny, so fp32 costs nothing)."""
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)

    def p_defer(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(h))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"colm": json.dumps(self.meta)})
            tmp.replace(path)       # a failed or killed save leaves the previous head in place
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, base_model=None, base_id: str | None = None) -> "DeferralHead":
        """Load a head; with ``base_model`` given, refuse one whose hidden size does not fit it."""
        path = Path(path)
        if not path.is_file():
            raise ColmError(f"head file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("colm", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, json.JSONDecodeError, Exception) as e:  # safetensors raises its own types
            if isinstance(e, ColmError):
                raise
            raise ColmError(f"{path} is not a readable colm head (safetensors + metadata): {e}") from e
        w = tensors.get("linear.weight")
        if w is None or w.ndim != 2 or w.shape[0] != 1 or "linear.bias" not in tensors:
            raise ColmError(f"{path} does not hold a deferral head (expected linear.weight [1, H] and linear.bias)")
        head = cls(w.shape[1], meta)
        head.load_state_dict({"linear.weight": w.float(), "linear.bias": tensors["linear.bias"].float()})
        thr = head.meta.get("threshold", 0.5)
        if not isinstance(thr, (int, float)) or not math.isfinite(thr) or not 0.0 <= thr <= 1.0:
            raise ColmError(f"{path}: stored threshold {thr!r} is not a number in [0, 1]")
        if base_model is not None:
            check_fits(head, base_model, base_id)
        head.meta.setdefault("name", path.name)
        return head


def check_fits(head: DeferralHead, base_model, base_id: str | None = None) -> None:
    want = base_model.config.hidden_size
    if head.hidden_size != want:
        raise HeadMismatchError(
            f"deferral head expects hidden size {head.hidden_size} (trained for "
            f"{head.meta.get('base_model', 'an unknown model')}) but the base model"
            f"{' ' + base_id if base_id else ''} has hidden size {want}; train a head for this base with `colm train`.")


def untrained_head(base_model, base_id: str | None = None) -> DeferralHead:
    return DeferralHead(base_model.config.hidden_size, {"base_model": base_id, "name": "untrained head"})


def load_head(pair, path: str | Path | None = None) -> DeferralHead:
    """The head at ``path``; by default the shipped head when ``pair`` is the embedded default pair.

    Without one, an untrained head is returned and a warning raised: running untrained is never silent.
    """
    if path is None and SHIPPED_HEAD.exists() and pair.base_id == SHIPPED_BASE:
        path = SHIPPED_HEAD
    if path is not None:
        return DeferralHead.load(path, pair.base, pair.base_id)
    warnings.warn("no trained deferral head for this base model; p_defer is 0.5 everywhere, so the colm policy "
                  "never defers. Train one with `python -m colm train`.", UntrainedHeadWarning, stacklevel=2)
    return untrained_head(pair.base, pair.base_id)


class UntrainedHeadWarning(UserWarning):
    pass
