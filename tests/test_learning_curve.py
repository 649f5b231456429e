"""bench/learning_curve.py: the curve reads only complete shards, takes the pool's first N problems, and its
resampled intervals are paired over problems."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from learning_curve import load_cache, prefix_size, resampled, subset, table  # noqa: E402

from colm.train import FEATURE_KEYS  # noqa: E402


def features(examples: list[int], per: int = 3) -> dict:
    n = len(examples) * per
    return {"h": torch.randn(n, 4).to(torch.bfloat16), "conf": torch.rand(n, 3), "lp_base": -torch.rand(n),
            "lp_expert": -torch.rand(n), "arg_base": torch.randint(0, 5, (n,)), "arg_expert": torch.randint(0, 5, (n,)),
            "target": torch.randint(0, 5, (n,)), "example": torch.tensor(examples).repeat_interleave(per),
            "pos": torch.arange(per).repeat(len(examples))}


def pool(indices):
    return [SimpleNamespace(index=i) for i in indices]


def test_a_running_extraction_is_read_up_to_its_last_complete_shard(tmp_path):
    d = tmp_path / "gold"
    d.mkdir()
    save_file(features([10, 11]), str(d / "shard-00000.safetensors"))
    save_file(features([12, 13]), str(d / "shard-00001.safetensors"))
    save_file(features([14]), str(d / "shard-00002.safetensors.tmp"))      # being written
    manifest = {"identity": {"with_expert": True}, "shards": {"shard-00000.safetensors": "x",
                                                             "shard-00001.safetensors": "y"}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    f = load_cache(d)
    assert set(f) == set(FEATURE_KEYS) and f["example"].unique().tolist() == [10, 11, 12, 13]
    # The pool's order decides the prefix: problem 12 missing from the cache ends it.
    assert prefix_size(f, pool([10, 11, 12, 13, 14])) == 4
    assert prefix_size(f, pool([10, 11, 14, 12])) == 2
    sub = subset(f, pool([11, 10, 12]), 2)
    assert sorted(sub["example"].unique().tolist()) == [10, 11] and len(sub["h"]) == 6
    manifest["identity"]["with_expert"] = False
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):
        load_cache(d)


def test_resampled_intervals_are_paired_over_problems():
    torch.manual_seed(0)
    example = torch.arange(40).repeat_interleave(25)
    z = (torch.rand(len(example)) < 0.2).float()
    good = z + 0.8 * torch.randn(len(z))
    scores = {"good": good, "same": good.clone(), "noise": torch.randn(len(z))}
    res = resampled(scores, z, example, "good", reps=200)
    from colm.train import auc
    lo, hi = res["good"]["auc_ci"]
    assert lo < auc(good, z) < hi and hi - lo < 0.2       # an interval around the point, not a degenerate one
    assert res["good"]["auc_ci"][0] > res["noise"]["auc_ci"][1]
    assert res["same"]["vs_ref"] == 0 and res["same"]["vs_ref_ci"] == (0.0, 0.0)  # same draw for every head
    assert res["noise"]["vs_ref_ci"][1] < 0
    rows = [{"name": n, "problems": 40, "tokens": 1000, "val_auc": 0.8 if n == "good" else None,
             "proxy": {"auc": 0.5, "recall_at_10pct": 0.1, "recall_at_20pct": 0.2, "recall_at_30pct": 0.3, **r}}
            for n, r in res.items()]
    text = table(rows, "good")
    assert text.count("\n") == len(rows) + 1 and "0.10 / 0.20 / 0.30" in text and "| noise | 40 | 1000 | — |" in text
