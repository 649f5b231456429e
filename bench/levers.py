"""Item 7: CPU levers, measured on the raw engine step loops (t_base_step, t_expert_step, prompt prefill).

  threads    1 thread vs the run's count (default: every core); both engines (torch: torch.set_num_threads;
             llamacpp: llama_set_n_threads on both contexts)
  attention  SDPA (the default) vs eager, switched in place with set_attn_implementation   (torch engine only)
  dtype      bf16 (what pick_dtype('auto') picks on CPUs with AVX512-BF16/AMX) vs fp32 (both models reloaded)
                                                                                          (torch engine only)
  compile    torch.compile of the base backbone (opt-in: --compile; minutes of compile time)  (torch engine only)

Each lever's variants are interleaved per repetition; medians.

    python bench/levers.py [--engine torch|llamacpp] [--quick] [--tokens 32] [--reps 2] [--compile] [--no-dtype]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

try:
    from . import common as C
except ImportError:
    import common as C


def _steps(pair, ids, n, base=None, expert=None) -> dict:
    rb = C.raw_decode(base or pair.base, ids, n, hidden=True)
    re = C.raw_decode(expert or pair.expert, ids, n, hidden=False)
    return {"base_step_s": rb["step_s"], "expert_step_s": re["step_s"], "base_prefill_s": rb["prefill_s"],
            "expert_prefill_s": re["prefill_s"], "same_base_tokens": rb["tokens"]}


def _set_threads(pair, k: int) -> None:
    if pair.engine == "torch":
        torch.set_num_threads(k)
        return
    for eng in (pair.base, pair.expert):
        eng.L.llama_set_n_threads(eng.ctx, k, k)
        eng.threads = k


def _table(runs: dict) -> dict:
    out = {}
    for name, rs in runs.items():
        out[name] = {k: C.summary([r[k] for r in rs]) for k in ("base_step_s", "expert_step_s", "base_prefill_s",
                                                              "expert_prefill_s")}
        out[name]["foreign_cores"] = C.summary([r["noise"]["foreign_cores"] for r in rs])
    return out


def _compare(variants: dict, reps: int, label: str) -> dict:
    runs = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            r, nz = C.timed(variants[name])
            r["noise"] = nz
            runs[name].append(r)
            C.log(f"[levers] {label} rep {rep} {name:8s} base {r['base_step_s'] * 1e3:6.1f} ms  expert "
                  f"{r['expert_step_s'] * 1e3:6.1f} ms  prefill b/e {r['base_prefill_s']:.2f}/{r['expert_prefill_s']:.2f}s"
                  f"  foreign={nz['foreign_cores']:.2f}")
    return _table(runs)


def run(pair, quick: bool = False, n: int | None = None, reps: int | None = None, do_dtype: bool | None = None,
        do_compile: bool = False) -> dict:
    from colm.models import pick_dtype
    n = n or (12 if quick else 32)
    reps = reps or (1 if quick else 2)
    do_dtype = (not quick) if do_dtype is None else do_dtype
    ids = C.decoder(pair).encode(C.prompts(1)[0])
    out = {"n_tokens": n, "reps": reps, "pair": C.describe(pair), "pick_dtype_auto": str(pick_dtype("auto", "cpu"))}
    _steps(pair, ids, 4)  # warm-up

    # threads
    default = getattr(pair.base, "threads", None) or torch.get_num_threads()

    def threads(k):
        def f():
            _set_threads(pair, k)
            try:
                return _steps(pair, ids, n)
            finally:
                _set_threads(pair, default)
        return f
    out["threads"] = _compare({f"{k}": threads(k) for k in sorted({1, max(2, default)})}, reps, "threads")

    if quick or pair.engine != "torch":   # attention, dtype and compile: full-run levers of the torch engine
        return out
    base, expert = pair.base.model, pair.expert.model

    # attention
    def attn(impl):
        def f():
            for m in (base, expert):
                m.set_attn_implementation(impl)
            try:
                return _steps(pair, ids, n)
            finally:
                for m in (base, expert):
                    m.set_attn_implementation("sdpa")
        return f
    out["attention"] = _compare({"sdpa": attn("sdpa"), "eager": attn("eager")}, reps, "attention")

    # dtype: the fp32 pair is loaded once (about 8 GB) and freed afterwards
    if do_dtype:
        from colm.engines.torch_engine import TorchEngine
        from colm.models import load_model
        C.log("[levers] loading fp32 models")
        t = time.perf_counter()
        V = len(pair.tokenizer)
        b32 = TorchEngine(load_model("default", "base", dtype="fp32"), V, default)
        e32 = TorchEngine(load_model("default", "expert", dtype="fp32"), V, default)
        out["fp32_load_s"] = time.perf_counter() - t
        _steps(pair, ids, 4, b32, e32)
        out["dtype"] = _compare({"bf16": lambda: _steps(pair, ids, n),
                                 "fp32": lambda: _steps(pair, ids, n, b32, e32)}, reps, "dtype")
        del b32, e32
        gc.collect()

    if do_compile:
        out["compile"] = compile_check(pair, ids, n, reps)
    return out


def compile_check(pair, ids, n, reps) -> dict:
    """torch.compile of the base backbone with the dynamic cache (dynamic shapes); compile time reported apart."""
    model = pair.base.model
    backbone = model.model
    compiled = torch.compile(backbone, dynamic=True)
    t = time.perf_counter()
    model.model = compiled
    try:
        C.raw_decode(pair.base, ids, 4, hidden=True)
        first = time.perf_counter() - t
        res = _compare({"eager_mode": lambda: (setattr(model, "model", backbone), _steps(pair, ids, n))[1],
                        "compiled": lambda: (setattr(model, "model", compiled), _steps(pair, ids, n))[1]},
                       reps, "compile")
    finally:
        model.model = backbone
    res["compile_and_first_calls_s"] = first
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-dtype", action="store_true")
    C.add_engine_args(ap)
    a = ap.parse_args()
    C.apply_gate(a)
    pair, _ = C.load(a.engine, a.threads)
    res = run(pair, a.quick, a.tokens, a.reps, False if a.no_dtype else None, a.compile)
    print(C.write_json("levers.json", {"machine": C.machine(), "levers": res}))
