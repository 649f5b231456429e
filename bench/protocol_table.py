"""An evaluation's results.json as the markdown tables README and docs/BENCHMARKS.md show: every policy's accuracy
with its 95 % Wilson interval and count, its deferral, how many answers hit the token cap; then Co-LLM against
each other policy on the same problems (paired bootstrap interval of the difference, discordant counts, McNemar).
A results.json written part-way (random seeds still running) renders what it has.  With a course-corrected sweep
(``--backtrack`` over several thresholds) a third table puts each corrected point beside the plain curve at the
same cost (issue 21's matched-cost comparison).

    python bench/protocol_table.py runs/evalB512/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colm.viz import corrected_cost  # noqa: E402


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
        where = f", cut-off chosen on {c['chosen_on']}" if c.get("chosen_on") else ""
        row(f"confidence (base top probability < {c['min_prob']:.4f}{where})", c)
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


def plain_at(points: list[dict], x: float) -> float | None:
    """The plain sweep's accuracy at deferral ``x``, linear between its two neighbouring points (None outside)."""
    pts = sorted((p["deferral"], p["accuracy"]) for p in points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def matched_cost_rows(res: dict) -> list[str]:
    curve = res.get("backtrack_curve") or []
    if not curve:
        return []
    rows = ["| η | plain: deferral, accuracy | corrected: expert's share (dropped lines included), accuracy | fired / "
            "fixed / broke | expert tokens processed, plain → corrected | plain curve at the corrected cost | "
            "corrected − that |", "|---|---|---|---|---|---|---|"]
    plain = {round(p["threshold"], 9): p for p in res.get("colm", [])}
    for c in curve:
        p = plain.get(round(c["threshold"], 9))
        cost = corrected_cost(c)
        at = plain_at(res.get("colm", []) + [res[k] for k in ("base", "expert") if k in res], cost)
        plain_cell = f"{pct(p['deferral'])} %, {acc(p)}" if p else "–"
        at_cell, gain = (f"{pct(at)} %", f"{100 * (c['accuracy'] - at):+.1f}") if at is not None else ("–", "–")
        rows.append(f"| {c['threshold']:.3f} | {plain_cell} | {pct(cost)} %, {acc(c)} | {c['fired']} / {c['fixed']} / "
                    f"{c['broke']} | {c['expert_fed'][0]:,} → {c['expert_fed'][1]:,} | {at_cell} | {gain} |")
    return rows


def main(path: str) -> str:
    res = json.loads(Path(path).read_text())
    head = (f"{res.get('split', '?')}, {res['n_examples']} problems, ≤ {res['max_new_tokens']} new tokens, "
            f"engine {res.get('engine', '?')}")
    return "\n".join([head, "", *policy_rows(res), "", *paired_rows(res), "", *matched_cost_rows(res)]).rstrip() + "\n"


if __name__ == "__main__":
    print(main(sys.argv[1]))
