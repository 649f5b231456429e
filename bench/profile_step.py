"""Where a decode step's time goes: torch.profiler over n single-token steps of the base and of the expert
(KV cache, the prompt prefilled), grouped into weight matmuls, attention, the rest of the ATen ops, and what is
left of the wall time outside ATen ops (Python, module calls, dispatch).  Also a weights-only bandwidth floor:
bytes of weights read per step / the memory bandwidth a large copy reaches on this machine.

The torch engine only (torch.profiler sees ATen ops; llama.cpp's kernels are opaque to it).  The steps go
through the engine API as the decoder makes them (``common.greedy_stepper``: the base with hidden=True).

    python bench/profile_step.py [--tokens 32] [--threads N]     -> bench/out/profile_step.json
"""
from __future__ import annotations

import argparse
import time

import torch

try:
    from . import common as C
except ImportError:
    import common as C

GROUPS = {
    "weight matmuls (linear/mm/addmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                         "aten::_scaled_dot_product_attention_math"),
}


def bandwidth_gbs(mb: int = 1024) -> float:
    x = torch.empty(mb * 2**20, dtype=torch.uint8)
    y = torch.empty_like(x)
    y.copy_(x)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        ts.append(time.perf_counter() - t)
    return 2 * x.numel() / min(ts) / 1e9   # read + write


@torch.inference_mode()
def profile_model(engine, ids, n, hidden: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile
    step = C.greedy_stepper(engine, ids, hidden)
    try:
        logits = step(None)
        for _ in range(3):  # warm-up steps
            logits = step(int(logits.argmax()))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(n):
                logits = step(int(logits.argmax()))
            wall = time.perf_counter() - t
    finally:
        step.close()
    ev = prof.key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in ev}
    counts = {e.key: e.count for e in ev}
    total_ops = sum(self_us.values())
    out = {"step_ms_under_profiler": wall / n * 1e3, "groups_ms_per_step": {}, "ops_per_step": sum(counts.values()) / n}
    used = set()
    for g, keys in GROUPS.items():
        out["groups_ms_per_step"][g] = sum(self_us.get(k, 0) for k in keys) / n / 1e3
        used.update(keys)
    out["groups_ms_per_step"]["other ATen ops (norms, rotary, silu, cat, copies...)"] = \
        sum(v for k, v in self_us.items() if k not in used) / n / 1e3
    out["groups_ms_per_step"]["outside ATen ops (Python, modules, dispatch)"] = max(0.0, wall * 1e6 - total_ops) / n / 1e3
    out["top_ops"] = sorted(((k, v / n / 1e3, counts[k] / n) for k, v in self_us.items()), key=lambda r: -r[1])[:12]
    weight_bytes = sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters()
                       if "embed_tokens" not in name)  # the embedding is a row gather, not a full read
    out["weight_bytes_read_per_step_gb"] = weight_bytes / 1e9
    return out


def run(pair, n: int = 32) -> dict:
    ids = C.decoder(pair).encode(C.prompts(1)[0])
    bw = bandwidth_gbs()
    res = {"threads": torch.get_num_threads(), "n_steps": n, "copy_bandwidth_gbs": bw, "pair": C.describe(pair)}
    for name, engine, hidden in (("base", pair.base, True), ("expert", pair.expert, False)):
        r = profile_model(engine, ids, n, hidden)
        r["bandwidth_floor_ms"] = r["weight_bytes_read_per_step_gb"] / bw * 1e3
        res[name] = r
        C.log(f"[profile] {name}: {r['step_ms_under_profiler']:.1f} ms/step; " +
              "; ".join(f"{k} {v:.1f}" for k, v in r["groups_ms_per_step"].items()) +
              f"; bandwidth floor {r['bandwidth_floor_ms']:.1f} ms")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    pair, _ = C.load("torch", a.threads)
    print(C.write_json("profile_step.json", {"machine": C.machine(), "profile": run(pair, a.tokens)}))
