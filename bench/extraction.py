"""Teacher-forced feature extraction (`colm.train.features_for_batch`) against the two models' plain forward on the
same padded batches of GSM8K gold solutions: the issue asks for extraction within 1.5x of prefill throughput.

    python bench/extraction.py [--problems 16] [--batch 8] [--reps 3]

Per repetition, on every batch and interleaved (so machine noise hits all three alike):
  forward    base(...) and expert(...) with full logits, as a plain ``model(input_ids, attention_mask)`` call;
  backbone   base.base_model(...) and expert.base_model(...): no LM head at all, the floor;
  extract    features_for_batch(pair, batch, with_expert=True): both backbones, then log P(gold), argmaxes and the
             base's confidence features from the target rows only, in chunks.
"""
from __future__ import annotations

import argparse
import time

import torch

try:
    from . import common as C
except ImportError:
    import common as C


def _both(pair, batch, run):
    """Pad the batch once and call ``run(model, ids, mask)`` on the base and the expert."""
    from colm.train import right_pad
    ids, mask = right_pad([p + t for _, p, t in batch], pair.tokenizer.pad_token_id)
    ids, mask = ids.to(pair.device), mask.to(pair.device)
    return [run(m, ids, mask) for m in (pair.base, pair.expert)]


@torch.inference_mode()
def run(pair, problems: int, batch_size: int, reps: int) -> dict:
    from colm.data import DEFAULT_DATA, read_jsonl, split
    from colm.decode import CoLLM
    from colm.train import features_for_batch, sequences
    train = split(read_jsonl(DEFAULT_DATA), 300)[0][:problems]
    seqs = sequences(train, CoLLM(pair).encode, pair.tokenizer)
    batches = [seqs[s:s + batch_size] for s in range(0, len(seqs), batch_size)]
    tokens = sum(len(p) + len(t) for _, p, t in seqs)
    modes = {
        "forward": lambda b: _both(pair, b, lambda m, i, k: m(input_ids=i, attention_mask=k).logits),
        "backbone": lambda b: _both(pair, b, lambda m, i, k: m.base_model(input_ids=i, attention_mask=k)
                                    .last_hidden_state),
        "extract": lambda b: features_for_batch(pair, b, with_expert=True),
    }
    modes["extract"](batches[0][:1])  # warm-up
    secs = {m: [] for m in modes}
    for r in range(reps):
        for m, fn in modes.items():
            t = time.perf_counter()
            for b in batches:
                fn(b)
            secs[m].append(time.perf_counter() - t)
            C.log(f"rep {r} {m}: {secs[m][-1]:.1f} s")
    out = {"problems": len(seqs), "batch_size": batch_size, "tokens": tokens,
           "target_tokens": sum(len(t) for _, _, t in seqs), "seconds": {m: C.summary(v) for m, v in secs.items()}}
    out["tokens_per_second"] = {m: tokens / C.med(v) for m, v in secs.items()}
    # Ratios paired by repetition, then the median: the machine's drift cancels within a repetition.
    out["extract_over_forward"] = C.med([e / f for e, f in zip(secs["extract"], secs["forward"])])
    out["extract_over_backbone"] = C.med([e / f for e, f in zip(secs["extract"], secs["backbone"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    pair, _ = C.load()
    res = run(pair, a.problems, a.batch, a.reps)
    print(C.write_json("extraction.json", {"machine": C.machine(), "extraction": res}))
    print({k: res[k] for k in ("tokens", "tokens_per_second", "extract_over_forward", "extract_over_backbone")})


if __name__ == "__main__":
    main()
