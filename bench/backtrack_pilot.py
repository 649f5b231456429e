"""Course correction on the answers where it can act (issue 21): the problems of an evaluation run whose Co-LLM
answer holds a computation the arithmetic checker finds wrong, decoded again one by one, with and without
``colm.backtrack`` (the same policy, engine and budget).  Elsewhere the checker finds nothing, so backtracking
leaves an answer as it is (up to near-ties between batched and single decodes).

    python bench/backtrack_pilot.py --run data/eval-dev200/colm-0.144666.jsonl [--max-new 512] [--threads 1]

Reports per problem: rollbacks, whether the expert's line differs from the dropped one, right before/after, the
tokens the expert wrote and processed (dropped text included).  Writes bench/out/backtrack_pilot.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a colm evaluation run file (JSONL with index, text, correct)")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=None, help="default: the head's for the engine")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from colm.backtrack import Backtrack, generate_backtracking
    from colm.checks import first_error
    from colm.data import DEFAULT_DATA, is_correct, messages, read_jsonl
    from colm.decode import CoLLM, Policy
    from colm.engines import load_pair
    from colm.head import load_head
    records = [json.loads(line) for line in open(a.run, encoding="utf-8")]
    flagged = [r for r in records if first_error(r["text"])]
    problems = {e.index: e for e in read_jsonl(DEFAULT_DATA)}
    pair = load_pair(engine="llamacpp", threads=a.threads)
    dec = CoLLM(pair, load_head(pair))
    policy = Policy("colm", threshold=a.threshold if a.threshold is not None else dec.head.threshold)
    rows = []
    for r in flagged:
        ex = problems[r["index"]]
        prompt = messages(ex.question)[0]["content"]
        t0 = time.perf_counter()
        plain = dec.generate(prompt, policy=policy, max_new_tokens=a.max_new)
        plain.release()
        t1 = time.perf_counter()
        bt = generate_backtracking(dec, prompt, policy, a.max_new, Backtrack())
        bt.release()
        t2 = time.perf_counter()
        right = [is_correct(t.text, ex.answer) for t in (plain, bt)]
        rows.append({"index": ex.index, "rollbacks": bt.rollbacks, "right_plain": right[0], "right_backtrack": right[1],
                     "changed_lines": sum(rb["replacement"] != rb["discarded"] for rb in bt.rollbacks),
                     "expert_written": [sum(s.source == "expert" for s in t.steps) for t in (plain, bt)],
                     "expert_written_dropped": sum(rb["expert_written"] for rb in bt.rollbacks),
                     "expert_fed": [plain.expert_fed, bt.expert_fed], "tokens": [len(plain.steps), len(bt.steps)],
                     "seconds": [round(t1 - t0, 1), round(t2 - t1, 1)]})
        C.log({k: v for k, v in rows[-1].items() if k != "rollbacks"})
    fired = [x for x in rows if x["rollbacks"]]
    summary = {"run": a.run, "answers": len(records), "flagged": len(flagged), "fired": len(fired),
               "rollbacks": sum(len(x["rollbacks"]) for x in rows),
               "lines_rewritten_differently": sum(x["changed_lines"] for x in rows),
               "fixed": sum(x["right_backtrack"] and not x["right_plain"] for x in rows),
               "broken": sum(x["right_plain"] and not x["right_backtrack"] for x in rows),
               "expert_written": [sum(x["expert_written"][i] for x in rows) for i in (0, 1)],
               "expert_written_dropped": sum(x["expert_written_dropped"] for x in rows),
               "expert_fed": [sum(x["expert_fed"][i] for x in rows) for i in (0, 1)]}
    print(C.write_json("backtrack_pilot.json", {"machine": C.machine(), "settings": vars(a), "summary": summary,
                                                "problems": rows}))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
