"""Labels for the deferral head: weak supervision (paper, Sec. 3.2) and base-vs-expert disagreement, and which model
wrote a rollouts file (which decides how its tokens are labelled)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import ColmError


def weak_labels(f: dict) -> torch.Tensor:
    """Z = 1 where the expert's argmax is the gold token and the base's is not."""
    return ((f["arg_expert"] == f["target"]) & (f["arg_base"] != f["target"])).float()


def disagreement_labels(f: dict) -> torch.Tensor:
    """Z = 1 where the two models' next-token argmaxes differ: deferring exactly there reproduces the expert's greedy
    choice.  Along the expert's own greedy answer its argmax *is* the target, so those features skip the expert
    (arg_expert = -1) and compare with the target; gold prefixes and base answers carry both argmaxes."""
    has_expert = f["arg_expert"] >= 0
    return torch.where(has_expert, f["arg_base"] != f["arg_expert"], f["arg_base"] != f["target"]).float()


def rollout_model(recs: dict[int, dict], path: Path) -> str:
    """Which model wrote a rollouts file.  Every record must say: guessing would silently flip what the labels mean
    (along the base's answers the base's argmax is the text, so "disagreement" would be nearly always 0)."""
    models = {r.get("model") for r in recs.values()}
    if len(models) != 1 or not models <= {"base", "expert", "colm"}:
        raise ColmError(f"{path}: every rollout record must name its model, and one model, base, expert or colm (found "
                        f"{sorted(map(str, models))}); `python -m colm rollouts` writes that field")
    return models.pop()
