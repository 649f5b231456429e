"""Render a bench/run.py JSON as the Markdown tables used in docs/BENCHMARKS.md.

    python bench/report.py bench/out/latest.json > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_speed  # noqa: E402
import startup  # noqa: E402


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
             f"{mc['mem_gb']} GB, torch {mc['torch']}, transformers {mc['transformers']}, llama-cpp-python "
             f"{mc.get('llama_cpp_python')}, pair {m.get('pair')}, git {mc['git']}; total {m['total_s']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in m['section_s'].items())})."]
    rows = [(h["item"], h["measured"], h["target"], h["verdict"]) for h in d["headline"]]
    parts.append("### Headline\n\n" + table(("item", "measured", "target", "verdict"), rows))

    if "decode" in d:
        parts.append("### Decode speed\n\n" + decode_speed.markdown(d["decode"]))
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
        parts.append("### Start-up and memory\n\n" + startup.markdown(d["startup"]))
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
