"""Teacher-forced passes of an evaluation: the head's scores along given answers, without free generation.

Two passes feed ``colm.evaluate``: along the base's greedy answers (the threshold sweep's quantiles and the
confidence baseline's cut-off) and along the expert's (the disagreement proxy).  On the real pair each is 10–15
minutes of CPU, so with a ``cache`` directory (an evaluation's ``runs/``) their results are kept beside the run files
and a resumed evaluation reuses them.  A cached result is keyed by what decides it: the head's weights, the base
model, the engine and the exact token sequences; anything else recomputes it (the file is a cache, not a record).
Thread counts are not in the key: they change the last bits of a logit, not what the pass is for.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Example
from .decode import CoLLM


def pass_key(dec: CoLLM, kind: str, seqs: list) -> dict:
    """What a teacher-forced pass's result depends on (``seqs``: ``colm.train.sequences``' triples)."""
    weights = hashlib.sha256()
    for name, t in sorted(dec.head.state_dict().items()):
        weights.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return {"kind": kind, "head_weights": weights.hexdigest()[:16], "base": dec.pair.base_id,
            "engine": dec.pair.engine, "sequences": hashlib.sha256(json.dumps(seqs).encode()).hexdigest()}


def _load(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:   # an unreadable cache is recomputed, never trusted
        return None


def _store(path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": json.dumps(key)})
    os.replace(tmp, path)       # a killed run never leaves half a cache behind


def cached_pass(dec: CoLLM, kind: str, seqs: list, compute, cache: Path | None) -> dict[str, torch.Tensor]:
    """``compute(seqs)`` -> tensors, or the ones stored under ``cache``/``kind``.safetensors for the same key."""
    if cache is None:
        return compute(seqs)
    path = Path(cache) / f"{kind}.safetensors"
    key = pass_key(dec, kind, seqs)
    hit = _load(path, key)
    if hit is not None:
        return hit
    out = compute(seqs)
    path.parent.mkdir(parents=True, exist_ok=True)
    _store(path, key, out)
    return out


@torch.inference_mode()
def teacher_forced_scores(dec: CoLLM, examples: list[Example], answers: dict[int, dict], batch_size: int = 8,
                          cache: Path | None = None):
    """Along given answers (e.g. the base's greedy ones): p_defer [N] and the base's probability of each token [N]."""
    from .train import features_for_batch, sequences

    def compute(seqs):
        ps, lps = [], []
        for s in range(0, len(seqs), batch_size):
            f = features_for_batch(dec.pair, seqs[s:s + batch_size], with_expert=False)
            ps.append(dec.head.p_defer(f["h"].float(), conf=f["conf"]).cpu())
            lps.append(f["lp_base"])
        return {"p_defer": torch.cat(ps), "p_token": torch.cat(lps).exp()}

    seqs = sequences(examples, dec.encode, dec.pair.tokenizer, answers)
    out = cached_pass(dec, "teacher-forced-base", seqs, compute, cache)
    return out["p_defer"], out["p_token"]


def _labelled_features(dec: CoLLM, seqs: list, batch_size: int):
    from .train import disagreement_labels, features_for_batch
    parts = [features_for_batch(dec.pair, seqs[s:s + batch_size], with_expert=False)
             for s in range(0, len(seqs), batch_size)]
    x = {k: torch.cat([f[k] for f in parts]) for k in ("h", "conf", "example")}   # example: per-problem resampling
    return x, torch.cat([disagreement_labels(f) for f in parts])   # the expert's argmax is the target here


@torch.inference_mode()
def proxy_features(dec: CoLLM, examples: list[Example], expert_answers: dict[int, dict], batch_size: int = 8):
    """Along the expert's greedy answers: what the head reads ({"h": [N, H], "conf": [N, 3]}, with each token's
    problem in "example" [N]) and whether the base's argmax differs [N]."""
    from .train import sequences
    return _labelled_features(dec, sequences(examples, dec.encode, dec.pair.tokenizer, expert_answers), batch_size)


def proxy_scores(p: torch.Tensor, z: torch.Tensor, fractions=(0.1, 0.2, 0.3)) -> dict:
    """AUC of p_defer [N] against the disagreements z [N], and the share of them caught at each deferral fraction."""
    from .train import auc
    out = {"tokens": int(len(p)), "disagreement_rate": float(z.mean()), "auc": auc(p, z)}
    for frac in fractions:
        k = max(1, int(len(p) * frac))
        out[f"recall_at_{round(frac * 100)}pct"] = float(z[p.topk(k).indices].sum() / z.sum().clamp_min(1))
    return out


@torch.inference_mode()
def disagreement_proxy(dec: CoLLM, examples: list[Example], expert_answers: dict[int, dict],
                       fractions=(0.1, 0.2, 0.3), batch_size: int = 8, cache: Path | None = None) -> dict:
    """Cheap check of a head without free generation: along the expert's greedy answers, how well does p_defer
    rank the positions where the base would have said something else?  Deferring at exactly those positions
    reproduces the expert's answer, so high recall at a low deferral fraction predicts expert-level accuracy.
    Only p_defer [N] and the disagreements [N] are cached, not the hidden states they came from."""
    from .train import sequences

    def compute(seqs):
        x, z = _labelled_features(dec, seqs, batch_size)
        return {"p_defer": dec.head.p_defer(x["h"].float(), conf=x["conf"]).cpu(), "disagree": z}

    seqs = sequences(examples, dec.encode, dec.pair.tokenizer, expert_answers)
    out = cached_pass(dec, "proxy-expert", seqs, compute, cache)
    return proxy_scores(out["p_defer"], out["disagree"], fractions)
