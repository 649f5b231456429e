"""Item 5: batched evaluation throughput, ``CoLLM.generate_batch`` with the colm policy at batch 1, 4, 8, 16, on
either engine (``--engine``; bench/decode_speed.py --batch-sizes runs this on llamacpp).

Head: the shipped head at its threshold when assets/head-gsm8k.safetensors exists, else a random-weight head at
the threshold that gives ~25 % deferral on the probe.  Rows are the first B GSM8K questions (batch 1 = question 0,
so the single-sequence number is generate_batch on one prompt: the same code path).  EOS is ignored so every row
yields exactly n tokens; throughput = B * n / wall time (prefill included).  The quick run measures batch 1 and 8
only, with 32-token answers (prefill weighs more in short answers, so its ratio is lower than the full run's).
"""
from __future__ import annotations

import numpy as np

try:
    from . import common as C
except ImportError:
    import common as C


def pick_head(pair, ids, rate: float = 0.25):
    head = C.learned_head(pair)
    if head is not None:
        return head, head.threshold, "learned"
    head, p_sorted = C.random_head(pair, ids, seed=0)
    return head, float(np.quantile(p_sorted, 1 - rate)), "random"


def run(pair, quick: bool = False, n: int | None = None, reps: int | None = None, sizes=None) -> dict:
    from colm.decode import Policy
    n = n or (32 if quick else 64)
    sizes = sizes or ((1, 8) if quick else (1, 4, 8, 16))
    reps = reps or (1 if quick else 2)
    ps = C.prompts(max(sizes))
    probe = C.decoder(pair)
    head, thr, kind = pick_head(pair, probe.encode(ps[0]))
    dec = C.decoder(pair, head)
    pol = Policy("colm", threshold=thr)
    C.log(f"[batch] head={kind} threshold={thr:.4f}; warm-up")
    dec.generate_batch(ps[:2], pol, max_new_tokens=2)
    runs = {b: [] for b in sizes}
    for rep in range(reps):
        for b in (sizes if rep % 2 == 0 else sizes[::-1]):
            trs, nz = C.timed(dec.generate_batch, ps[:b], pol, n)
            steps_with_call = len({s.position for tr in trs for s in tr.steps if s.source == "expert"})
            runs[b].append({"wall_s": nz["wall_s"], "tokens": sum(len(t.steps) for t in trs),
                            "row_deferral": float(np.mean([t.deferral_rate for t in trs])),
                            "expert_call_fraction": steps_with_call / n,
                            "prompt_tokens": [len(t.prompt_ids) for t in trs], "noise": nz})
            C.log(f"[batch] rep {rep} B={b:2d} {nz['wall_s']:7.2f}s  {runs[b][-1]['tokens'] / nz['wall_s']:6.2f} tok/s"
                  f"  row deferral {runs[b][-1]['row_deferral']:.2f}  foreign={nz['foreign_cores']:.2f}")
    table = {}
    for b, rs in runs.items():
        table[b] = {"tokens_per_s": C.summary([r["tokens"] / r["wall_s"] for r in rs]),
                    "row_deferral": rs[0]["row_deferral"], "expert_call_fraction": rs[0]["expert_call_fraction"],
                    "tokens": rs[0]["tokens"]}
    one = table[sizes[0]]["tokens_per_s"]["median"]
    for b in table:
        table[b]["speedup_vs_batch1"] = table[b]["tokens_per_s"]["median"] / one
    return {"n_tokens": n, "reps": reps, "head": kind, "threshold": thr, "sizes": table,
            "runs": {str(b): rs for b, rs in runs.items()}}


if __name__ == "__main__":
    C.script_main("batch", "batch", run)
