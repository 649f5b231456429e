"""Where Co-LLM and the expert part ways on the problems only one of them got right (why Co-LLM trails the expert).

Two run files on the same problems: Co-LLM's answers and the expert-only ones, both greedy.  Up to their first
differing token the two answers share a prefix, so the expert-only token there is the expert's greedy choice after
that prefix, and Co-LLM wrote something else: the base (p_defer ≤ η), or the expert itself when its catch-up over
the prefix rounded differently.  One teacher-forced base pass along Co-LLM's answer up to that token
(``colm.train.features_for_batch``) gives what the decoder saw there: p_defer, the base's top probability, its argmax.

    python bench/divergence.py data/eval-devB-llamacpp/colm-0.144666.jsonl data/eval-devB-llamacpp/expert.jsonl \
        --threshold 0.14466647133231164 --threads 1

Writes bench/out/divergence.json (every discordant problem) and prints a markdown summary.  A measurement, not a
test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

try:
    from . import common as C
except ImportError:
    import common as C

import torch  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter one's end if one is a prefix), None if equal."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def kind(text: str) -> str:
    """What the token Co-LLM wrote at the split is: a number, an operator or sign, or words and layout."""
    s = text.strip()
    if any(ch.isdigit() for ch in s):
        return "number"
    if s in ("\\times", "\\div", "\\cdot", "\\frac") or s and all(ch in "+-*/×=()\\$%.,:^" for ch in s):
        return "operator / punctuation"
    return "words / layout"


@torch.inference_mode()
def score(dec, rows: list[tuple[int, list[int], list[int], int]]) -> list[dict]:
    """rows: (index, prompt ids, the shared prefix, the expert-only token there) with Co-LLM's token last in the
    prefix -> what the head, the base and the expert say at that position.  The two tokens' log-probabilities under
    each model tell a deferral miss (the base chose, the expert prefers its own token) from a near-tie inside the
    expert (both tokens about as likely to it, so the two decodes' rounding picked differently)."""
    from colm.train import features_for_batch
    out = []
    for i, prompt, answer, alt in rows:
        f = features_for_batch(dec.pair, [(i, prompt, answer), (i, prompt, answer[:-1] + [alt])], with_expert=True)
        last = [len(answer) - 1, 2 * len(answer) - 1]            # both rows' final target position
        p = dec.head.p_defer(f["h"][last[:1]].float(), conf=f["conf"][last[:1]])
        out.append({"p_defer": float(p[0]), "base_top_prob": float(f["conf"][last[0], 0]),
                    "base_lp": [float(f["lp_base"][j]) for j in last],        # [Co-LLM's token, the expert's]
                    "expert_lp": [float(f["lp_expert"][j]) for j in last],
                    "expert_argmax_is_colm_token": bool(f["arg_expert"][last[0]] == answer[-1])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("colm_run")
    ap.add_argument("expert_run")
    ap.add_argument("--threshold", type=float, required=True, help="the η Co-LLM's run was decoded with")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from colm.data import DEFAULT_DATA, messages, read_jsonl
    from colm.runs import read_done
    colm, expert = read_done(Path(a.colm_run)), read_done(Path(a.expert_run))
    questions = {e.index: e.question for e in read_jsonl(DEFAULT_DATA)}
    pair, _ = C.load("llamacpp", a.threads, n_seq=2)
    dec = C.decoder(pair, C.learned_head(pair))
    tok = pair.tokenizer
    cases = []
    for i in sorted(set(colm) & set(expert)):
        c, e = colm[i], expert[i]
        if c["correct"] == e["correct"]:
            continue
        k = first_difference(c["ids"], e["ids"])
        if k is None or k >= len(c["ids"]) or k >= len(e["ids"]):
            continue    # identical answers, or one is the other's prefix (no pair of tokens to compare)
        cases.append({"index": i, "outcome": "lost" if e["correct"] else "won", "split_at": k,
                      "colm_tokens": len(c["ids"]), "expert_tokens": len(e["ids"]),
                      "colm_token": tok.decode(c["ids"][k]), "expert_token": tok.decode(e["ids"][k]),
                      "context": tok.decode(c["ids"][max(0, k - 24):k])})
    rows = [(x["index"], dec.encode(messages(questions[x["index"]])), colm[x["index"]]["ids"][:x["split_at"] + 1],
             expert[x["index"]]["ids"][x["split_at"]]) for x in cases]
    for x, s in zip(cases, score(dec, rows)):
        x.update(s, writer="expert" if s["p_defer"] > a.threshold else "base", kind=kind(x["colm_token"]))
    C.write_json("divergence", {"colm_run": a.colm_run, "expert_run": a.expert_run, "threshold": a.threshold,
                                "machine": C.machine(), "cases": cases})
    print("| outcome | problems | split at token (median) | written by the base (a number) | p_defer there, "
          "median | by the expert, a near-tie (< 0.5 nats) |")
    print("|---|---|---|---|---|---|")
    for outcome in ("lost", "won"):
        xs = [x for x in cases if x["outcome"] == outcome]
        if not xs:
            continue
        base = [x for x in xs if x["writer"] == "base"]
        by_expert = [x for x in xs if x["writer"] == "expert"]
        tie = sum(abs(x["expert_lp"][0] - x["expert_lp"][1]) < 0.5 for x in by_expert)
        med = f"{statistics.median(x['p_defer'] for x in base):.3f}" if base else "–"
        print(f"| {outcome} | {len(xs)} | {statistics.median(x['split_at'] for x in xs):.0f} | {len(base)} "
              f"({sum(x['kind'] == 'number' for x in base)}) | {med} | {len(by_expert)}: {tie} |")

if __name__ == "__main__":
    sys.exit(main())
