"""The deferral head: one linear map from the base model's final (post-norm) hidden state to a logit.

p_defer = sigmoid(head(h_t)) is the paper's switch variable Z_t.  A head may also read three numbers the decoder
already has at every step, the base's confidence at that position (``confidence_features``): the paper's head sees
only h_t, but with a frozen base a linear map of h_t cannot express "the base is unsure" (a log-sum-exp over the
vocabulary), and that alone was a better deferral rule than the hidden-state head on GSM8K dev.

A head is stored as safetensors with a JSON metadata blob (base model identity, hidden size, inputs, threshold,
training data and metrics); pickle is never used.
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

CONFIDENCE_FEATURES = ("top_prob", "entropy", "margin")


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] of the base -> [..., 3] fp32: top probability, entropy (nats), top-1 minus top-2 probability."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    entropy = -(p * logp).sum(-1)
    return torch.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1]], -1)


class DeferralHead(torch.nn.Module):
    def __init__(self, hidden_size: int, meta: dict | None = None, confidence: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size + (len(CONFIDENCE_FEATURES) if confidence else 0), 1)
        # Start undecided (p = 0.5 everywhere); ``trained`` tells the UI and CLI to warn until fit() replaces it.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.meta = {"hidden_size": hidden_size, "trained": False, "threshold": 0.5, **(meta or {}),
                     "inputs": ["hidden", *(CONFIDENCE_FEATURES if confidence else ())]}

    @property
    def uses_confidence(self) -> bool:
        return len(self.meta["inputs"]) > 1

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features - (len(CONFIDENCE_FEATURES) if self.uses_confidence else 0)

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def min_prob(self) -> float:
        """The confidence rule's cut-off recorded beside this head: the base's top probability below which that rule
        defers the same share of tokens as the head at η, on the split η was chosen on (``colm evaluate
        --write-threshold``), so the two can be compared at equal expert cost.  0.5 where none is recorded."""
        return float(self.meta.get("min_prob", 0.5))

    def use_engine(self, engine: str) -> "DeferralHead":
        """Take η (and the confidence rule's cut-off) calibrated on ``engine`` where the metadata has them
        (``thresholds`` / ``min_probs``: engine -> value), since both must be calibrated on the engine they run on;
        otherwise keep the single stored value."""
        for key, single in (("thresholds", "threshold"), ("min_probs", "min_prob")):
            per = self.meta.get(key) or {}
            if engine in per:
                self.meta[single] = float(per[engine])
        return self

    @property
    def trained(self) -> bool:
        return bool(self.meta.get("trained", False))

    @property
    def identity(self) -> str:
        return self.meta.get("name") or ("untrained head" if not self.trained else "deferral head")

    def forward(self, h: torch.Tensor, logits: torch.Tensor | None = None, conf: torch.Tensor | None = None):
        """h [..., H] in any dtype, plus for a confidence head the base's logits [..., V] at the same position or
        their ``confidence_features`` [..., 3] (cached by training) -> logits [...] in fp32 (fp32 costs nothing).

        Inputs follow the head to its device: cached features live on the CPU while a decoder on a GPU holds the head
        there (a GPU run of ``colm evaluate`` scored CPU features with a CUDA head)."""
        x = h.to(self.linear.weight)
        if self.uses_confidence:
            if conf is None:
                if logits is None:
                    raise ColmError("this deferral head reads the base's confidence: pass the base's logits")
                conf = confidence_features(logits)
            x = torch.cat([x, conf.to(x)], -1)
        return self.linear(x).squeeze(-1)

    def p_defer(self, h: torch.Tensor, logits: torch.Tensor | None = None, conf: torch.Tensor | None = None):
        return torch.sigmoid(self.forward(h, logits, conf))

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
        inputs = meta.get("inputs", ["hidden"])
        if inputs not in (["hidden"], ["hidden", *CONFIDENCE_FEATURES]):
            raise ColmError(f"{path}: unknown head inputs {inputs!r} (this colm reads hidden [+ {CONFIDENCE_FEATURES}])")
        confidence = len(inputs) > 1
        hidden = w.shape[1] - (len(CONFIDENCE_FEATURES) if confidence else 0)
        if meta.get("hidden_size", hidden) != hidden:
            raise ColmError(f"{path}: weight width {w.shape[1]} does not match hidden size {meta['hidden_size']} "
                            f"and inputs {inputs}")
        head = cls(hidden, meta, confidence)
        head.load_state_dict({"linear.weight": w.float(), "linear.bias": tensors["linear.bias"].float()})
        head.requires_grad_(False)      # loaded for inference; joint_train switches gradients back on
        for key, single in (("thresholds", "threshold"), ("min_probs", "min_prob")):
            per = head.meta.get(key) or {}
            for thr in (head.meta.get(single, 0.5), *(per.values() if isinstance(per, dict) else [None])):
                if not isinstance(thr, (int, float)) or not math.isfinite(thr) or not 0.0 <= thr <= 1.0:
                    raise ColmError(f"{path}: stored {single} {thr!r} is not a number in [0, 1]")
        if base_model is not None:
            check_fits(head, base_model, base_id)
        head.meta.setdefault("name", path.name)
        return head


def hidden_size_of(base) -> int:
    """H of a base engine (``.hidden_size``) or of a transformers model (``.config.hidden_size``)."""
    return base.hidden_size if hasattr(base, "hidden_size") else base.config.hidden_size


def check_fits(head: DeferralHead, base_model, base_id: str | None = None) -> None:
    want = hidden_size_of(base_model)
    if head.hidden_size != want:
        raise HeadMismatchError(
            f"deferral head expects hidden size {head.hidden_size} (trained for "
            f"{head.meta.get('base_model', 'an unknown model')}) but the base model"
            f"{' ' + base_id if base_id else ''} has hidden size {want}; train a head for this base with `colm train`.")


def untrained_head(base_model, base_id: str | None = None) -> DeferralHead:
    return DeferralHead(hidden_size_of(base_model), {"base_model": base_id, "name": "untrained head"})


def load_head(pair, path: str | Path | None = None) -> DeferralHead:
    """The head at ``path``; by default the shipped head when ``pair`` is the embedded default pair.

    Without one, an untrained head is returned and a warning raised: running untrained is never silent.
    """
    if path is None and SHIPPED_HEAD.exists() and pair.base_id == SHIPPED_BASE:
        path = SHIPPED_HEAD
    if path is not None:
        return DeferralHead.load(path, pair.base, pair.base_id).use_engine(pair.engine)
    warnings.warn("no trained deferral head for this base model; p_defer is 0.5 everywhere, so the colm policy "
                  "never defers. Train one with `python -m colm train`.", UntrainedHeadWarning, stacklevel=2)
    return untrained_head(pair.base, pair.base_id)


class UntrainedHeadWarning(UserWarning):
    pass
