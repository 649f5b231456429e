"""Teacher-forced feature extraction (`colm.train.features_for_batch`) against the two models' plain prefill on the
same batches of GSM8K gold solutions: the issue asks for extraction within 1.5x of prefill throughput.

    python bench/extraction.py [--problems 16] [--batch 8] [--reps 3] [--engine auto|torch|llamacpp]

Per repetition, on every batch and interleaved (so machine noise hits both alike):
  prefill    the engine API as a decode's prefill: B rows opened, each whole prompt + target fed in one call (the
             base with its hidden state, keep=1 logits), rows closed; base and expert;
  extract    features_for_batch(pair, batch, with_expert=True): ``engine.score`` on both models, then log P(gold),
             argmaxes and the base's confidence features at every target position.
"""
from __future__ import annotations

import argparse
import time

import torch

try:
    from . import common as C
except ImportError:
    import common as C


def prefill(pair, batch) -> None:
    seqs = [p + t for _, p, t in batch]
    for engine, hidden in ((pair.base, True), (pair.expert, False)):
        rows = engine.open(len(seqs))
        try:
            engine.feed(rows, seqs, keep=1, hidden=hidden)
        finally:
            engine.close(rows)


@torch.inference_mode()
def run(pair, problems: int, batch_size: int, reps: int) -> dict:
    from colm.data import DEFAULT_DATA, read_jsonl, split
    from colm.decode import CoLLM
    from colm.train import features_for_batch, sequences
    train = split(read_jsonl(DEFAULT_DATA), 300)[0][:problems]
    seqs = sequences(train, CoLLM(pair).encode, pair.tokenizer)
    batches = [seqs[s:s + batch_size] for s in range(0, len(seqs), batch_size)]
    tokens = sum(len(p) + len(t) for _, p, t in seqs)
    modes = {"prefill": lambda b: prefill(pair, b),
             "extract": lambda b: features_for_batch(pair, b, with_expert=True)}
    for fn in modes.values():   # warm-up
        fn(batches[0][:1])
    secs = {m: [] for m in modes}
    for r in range(reps):
        for m, fn in (modes.items() if r % 2 == 0 else list(modes.items())[::-1]):
            t = time.perf_counter()
            for b in batches:
                fn(b)
            secs[m].append(time.perf_counter() - t)
            C.log(f"rep {r} {m}: {secs[m][-1]:.1f} s")
    out = {"pair": C.describe(pair), "problems": len(seqs), "batch_size": batch_size, "tokens": tokens,
           "target_tokens": sum(len(t) for _, _, t in seqs), "seconds": {m: C.summary(v) for m, v in secs.items()}}
    out["tokens_per_second"] = {m: tokens / C.med(v) for m, v in secs.items()}
    # Ratios paired by repetition, then the median: the machine's drift cancels within a repetition.
    out["extract_over_prefill"] = C.med([e / f for e, f in zip(secs["extract"], secs["prefill"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    C.add_engine_args(ap)
    a = ap.parse_args()
    pair, _ = C.load(a.engine, a.threads, n_seq=max(16, a.batch))
    res = run(pair, a.problems, a.batch, a.reps)
    print(C.write_json("extraction.json", {"machine": C.machine(), "extraction": res}))
    print({k: res[k] for k in ("tokens", "tokens_per_second", "extract_over_prefill")})


if __name__ == "__main__":
    main()
