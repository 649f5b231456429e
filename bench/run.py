"""Run the benchmark suite once, write bench/out/run-<stamp>[-quick].json (+ latest[-quick].json) and print the
headline ratios against the targets.

    python bench/run.py --quick          # short answers, 1-2 repetitions, no cold start
    python bench/run.py                  # full: 128/256-token answers, 2-3 repetitions, cold start
    python bench/run.py --only decode,batch --engine torch --threads 2
    python bench/run.py --quick --tokens 4 --reps 1 --no-gate         # a smoke run of every section

Sections (one pair, --engine, loaded once): decode (items 1+3), paper (2), redecode (4), batch (5), startup (6),
levers (7).  On a shared machine pause what you may pause around it; every timed block records how many cores other
processes used meanwhile (``foreign_cores``), and each block first waits (<= 20 s) for a quiet moment (--no-gate to
skip).  Every script takes --engine auto|torch|llamacpp (default auto: llama.cpp on a CPU) and --threads N.

The scripts in bench/ (each writes bench/out/<name>.json; nothing here asserts a speed):
  common.py        shared: machine facts, noise monitor and quiet gate, summaries, prompts, heads (shipped/random),
                   raw greedy engine step loops (t_base_step, t_expert_step)
  decode_speed.py  issue 17, THE engine comparison: torch and llama.cpp in one run, raw base/expert steps, CoLLM
                   base-only / expert-only / random / shipped head against the cost bound t_b + f*t_e,
                   llamacpp/torch ratios, expert catch-up cost vs k; --batch-sizes: generate_batch on llamacpp
  paper_ref.py     our loop against the paper's (expert re-fed the whole prefix at every deferral, no expert cache)
  redecode.py      the threshold slider: redecode with its first flip at 25/50/90 % vs a full decode
  batch.py         CoLLM.generate_batch throughput at batch 1, 4, 8, 16 (tokens/s over all rows)
  startup.py       cold (empty COLM_CACHE_DIR) and warm start to first token and to app.py serving, peak RSS
  levers.py        CPU levers on the raw step loops: threads (both engines); attention, dtype, compile (torch)
  profile_step.py  torch.profiler breakdown of one decode step and a weight-bandwidth floor (torch engine)
  extraction.py    teacher-forced feature extraction (features_for_batch) against plain prefill throughput
  load.py          the web demo under concurrent sessions and Stop presses: correctness, RSS and thread counts
  heldout_dev.py   held-out dev accuracy of one policy (resumable run file), for a head's stored threshold
  head_proxy.py    heads compared on the teacher-forced disagreement proxy (AUC, recall at deferral budgets)
  screenshot.py    regenerate assets/screenshot.png from the real app in headless Chromium
  report.py        render a run.py JSON as the Markdown tables of docs/BENCHMARKS.md
  make_head_fixture.py  regenerate tests/data/shipped_head_fixture.safetensors (llama.cpp base features)
  gpu_joint.py, gpu_check.sh  device placement and joint LoRA training on a GPU (torch engine; a lent GPU only)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

SECTIONS = ("decode", "paper", "redecode", "batch", "startup", "levers")


def headline(res: dict) -> list[tuple[str, str, str, str]]:
    """(item, measured, target, verdict) rows."""
    rows = []

    def add(item, value, target, ok):
        rows.append((item, value, target, "met" if ok else "MISSED" if ok is not None else "-"))

    d = res.get("decode")
    if d:
        for eng, e in d["engines"].items():
            for name, m in e["modes"].items():
                if name.startswith("colm_random") or name == "colm_learned":
                    f = m["deferral_fraction"]
                    add(f"{eng} {name} f={f:.2f}: time/token over bound", f"{m['measured_over_bound']:.3f}",
                        "<= 1.10", m["measured_over_bound"] <= 1.10)
                    add(f"{eng} {name} f={f:.2f}: tokens/s over raw expert", f"{m['speedup_vs_raw_expert']:.2f}x",
                        ">= 2x if f <= 0.2", m["speedup_vs_raw_expert"] >= 2 if f <= 0.2 else None)
            add(f"{eng} base-only loop step over raw base step",
                f"{e['loop_overhead']['base_only_step_over_raw_base_step']:.3f}", "report", None)
        for name, v in d.get("engine_ratio", {}).get("tokens_per_s", {}).items():
            add(f"llamacpp / torch tokens/s, {name}", f"{v['paired']['median']:.2f}x", "report", None)
    p = res.get("paper")
    if p:
        add(f"speed-up over paper-style, {p['n_tokens']} tokens, f={p['deferral_fraction']:.2f}",
            f"{p['speedup']['median']:.2f}x", "report", None)
    r = res.get("redecode")
    if r:
        for q, t in r["targets"].items():
            add(f"redecode flip at {t['first_flip']}/{r['n_tokens']}: time / full", f"{t['time_ratio']:.3f}",
                f"~ changed {t['changed_fraction']:.2f}", t["ratio_over_changed_fraction"] <= 1.25)
    b = res.get("batch")
    if b:
        s = b["sizes"]
        for k, v in s.items():
            add(f"batch {k} tokens/s over batch 1", f"{v['speedup_vs_batch1']:.2f}x",
                ">= 3x" if str(k) == "8" else "report", v["speedup_vs_batch1"] >= 3 if str(k) == "8" else None)
    s = res.get("startup")
    if s:
        eng = s.get("engine", "?")
        if "cold" in s:
            add(f"cold start to first token ({eng}, s)", f"{s['cold']['spawn_to_first_token_s']:.1f}", "<= 120",
                s["cold"]["spawn_to_first_token_s"] <= 120)
        w = s["warm"]
        add(f"warm start to first token ({eng}, s, from spawn)", f"{w['spawn_to_first_token_s']['median']:.1f}",
            "<= 20", w["spawn_to_first_token_s"]["median"] <= 20)
        a = s.get("app")
        if a and a.get("ready_s"):
            add("python app.py until the demo is served (s)", f"{a['ready_s']['median']:.1f}", "<= 20",
                a["ready_s"]["median"] <= 20)
        add("peak RSS, both models + 16-token decode (GB, VmHWM)", f"{w['vm_hwm_after_16_tokens_gb']:.2f}", "<= 6",
            w["vm_hwm_after_16_tokens_gb"] <= 6)
    lv = res.get("levers")
    if lv:
        def ratio(tab, a, b_, key):
            return tab[a][key]["median"] / tab[b_][key]["median"]
        t = lv["threads"]
        names = list(t)
        add(f"threads {names[0]} over {names[-1]}: base / expert step time",
            f"{ratio(t, names[0], names[-1], 'base_step_s'):.2f} / {ratio(t, names[0], names[-1], 'expert_step_s'):.2f}",
            "report", None)
        if "attention" in lv:
            a = lv["attention"]
            add("eager over sdpa: base / expert step time",
                f"{ratio(a, 'eager', 'sdpa', 'base_step_s'):.2f} / {ratio(a, 'eager', 'sdpa', 'expert_step_s'):.2f}",
                "report", None)
        if "dtype" in lv:
            dt = lv["dtype"]
            add("fp32 over bf16: base / expert step time",
                f"{ratio(dt, 'fp32', 'bf16', 'base_step_s'):.2f} / {ratio(dt, 'fp32', 'bf16', 'expert_step_s'):.2f}",
                f"auto picks {lv['pick_dtype_auto']}", None)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--compile", action="store_true", help="levers: also try torch.compile (torch engine; slow)")
    ap.add_argument("--tokens", type=int, help="tokens per answer in every section (default: each section's own)")
    ap.add_argument("--reps", type=int, help="repetitions in every section (default: each section's own)")
    C.add_engine_args(ap)
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    # Start-up first, while this process is small.
    only.sort(key=lambda s: s != "startup")
    bad = set(only) - set(SECTIONS)
    if bad:
        ap.error(f"unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    from colm.engines import default_threads
    threads = a.threads or default_threads()
    C.GATE["on"] = not a.no_gate
    C.GATE["max_wait"] = 5.0 if a.quick else 20.0
    # Quiet enough = the cores this run uses are free (other processes use at most the rest, plus a little).
    C.GATE["threshold"] = max(0.3, (os.cpu_count() or 1) - threads + 0.3)
    t_start = time.perf_counter()
    meta = {"machine": C.machine(), "command": " ".join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
            "quick": a.quick}
    res: dict = {}
    pair = None
    section_s = {}
    for s in only:
        if pair is None and s != "startup":
            pair, meta["load_pair_s"] = C.load(a.engine, a.threads)
            meta["pair"] = C.describe(pair)
        t = time.perf_counter()
        C.log(f"== {s}")
        if s == "decode":      # the suite's engine only; both engines at once: bench/decode_speed.py
            import decode_speed
            res[s] = decode_speed.run({pair.engine: pair}, a.quick, a.tokens, a.reps)
        elif s == "paper":
            import paper_ref
            res[s] = paper_ref.run(pair, a.quick, a.tokens, a.reps)
        elif s == "redecode":
            import redecode
            res[s] = redecode.run(pair, a.quick, a.tokens, a.reps)
        elif s == "batch":
            import batch
            res[s] = batch.run(pair, a.quick, a.tokens, a.reps)
        elif s == "startup":
            import startup
            res[s] = startup.run(a.quick, a.reps, engine=a.engine, threads=a.threads)
        elif s == "levers":
            import levers
            res[s] = levers.run(pair, a.quick, a.tokens, a.reps, do_compile=a.compile)
        section_s[s] = time.perf_counter() - t
    meta["section_s"] = section_s
    meta["total_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = list(os.getloadavg())
    meta["gate"] = dict(C.GATE)
    rows = headline(res)
    out = {"meta": meta, "headline": [dict(zip(("item", "measured", "target", "verdict"), r)) for r in rows], **res}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = "-quick" if a.quick else ""
    path = C.write_json(f"run-{stamp}{suffix}.json", out)
    C.write_json(f"latest{suffix}.json", out)
    w = max(len(r[0]) for r in rows) if rows else 10
    print(f"\nheadline ({'quick' if a.quick else 'full'} run, {meta['total_s']:.0f} s, "
          f"{meta['machine']['cpu_model']}, {threads} threads) -> {path}")
    for item, value, target, verdict in rows:
        print(f"  {item:<{w}}  {value:>12}  target {target:<16} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
