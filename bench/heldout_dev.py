"""Held-out check of a head's stored threshold: the dev problems past the first ``--skip`` (200 by default), which
chose nothing.  One policy per process, so two processes can share the cores; the problems are sorted by question
length and batched identically under every policy, so runs stopped early still cover the same problems.

    python bench/heldout_dev.py expert|base|colm|random --out runs/heldout [--head H] [--rate 0.343] [--engine E]

Each run is a resumable JSONL file in ``--out`` (``colm.evaluate.run_policy`` / ``colm.rollouts.rollout``); the
last line printed is its summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere


def main() -> None:
    from colm.data import DEFAULT_DATA, read_jsonl, split
    from colm.decode import CoLLM, Policy
    from colm.evaluate import run_policy, summarize
    from colm.head import load_head
    from colm.engines import load_pair
    from colm.rollouts import rollout
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", choices=["expert", "base", "colm", "random"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--head", default=None, help="default: the shipped head")
    ap.add_argument("--skip", type=int, default=200, help="dev problems used to choose the threshold")
    ap.add_argument("--dev-size", type=int, default=300)
    ap.add_argument("--rate", type=float, default=0.343, help="random deferral rate")
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    ap.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    a = ap.parse_args()
    out = Path(a.out)
    # llama.cpp: 16 rows of up to 256 new tokens (as colm.loading sizes a batch of 16)
    pair = load_pair(engine=a.engine, threads=a.threads, n_seq=16, n_ctx=16 * (256 + 1024))
    head = load_head(pair, a.head)
    dec = CoLLM(pair, head)
    ex = sorted(split(read_jsonl(DEFAULT_DATA), a.dev_size)[1][a.skip:], key=lambda e: len(e.question))
    if a.policy in ("colm", "random"):
        policy = (Policy("colm", threshold=head.threshold) if a.policy == "colm"
                  else Policy("random", rate=a.rate, seed=0))
        name = f"colm-{head.threshold:.6f}" if a.policy == "colm" else f"random-{a.rate:.3f}"
        recs = run_policy(dec, ex, policy, out / f"{name}.jsonl", 16, 256)
        print(json.dumps(summarize(recs)))
    else:
        # window=1: keep the length order across batches, so the batches match run_policy's
        recs = rollout(dec, a.policy, ex, out / f"{a.policy}.jsonl", 16, 256, window=1)
        print(json.dumps(summarize(recs, a.policy)))


if __name__ == "__main__":
    main()
