"""Do the double-check flags (colm.signals) predict a wrong final answer better than the answer's length alone?

The committed dev runs keep each answer's token ids and whether it was right, not the per-step top-k, so the stored
answers are re-scored teacher-forced through both models (``engine.score``) to rebuild every position as a decode
would have recorded it: the base's top-k and p_defer (the shipped head) everywhere, the writer from p_defer > η, and
the expert's top-k everywhere.  Two expert views are then evaluated, as the two engines' decoders record them:
"deferred" (the expert's top-k only where it wrote: llama.cpp's default) and "all" (every position up to the last
deferral: torch's default).  Stage 1 (the model passes) is cached per problem under bench/out/flags_auroc/ and
resumes where it stopped; stage 2 (signals, AUROCs, paired bootstrap intervals) reruns in seconds.

    nice -n 10 python bench/flags_auroc.py --run data/eval-dev200/colm-0.144666.jsonl --threads 1 \
        > bench/out/flags_auroc.log 2>&1

Positive class: a wrong final answer; AUROC 0.5 is chance; intervals are 95 % percentile bootstraps over problems,
and "-length" is the paired difference from the length baseline (the answer's token count) on the same resamples.
Scores: ``colm.signals.answer_score`` as shipped (fixed before the data was seen), and 40 candidates (each signal,
over all positions or digit tokens only, as mean / max / top-5 mean / flag count / flag rate) for exploration.
Populations: all answers, and the finished ones (ended by an end token): half the answers are cut off at 256 tokens,
which length (and the page's stop reason) already tells.  Against picking the best of 40 on the same data, one
candidate is chosen on a fixed half of the finished answers and reported on the other half.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

try:
    from . import common as C
except ImportError:
    import common as C

import torch  # noqa: E402

CACHE = C.OUT / "flags_auroc"
K = 5


# ----------------------------------------------------------------------------------------------- stage 1: scoring
def _reduce(ids: torch.Tensor, base: bool):
    """A reduce for ``engine.score``: logits [n, V] at answer positions start..start+n -> top-k probs and ids
    [n, K], the probability of the token actually written [n] (and, for the base, the head's confidence inputs)."""
    from colm.head import confidence_features
    from colm.trace import topk_probs

    def reduce(logits: torch.Tensor, start: int) -> dict:
        logits = logits.float()
        tok = ids[start:start + len(logits)]
        probs, top = topk_probs(logits, K)
        out = {"probs": probs, "ids": top,
               "tok": (logits.gather(1, tok[:, None]).squeeze(1) - logits.logsumexp(-1)).exp()}
        if base:
            out["conf"] = confidence_features(logits)
        return out
    return reduce


@torch.inference_mode()
def score_one(pair, head, prompt: list[int], answer: list[int]) -> dict:
    """One stored answer teacher-forced through both models -> per-position lists (rounded for the cache)."""
    seq, at = [prompt + answer], [range(len(prompt) - 1, len(prompt) + len(answer) - 1)]
    ids = torch.tensor(answer)
    b, h = pair.base.score(seq, at, hidden=True, reduce=_reduce(ids, base=True))
    e, _ = pair.expert.score(seq, at, hidden=False, reduce=_reduce(ids, base=False))
    p = head.p_defer(h.float(), conf=b["conf"])
    r = lambda t: [[round(float(x), 5) for x in row] for row in t.tolist()] if t.ndim == 2 else \
        [round(float(x), 6) for x in t.tolist()]
    return {"p_defer": r(p), "base_ids": b["ids"].tolist(), "base_probs": r(b["probs"]), "base_tok": r(b["tok"]),
            "expert_ids": e["ids"].tolist(), "expert_probs": r(e["probs"]), "expert_tok": r(e["tok"])}


def identity(pair, head_path: Path, run: Path) -> dict:
    return {"pair": C.describe(pair) | {"threads": None}, "k": K, "run": run.name,
            "run_sha256": hashlib.sha256(run.read_bytes()).hexdigest(),
            "head_sha256": hashlib.sha256(head_path.read_bytes()).hexdigest()}


def stage1(run: Path, threads: int, limit: int | None) -> Path:
    """Score every stored answer not yet in the cache; -> the cache file (one JSON line per problem)."""
    from colm.data import DEFAULT_DATA, messages, read_jsonl
    from colm.head import DeferralHead
    from colm.prompts import encode_prompt
    records = [json.loads(line) for line in run.read_text().splitlines() if line.strip()][:limit]
    pair, _ = C.load("llamacpp", threads, n_ctx=4096, n_seq=2)
    head = DeferralHead.load(C.HEAD_PATH, pair.base, pair.base_id)
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / (run.stem + ".jsonl")
    ident = identity(pair, C.HEAD_PATH, run)
    man = out.with_suffix(".manifest.json")
    if man.exists() and json.loads(man.read_text()) != ident:
        sys.exit(f"{out} was scored with other models, head or run; delete it to rescore")
    man.write_text(json.dumps(ident, indent=1))
    done = set()
    if out.exists():
        lines = out.read_text().splitlines()
        good = [line for line in lines if _whole(line)]
        if len(good) != len(lines):        # a killed run leaves at most one torn last line
            out.write_text("".join(line + "\n" for line in good))
        done = {json.loads(line)["index"] for line in good}
    questions = {e.index: e.question for e in read_jsonl(DEFAULT_DATA)}
    todo = [r for r in records if r["index"] not in done]
    C.log(f"{len(done)} cached, {len(todo)} to score ({pair.engine}, {threads} thread(s))")
    t0 = time.perf_counter()
    for i, r in enumerate(todo):
        prompt = encode_prompt(pair.tokenizer, messages(questions[r["index"]]), chat=True)
        row = {"index": r["index"], **score_one(pair, head, prompt, list(r["ids"]))}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        dt = time.perf_counter() - t0
        C.log(f"[{i + 1}/{len(todo)}] index {r['index']}: {len(r['ids'])} tokens; {dt:.0f} s so far, "
              f"about {dt / (i + 1) * (len(todo) - i - 1):.0f} s left")
    return out


def _whole(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


# ----------------------------------------------------------------------------------------------- stage 2: signals
def traces(cache: Path, run: Path, threshold: float, view: str) -> tuple[list, list[bool]]:
    """Cached problems -> (Traces rebuilt as a decode would record them, wrong final answer).  ``view``: where the
    expert's top-k is recorded: "deferred" (where it wrote) or "all" (every position up to the last deferral)."""
    from colm.models import load_tokenizer
    from colm.trace import Step, Trace
    tok = load_tokenizer("default")
    stored = {r["index"]: r for r in map(json.loads, run.read_text().splitlines())}
    out, wrong = [], []
    for line in cache.read_text().splitlines():
        c = json.loads(line)
        r = stored[c["index"]]
        src = ["expert" if p > threshold else "base" for p in c["p_defer"]]
        last = max((j for j, s in enumerate(src) if s == "expert"), default=-1)
        topk = lambda ids, probs: [(i, "", p) for i, p in zip(ids, probs)]
        steps = [Step(j, t, tok.decode([t]), src[j], c["p_defer"][j], topk(c["base_ids"][j], c["base_probs"][j]),
                      topk(c["expert_ids"][j], c["expert_probs"][j])
                      if (src[j] == "expert" if view == "deferred" else j <= last) else None)
                 for j, t in enumerate(r["ids"])]
        ended = r["ids"][-1] in (151643, 151645)       # the run's end tokens (its manifest: eos_ids)
        out.append(Trace("", [], {"name": "colm", "threshold": threshold}, steps,
                         stop_reason="eos" if ended else "length"))
        wrong.append(not r["correct"])
    return out, wrong


def answer_scores(trace, thr: float) -> dict[str, float]:
    """Every candidate answer-level score of one trace: per signal kind, over all positions or the positions whose
    token holds a digit, aggregated as mean, max, mean of the top 5, flag count and flag rate."""
    from colm.signals import CUTOFFS, KINDS, signals
    sig = signals(trace, thr)
    digit = [any(ch.isdigit() for ch in s.text) for s in trace.steps]
    out = {"length": float(len(trace.steps))}
    for kind in KINDS:
        for scope in ("all", "digits"):
            v = [x[kind] for x, d in zip(sig, digit) if (d or scope == "all") and not math.isnan(x[kind])]
            top = sorted(v, reverse=True)
            name = f"{kind}/{scope}"
            out[f"{name}/mean"] = sum(v) / len(v) if v else 0.0
            out[f"{name}/max"] = top[0] if v else 0.0
            out[f"{name}/top5"] = sum(top[:5]) / len(top[:5]) if v else 0.0
            n = sum(x >= CUTOFFS[kind] for x in v)
            out[f"{name}/count"] = float(n)
            out[f"{name}/rate"] = n / len(trace.steps) if trace.steps else 0.0
    return out


def auroc(scores: list[float], wrong: list[bool]) -> float:
    from colm.train.objectives import auc
    return auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(wrong))


def boot(scores: dict[str, list[float]], wrong: list[bool], names: list[str], reps: int, seed: int = 0) -> dict:
    """AUROC of length and of each named score with a 95 % percentile bootstrap interval (problems resampled), and
    each score's paired difference from length's AUROC on the same resamples."""
    rng = random.Random(seed)
    n = len(wrong)
    draws = [d for d in ([rng.randrange(n) for _ in range(n)] for _ in range(reps))
             if 0 < sum(wrong[i] for i in d) < n]            # a resample needs both classes
    ci = lambda xs: (sorted(xs)[int(0.025 * len(xs))], sorted(xs)[int(0.975 * len(xs)) - 1])
    length_b = [auroc([scores["length"][i] for i in d], [wrong[i] for i in d]) for d in draws]
    out = {"n": n, "wrong": sum(wrong),
           "length": {"auroc": auroc(scores["length"], wrong), "ci": ci(length_b)}}
    for name in names:
        b = [auroc([scores[name][i] for i in d], [wrong[i] for i in d]) for d in draws]
        diff = [x - y for x, y in zip(b, length_b)]
        a = auroc(scores[name], wrong)
        out[name] = {"auroc": a, "ci": ci(b), "minus_length": a - out["length"]["auroc"],
                     "minus_length_ci": ci(diff), "p_not_above_length": sum(d <= 0 for d in diff) / len(diff)}
    return out


def half(index: int) -> str:
    """A fixed split of the problems: candidates are chosen on "select" and reported on "report"."""
    return "select" if int(hashlib.sha256(f"flags:{index}".encode()).hexdigest(), 16) % 2 == 0 else "report"


def stage2(cache: Path, run: Path, threshold: float, reps: int) -> dict:
    """Every candidate answer score, on all answers and on the finished ones (an answer cut off at its length shows
    that on its own), and one candidate chosen on half the finished answers and reported on the other half."""
    from colm.signals import answer_score
    res = {"run": run.name, "threshold": threshold, "positive": "wrong final answer", "bootstrap": reps,
           "answer_score": "colm.signals.answer_score (default arguments)"}
    indices = [json.loads(line)["index"] for line in cache.read_text().splitlines()]
    for view in ("deferred", "all"):
        trs, wrong = traces(cache, run, threshold, view)
        rows = [answer_scores(t, threshold) for t in trs]
        scores = {k: [r[k] for r in rows] for k in rows[0]}
        scores["answer_score"] = [answer_score(t, threshold=threshold) for t in trs]
        # What the page knows without any signal: the answer was cut off at its length; and that, then the score.
        cut = [float(t.stop_reason == "length") for t in trs]
        scores["cut_off"] = cut
        scores["cut_off+answer_score"] = [c + a for c, a in zip(cut, scores["answer_score"])]
        names = [k for k in scores if k != "length"]
        sub = lambda idx: ({k: [v[i] for i in idx] for k, v in scores.items()}, [wrong[i] for i in idx])
        done = [i for i, t in enumerate(trs) if t.stop_reason != "length"]
        sel = [i for i in done if half(indices[i]) == "select"]
        rep = [i for i in done if half(indices[i]) == "report"]
        sc, w = sub(sel)
        on_sel = {k: auroc(sc[k], w) for k in names if not k.startswith("cut_off")}
        best = max(on_sel, key=lambda k: on_sel[k])
        if view == "deferred":
            res["reconstruction"] = rebuilt(trs, run)
        res[view] = {"all": boot(scores, wrong, names, reps),
                     "finished": boot(*sub(done), [k for k in names if not k.startswith("cut_off")], reps),
                     "chosen_on_select_half": {"name": best, "select_auroc": on_sel[best], "n_select": len(sel),
                                               "report_half": boot(*sub(rep), [best, "answer_score"], reps)}}
    return res


def rebuilt(trs, run: Path) -> dict:
    """How closely the re-scored answers match the decode that wrote them (torch bf16 then, llama.cpp Q4_K_M now):
    deferral rates, and how often the rebuilt writer's top token is the token the answer holds."""
    from colm.signals import writer_topk
    stored = [json.loads(line) for line in run.read_text().splitlines()]
    rec = {r["index"]: r["deferral"] for r in stored}
    steps = [s for t in trs for s in t.steps]
    order = [json.loads(line)["index"] for line in (CACHE / (run.stem + ".jsonl")).read_text().splitlines()]
    return {"deferral_recorded": sum(rec[i] for i in order) / len(order),
            "deferral_rebuilt": sum(t.deferral_rate for t in trs) / len(trs),
            "writer_top_is_token": sum(writer_topk(s)[0][0] == s.token_id for s in steps) / len(steps)}


def _row(name: str, a: dict) -> str:
    if "minus_length" not in a:
        return f"{name:28s} {a['auroc']:6.3f} ({a['ci'][0]:.3f}, {a['ci'][1]:.3f})"
    return (f"{name:28s} {a['auroc']:6.3f} ({a['ci'][0]:.3f}, {a['ci'][1]:.3f}) {a['minus_length']:+8.3f} "
            f"({a['minus_length_ci'][0]:+.3f}, {a['minus_length_ci'][1]:+.3f})")


def table(res: dict, top: int = 8) -> str:
    """The length baseline, answer_score and the ``top`` best candidates per view and population."""
    r = res["reconstruction"]
    lines = [f"{res['run']}, eta = {res['threshold']:.4g}; positive class: {res['positive']}; "
             f"{res['bootstrap']} bootstrap resamples",
             f"rebuilt: deferral {r['deferral_rebuilt']:.3f} (recorded {r['deferral_recorded']:.3f}); the rebuilt "
             f"writer's top token is the answer's token at {r['writer_top_is_token']:.1%} of positions"]
    for view in ("deferred", "all"):
        for pop in ("all", "finished"):
            b = res[view][pop]
            lines += [f"\nexpert top-k view '{view}', {pop} answers (n={b['n']}, wrong={b['wrong']})",
                      f"{'score':28s} {'AUROC':>6s} {'95% CI':>15s} {'-length':>8s} {'95% CI':>17s}",
                      _row("length", b["length"]), _row("answer_score", b["answer_score"])]
            fixed = ("length", "answer_score", "cut_off", "cut_off+answer_score")
            lines += [_row(k, b[k]) for k in fixed[2:] if k in b]
            cands = sorted((k for k in b if isinstance(b[k], dict) and k not in fixed),
                           key=lambda k: -b[k]["auroc"])[:top]
            lines += [_row(k, b[k]) for k in cands]
        c = res[view]["chosen_on_select_half"]
        r = c["report_half"]
        lines += [f"chosen on the select half of the finished answers (n={c['n_select']}): {c['name']} "
                  f"({c['select_auroc']:.3f}); on the report half (n={r['n']}, wrong={r['wrong']}):",
                  _row("length", r["length"]), _row(c["name"], r[c["name"]]), _row("answer_score", r["answer_score"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="data/eval-dev200/colm-0.144666.jsonl", help="a committed Co-LLM dev run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--score-only", action="store_true", help="stage 1 only")
    ap.add_argument("--analyse-only", action="store_true", help="stage 2 only, on what the cache holds")
    ap.add_argument("--bootstrap", type=int, default=2000)
    a = ap.parse_args()
    run = Path(a.run) if Path(a.run).is_absolute() else C.ROOT / a.run
    cache = CACHE / (run.stem + ".jsonl")
    if not a.analyse_only:
        stage1(run, a.threads, a.limit)
    if a.score_only:
        return
    man = json.loads(run.with_name(run.stem + ".manifest.json").read_text())
    threshold = float(man["info"]["policy"]["threshold"])
    res = stage2(cache, run, threshold, a.bootstrap)
    print(C.write_json("flags_auroc.json", {"machine": C.machine(), **res}))
    print(table(res))


if __name__ == "__main__":
    main()
