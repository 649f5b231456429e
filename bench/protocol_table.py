"""An evaluation's results.json as the markdown tables README and docs/BENCHMARKS.md show: every policy's accuracy
with its 95 % Wilson interval and count, its deferral, how many answers hit the token cap; then Co-LLM against
each other policy on the same problems (paired bootstrap interval of the difference, discordant counts, McNemar).
A results.json written part-way (random seeds still running) renders what it has.

    python bench/protocol_table.py runs/evalB512/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def acc(p: dict) -> str:
    lo, hi = p["accuracy_ci"]
    return f"{pct(p['accuracy'])} % [{pct(lo)}, {pct(hi)}] ({round(p['accuracy'] * p['n'])}/{p['n']})"


def policy_rows(res: dict) -> list[str]:
    rows = ["| policy | accuracy (95 % Wilson) | deferral | answers at the cap | mean tokens |",
            "|---|---|---|---|---|"]
    row = lambda name, p: rows.append(f"| {name} | {acc(p)} | {pct(p['deferral'])} % | {p.get('capped', '–')} | "
                                      f"{p['mean_tokens']:.0f} |")
    for key, name in (("base", "base only"), ("expert", "expert only")):
        if key in res:
            row(name, res[key])
    if "chosen" in res:
        row(f"**Co-LLM, η = {res['chosen']['threshold']:.3f}**", res["chosen"])
    if "backtrack" in res:
        bt = res["backtrack"]
        row(f"Co-LLM + course correction (fired on {bt['fired']}, fixed {bt['fixed']}, broke {bt['broke']})", bt)
    for r in res.get("random", []):
        for p in r["per_seed"]:
            row(f"random deferral, rate {r['rate']:.3f}, seed {p['seed']}", p)
        if len(r["per_seed"]) > 1:
            rows.append(f"| random deferral, rate {r['rate']:.3f}, mean of seeds {r['seeds']} | {pct(r['accuracy'])} % "
                        f"± {pct(r['accuracy_sd'])} (sd) | {pct(r['deferral'])} % | | |")
    for c in res.get("confidence", []):
        row(f"confidence (base top probability < {c['min_prob']:.3f})", c)
    return rows


def paired_rows(res: dict) -> list[str]:
    pairs = dict(res.get("paired", {}))
    if "backtrack" in res:
        pairs["course-corrected − Co-LLM"] = res["backtrack"]["paired_vs_colm"]
    if not pairs:
        return []
    rows = [("| A − B, same problems | difference, points (95 % paired bootstrap) | right only for A / only for B "
             "| McNemar p |"), "|---|---|---|---|"]
    for name, c in pairs.items():
        lo, hi = c["difference_ci"]
        label = f"Co-LLM − {name[len('colm_vs_'):].replace('_', ' ')}" if name.startswith("colm_vs_") else name
        rows.append(f"| {label} | {100 * c['difference']:+.1f} "
                    f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {c['only_a']} / {c['only_b']} | {c['mcnemar_p']:.3f} |")
    return rows


def main(path: str) -> str:
    res = json.loads(Path(path).read_text())
    head = (f"{res.get('split', '?')}, {res['n_examples']} problems, ≤ {res['max_new_tokens']} new tokens, "
            f"engine {res.get('engine', '?')}")
    return "\n".join([head, "", *policy_rows(res), "", *paired_rows(res)])


if __name__ == "__main__":
    print(main(sys.argv[1]))
