"""Run the benchmark suite once, write bench/out/run-<stamp>[-quick].json (+ latest[-quick].json) and print the
headline ratios against the targets.

    python bench/run.py --quick          # < 5 min on a 2-core CPU: short answers, 1-2 repetitions, no cold start
    python bench/run.py                  # full: 128/256-token answers, 2-3 repetitions, cold start (~20 min)
    python bench/run.py --only decode,batch
    python bench/run.py --threads 1      # e.g. when other jobs keep a core busy (see docs/BENCHMARKS.md)

Sections: decode (items 1+3), paper (2), redecode (4), batch (5), startup (6), levers (7).
On a shared machine pause what you may pause around it; every timed block records how many cores other processes
used meanwhile (``foreign_cores``), and each block first waits (<= 20 s) for a quiet moment (--no-gate to skip).
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
        for name, m in d["modes"].items():
            if name.startswith("colm_random") or name == "colm_learned":
                f = m["deferral_fraction"]
                add(f"{name} f={f:.2f}: time/token over bound", f"{m['measured_over_bound']:.3f}", "<= 1.10",
                    m["measured_over_bound"] <= 1.10)
                add(f"{name} f={f:.2f}: tokens/s over expert-only", f"{m['speedup_vs_expert_only']:.2f}x",
                    ">= 2x if f <= 0.2", m["speedup_vs_expert_only"] >= 2 if f <= 0.2 else None)
        add("our loop over hf generate (base-only tokens/s)", f"{d['ours_over_hf_base']['paired']['median']:.3f}",
            ">= 0.95", d["ours_over_hf_base"]["paired"]["median"] >= 0.95)
        st = d["ours_over_hf_base"]["steady_state"]
        add("  same, per decode step (prefill excluded)", f"{st['ours_over_hf_per_step']:.3f}", ">= 0.95",
            st["ours_over_hf_per_step"] >= 0.95)
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
        if "cold" in s:
            add("cold start (s)", f"{s['cold']['spawn_to_ready_s']:.1f}", "<= 120", s["cold"]["spawn_to_ready_s"] <= 120)
        w = s["warm"]
        add("warm start load_pair (s, from spawn)", f"{w['spawn_to_ready_s']['median']:.1f}", "<= 20",
            w["spawn_to_ready_s"]["median"] <= 20)
        add("  + first 16-token decode (page-in) (s)", f"{w['first_decode_16_tokens_s']['median']:.1f}", "report", None)
        if s.get("app") and "ready_s" in s["app"]:
            add("python app.py until it serves (s)", f"{s['app']['ready_s']:.1f}", "<= 20", s["app"]["ready_s"] <= 20)
        add("peak RSS, both models + decode (GB, ru_maxrss)", f"{w['rss_after_decode_gb']:.2f}", "<= 6",
            w["rss_after_decode_gb"] <= 6)
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
    ap.add_argument("--no-gate", action="store_true", help="do not wait for a quiet moment before timed blocks")
    ap.add_argument("--compile", action="store_true", help="levers: also try torch.compile (slow to compile)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (default: torch's choice)")
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    # Start-up first, while this process is small: a child inherits its parent's ru_maxrss across fork+exec.
    only.sort(key=lambda s: s != "startup")
    bad = set(only) - set(SECTIONS)
    if bad:
        ap.error(f"unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    C.GATE["on"] = not a.no_gate
    C.GATE["max_wait"] = 5.0 if a.quick else 20.0
    # Quiet enough = the cores this run uses are free (other processes use at most the rest, plus a little).
    C.GATE["threshold"] = max(0.3, (os.cpu_count() or 1) - __import__("torch").get_num_threads() + 0.3)
    t_start = time.perf_counter()
    meta = {"machine": C.machine(), "command": " ".join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
            "quick": a.quick}
    res: dict = {}
    pair = None
    section_s = {}
    for s in only:
        if pair is None and s != "startup":
            pair, meta["load_pair_s"] = C.load()
            meta["dtype"] = str(pair.base.dtype)
            meta["attn"] = pair.base.config._attn_implementation
        t = time.perf_counter()
        C.log(f"== {s}")
        if s == "decode":
            import decode_speed
            res[s] = decode_speed.run(pair, a.quick)
        elif s == "paper":
            import paper_ref
            res[s] = paper_ref.run(pair, a.quick)
        elif s == "redecode":
            import redecode
            res[s] = redecode.run(pair, a.quick)
        elif s == "batch":
            import batch
            res[s] = batch.run(pair, a.quick)
        elif s == "startup":
            import startup
            res[s] = startup.run(a.quick)
        elif s == "levers":
            import levers
            res[s] = levers.run(pair, a.quick, do_compile=a.compile)
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
          f"{meta['machine']['cpu_model']}, {meta['machine']['torch_threads']} threads) -> {path}")
    for item, value, target, verdict in rows:
        print(f"  {item:<{w}}  {value:>12}  target {target:<16} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
