"""Render a bench/run.py JSON as the Markdown tables used in docs/BENCHMARKS.md.

    python bench/report.py bench/out/latest.json > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys


def _ms(x):
    return f"{x * 1e3:.1f}"


def _med(s, scale=1.0, fmt="{:.2f}"):
    return fmt.format(s["median"] * scale) + f" ({fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)})"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(d: dict) -> str:
    m = d["meta"]
    mc = m["machine"]
    parts = [f"Command: `{m['command']}` — {mc['date']} — {mc['cpu_model']}, {mc['cpus']} CPUs, "
             f"{mc['mem_gb']} GB, torch {mc['torch']} ({mc['torch_threads']} threads), transformers "
             f"{mc['transformers']}, {m.get('dtype', '')}, git {mc['git']}; total {m['total_s']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in m['section_s'].items())})."]
    rows = [(h["item"], h["measured"], h["target"], h["verdict"]) for h in d["headline"]]
    parts.append("### Headline\n\n" + table(("item", "measured", "target", "verdict"), rows))

    if "decode" in d:
        x = d["decode"]
        parts.append(f"### Decode speed ({x['n_tokens']} tokens, prompt {x['prompt_tokens']} tokens, {x['reps']} reps)")
        parts.append(f"t_base_step = {_ms(x['t_base_step_s']['median'])} ms, t_expert_step = "
                     f"{_ms(x['t_expert_step_s']['median'])} ms (medians; ranges "
                     f"{_ms(x['t_base_step_s']['min'])}–{_ms(x['t_base_step_s']['max'])} and "
                     f"{_ms(x['t_expert_step_s']['min'])}–{_ms(x['t_expert_step_s']['max'])}); prompt prefill base "
                     f"{x['t_base_prefill_s']:.3f} s, expert {x['t_expert_prefill_s']:.3f} s.")
        rows = []
        for name, r in x["modes"].items():
            rows.append((name, _med(r["tokens_per_s"]), f"{r.get('deferral_fraction', '-') if 'deferral_fraction' not in r else round(r['deferral_fraction'], 3)}",
                         _ms(r["per_token_s"]["median"]) if "per_token_s" in r else "-",
                         _ms(r["bound_per_token_s"]) if "bound_per_token_s" in r else "-",
                         f"{r['measured_over_bound']:.3f}" if "measured_over_bound" in r else "-",
                         f"{r['speedup_vs_expert_only']:.2f}x", f"{r['foreign_cores']['median']:.2f}"))
        parts.append(table(("mode", "tokens/s median (min–max)", "f", "ms/token (excl. base prefill)",
                            "bound ms/token", "measured/bound", "vs expert-only", "foreign cores"), rows))
        c = x["catchup_cost"]
        parts.append("Expert catch-up of k pending tokens, relative to k = 1: " +
                     ", ".join(f"k={k}: {v:.2f}" for k, v in c["relative_to_k1"].items()) + ".")
        h = x["ours_over_hf_base"]
        st = h["steady_state"]
        parts.append(f"Ours / HF (tokens/s, paired by repetition): {_med(h['paired'], fmt='{:.3f}')}; per decode step "
                     f"(prefill excluded): ours {_ms(st['colm_base_s'])} ms, HF {_ms(st['hf_base_s'])} ms, raw loop "
                     f"{_ms(st['raw_base_s'])} ms -> {st['ours_over_hf_per_step']:.3f}; prefill + first token: ours "
                     f"{st['colm_base_prefill_s']:.3f} s, HF {st['hf_prefill_plus_first_token_s']:.3f} s. Same tokens "
                     f"as the raw loop: {x['same_tokens_as_raw_base']}.")
    if "paper" in d:
        x = d["paper"]
        parts.append(f"### Paper-style reference ({x['n_tokens']} tokens, random {x['rate']}, f = "
                     f"{x['deferral_fraction']:.3f}, {x['reps']} reps)")
        rows = [(k, _med(v), x["expert_tokens_fed"][k]) for k, v in x["tokens_per_s"].items()]
        parts.append(table(("loop", "tokens/s median (min–max)", "tokens through the expert"), rows))
        parts.append(f"Speed-up (paired): {_med(x['speedup'])}x; same tokens: {x['same_tokens']} "
                     f"(first difference at {x['first_token_difference']}).")
    if "redecode" in d:
        x = d["redecode"]
        parts.append(f"### Re-decode ({x['n_tokens']} tokens, eta = {x['eta']:.6f}, original f = "
                     f"{x['deferral_fraction_original']:.3f}, {x['reps']} reps)")
        rows = []
        for q, t in x["targets"].items():
            rows.append((f"{float(q):.0%}", t["first_flip"], f"{t['changed_fraction']:.3f}", _med(t["redecode_s"]),
                         f"{t['full_decode_s']:.2f}", f"{t['time_ratio']:.3f}", f"{t['ratio_over_changed_fraction']:.2f}",
                         t["equals_full_decode"]))
        parts.append(table(("target", "first flip", "changed fraction", "redecode s median (min–max)", "full decode s",
                            "redecode/full", "÷ changed fraction", "equals full decode"), rows))
    if "batch" in d:
        x = d["batch"]
        parts.append(f"### Batched ({x['n_tokens']} tokens per row, {x['head']} head at {x['threshold']:.4f}, "
                     f"{x['reps']} reps)")
        rows = [(b, _med(v["tokens_per_s"]), f"{v['speedup_vs_batch1']:.2f}x", f"{v['row_deferral']:.3f}",
                 f"{v['expert_call_fraction']:.3f}") for b, v in x["sizes"].items()]
        parts.append(table(("batch", "tokens/s median (min–max)", "vs batch 1", "row deferral",
                            "steps with an expert call"), rows))
    if "startup" in d:
        x = d["startup"]
        w = x["warm"]
        rows = []
        if "cold" in x:
            c = x["cold"]
            rows.append(("cold (fresh cache dir)", f"{c['spawn_to_ready_s']:.1f}", f"{c['load_pair_s']:.1f}",
                         f"{c['first_decode_16_tokens_s']:.1f}", f"{c['rss_after_decode_gb']:.2f}",
                         f"{c.get('vm_hwm_after_decode_gb', float('nan')):.2f}"))
        rows.append(("warm (median)", f"{w['spawn_to_ready_s']['median']:.1f}", f"{w['load_pair_s']['median']:.1f}",
                     f"{w['first_decode_16_tokens_s']['median']:.1f}", f"{w['rss_after_decode_gb']:.2f}",
                     f"{w['vm_hwm_after_decode_gb']:.2f}"))
        parts.append("### Start-up and memory\n\n" + table(
            ("start", "spawn→ready s", "load_pair s", "first 16-token decode s", "ru_maxrss GB", "VmHWM GB"), rows))
        if "cold" in x:
            parts.append(f"Cold stages (s from child start, message): {x['cold']['stages']}; cache written "
                         f"{x['cold']['cache_gb']:.2f} GB.")
        if x.get("app"):
            parts.append(f"`python app.py` until GET / answers: {x['app']}.")
    if "levers" in d:
        x = d["levers"]
        parts.append(f"### CPU levers ({x['n_tokens']} tokens, {x['reps']} reps; pick_dtype('auto') = "
                     f"{x['pick_dtype_auto']})")
        rows = []
        for lever in ("threads", "attention", "dtype", "compile"):
            if lever not in x:
                continue
            for name, v in x[lever].items():
                if not isinstance(v, dict) or "base_step_s" not in v:
                    continue
                rows.append((lever, name, _ms(v["base_step_s"]["median"]), _ms(v["expert_step_s"]["median"]),
                             f"{v['base_prefill_s']['median']:.3f}", f"{v['expert_prefill_s']['median']:.3f}",
                             f"{v['foreign_cores']['median']:.2f}"))
        parts.append(table(("lever", "variant", "base step ms", "expert step ms", "base prefill s",
                            "expert prefill s", "foreign cores"), rows))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
