"""Two run files on the same problems, compared in pairs: each accuracy with its 95 % Wilson interval, the
difference A − B with a 95 % paired-bootstrap interval, the discordant problems and McNemar's exact p; also how
many answers hit the token budget (a record's ``stop_reason``; runs older than it count answers of ``cap`` tokens,
256 then) and how many are token-for-token identical.

    python bench/paired_runs.py runs/eval-llama-dev200/runs/colm-0.144666.jsonl data/eval-dev200/colm-0.144666.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colm.runs import read_done  # noqa: E402
from colm.stats import paired  # noqa: E402


def capped(rec: dict, cap: int) -> bool:
    return rec["stop_reason"] == "length" if "stop_reason" in rec else len(rec["ids"]) >= cap


def main(a: str, b: str, cap: int = 256) -> dict:
    ra, rb = read_done(Path(a)), read_done(Path(b))
    r = paired({i: x["correct"] for i, x in ra.items()}, {i: x["correct"] for i, x in rb.items()})
    both = sorted(set(ra) & set(rb))
    r["identical_answers"] = sum(ra[i]["ids"] == rb[i]["ids"] for i in both)
    r["hit_cap_a"] = sum(capped(ra[i], cap) for i in both)
    r["hit_cap_b"] = sum(capped(rb[i], cap) for i in both)
    for name, recs in (("a", ra), ("b", rb)):
        if all("deferral" in recs[i] for i in both):
            r[f"deferral_{name}"] = sum(recs[i]["deferral"] for i in both) / len(both)
    return r


if __name__ == "__main__":
    res = main(sys.argv[1], sys.argv[2])
    print(json.dumps(res, indent=1))
    pct = lambda x: f"{100 * x:.1f}"
    print(f"\nA {pct(res['accuracy_a'])} % [{pct(res['ci_a'][0])}, {pct(res['ci_a'][1])}] vs B {pct(res['accuracy_b'])} % "
          f"[{pct(res['ci_b'][0])}, {pct(res['ci_b'][1])}] on {res['n']} problems; A − B = {pct(res['difference'])} "
          f"points [{pct(res['difference_ci'][0])}, {pct(res['difference_ci'][1])}]; discordant {res['only_a']} vs "
          f"{res['only_b']} (McNemar p = {res['mcnemar_p']:.2f}); identical answers {res['identical_answers']}")
