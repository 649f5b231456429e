"""The page's shipped examples on the default engine: how long each answer is, and how long the Algebra example
takes to decode whole (issue 17: the answer with 3125 in under 15 s on an idle 2-core machine).

    python bench/examples.py [--reps 3] [--max-new 1024] [--engine auto] [--threads N]

Every example is decoded once with the shipped head at its threshold, up to --max-new tokens, as the page does
(same prompt text: a word problem carries the training instruction); its length to the end of the answer sets the
page's default "max new tokens" (app.DEFAULT_MAX_NEW must cover every example).  Then the Algebra example is decoded
--reps more times at the page's default length: median decode seconds (prefill included), tokens/s, and whether
the text holds 3125.  Writes bench/out/examples.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    import app
    from colm.decode import CoLLM
    from colm.engines import load_pair
    from colm.head import load_head
    pair = load_pair(engine=a.engine, threads=a.threads)
    dec = CoLLM(pair, load_head(pair))
    rows = []
    for label, prompt in app.load_examples():
        tr = dec.generate(prompt, max_new_tokens=a.max_new)
        rows.append({"label": label, "tokens": len(tr.steps), "stop": tr.stop_reason,
                     "deferral": tr.deferral_rate, "seconds": tr.decode_seconds})
        tr.release()
        C.log(rows[-1])
    algebra = dict(app.load_examples())["Algebra"]
    runs = []
    for _ in range(a.reps):
        tr = dec.generate(algebra, max_new_tokens=app.DEFAULT_MAX_NEW)
        runs.append({"seconds": tr.decode_seconds, "tokens": len(tr.steps), "stop": tr.stop_reason,
                     "has_3125": "3125" in tr.text, "tokens_per_second": tr.tokens_per_second})
        tr.release()
        C.log(runs[-1])
    out = {"machine": C.machine(), "engine": pair.engine, "threads": pair.base.threads,
           "default_max_new": app.DEFAULT_MAX_NEW, "examples": rows, "algebra_runs": runs,
           "algebra_median_seconds": statistics.median(r["seconds"] for r in runs)}
    print(C.write_json("examples.json", out))
    print(f"\n| example | tokens to the end | stop | deferral | decode s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['tokens']} | {r['stop']} | {r['deferral']:.1%} | {r['seconds']:.1f} |")
    print(f"\nAlgebra at the page's default length ({app.DEFAULT_MAX_NEW}), {pair.engine}, {pair.base.threads} "
          f"threads: median {out['algebra_median_seconds']:.1f} s over {len(runs)} runs; "
          f"3125 in every answer: {all(r['has_3125'] for r in runs)}")


if __name__ == "__main__":
    main()
