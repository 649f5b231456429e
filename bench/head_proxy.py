"""Compare deferral heads on the teacher-forced disagreement proxy (``colm.evaluate.disagreement_proxy``) without
free generation: the base's features along the expert's greedy dev answers are computed once and every head is
scored on them.

    python bench/head_proxy.py --answers runs/eval3/runs/expert.jsonl --limit 200 HEAD.safetensors [HEAD ...]
        [--engine auto|torch|llamacpp] [--threads N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

try:
    from . import common as C
except ImportError:
    import common as C


def main() -> None:
    from colm.data import DEFAULT_DATA, read_jsonl, split
    from colm.decode import CoLLM
    from colm.evaluate import proxy_features, proxy_scores
    from colm.head import DeferralHead
    from colm.rollouts import read_done
    ap = argparse.ArgumentParser()
    ap.add_argument("heads", nargs="+")
    ap.add_argument("--answers", required=True, help="the expert's dev answers (JSONL from `colm rollouts`)")
    ap.add_argument("--limit", type=int, default=200)
    C.add_engine_args(ap)
    a = ap.parse_args()
    pair, _ = C.load(a.engine, a.threads)
    dev = split(read_jsonl(DEFAULT_DATA), 300)[1][:a.limit]
    x, z = proxy_features(CoLLM(pair), dev, read_done(Path(a.answers)))
    score = lambda head: head.p_defer(x["h"].float(), conf=x["conf"]).detach()
    res = {"pair": C.describe(pair), "problems": len(dev), "heads": {Path(p).name: proxy_scores(score(DeferralHead.load(p)), z) for p in a.heads},
           # the confidence policy's ranking (defer where the base's top probability is lowest), for reference
           "confidence": proxy_scores(1 - x["conf"][:, 0], z)}
    print(C.write_json("head_proxy.json", {"machine": C.machine(), **res}))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
