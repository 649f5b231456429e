"""The deferral head's learning curve (issue 18): heads fitted on the first N training problems of one feature cache,
each judged on dev half A by the teacher-forced disagreement proxy — along the expert's greedy half-A answers, how
well p_defer ranks the tokens where the base would have written something else (AUC, and the share of those tokens
caught at 10 / 20 / 30 % deferral) — with 95 % intervals and paired differences from resampling half-A problems.
No free generation: the proxy costs one base pass over the answers.

    python bench/learning_curve.py --features runs/features/gold --sizes 500 2000 all \\
        --answers data/eval-devA-llamacpp/expert.jsonl [--objectives gold-disagreement marginal:disagreement] \\
        [--heads assets/head-gsm8k.safetensors OTHER.safetensors] [--engine torch] [--threads N]

The cache is what `colm train --objective gold-disagreement --features runs/features` extracts (resumable).  While it
is still being extracted, `all` is the longest prefix of the training pool it already holds (the JSON says how many).
Heads are written to bench/out/curve/, the results to bench/out/learning_curve.json.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

try:
    from . import common as C
except ImportError:
    import common as C


def load_cache(gold_dir: Path) -> dict:
    """The complete shards a (possibly still running) extraction has recorded in its manifest, concatenated."""
    from colm.train import load_features
    manifest = json.loads((gold_dir / "manifest.json").read_text())
    if not manifest["identity"].get("with_expert"):
        raise SystemExit(f"{gold_dir}: features without the expert cannot label gold-disagreement")
    paths = [gold_dir / name for name in sorted(manifest["shards"]) if (gold_dir / name).exists()]
    return load_features(paths)


def prefix_size(f: dict, pool: list) -> int:
    """How many of the pool's first problems (file order, as `colm train --limit` takes them) the cache holds."""
    have = set(f["example"].unique().tolist())
    n = 0
    while n < len(pool) and pool[n].index in have:
        n += 1
    return n


def subset(f: dict, pool: list, n: int) -> dict:
    """The features of the pool's first ``n`` problems."""
    from colm.train import select_examples
    return select_examples(f, {e.index for e in pool[:n]})


def resampled(scores: dict[str, torch.Tensor], z: torch.Tensor, example: torch.Tensor, ref: str,
              reps: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per head: proxy AUC with a 95 % interval, and its paired difference to ``ref`` (problems resampled with
    their tokens, the same draw for every head, so the heads' shared difficulty cancels)."""
    from colm.train import auc
    problems = example.unique().tolist()
    rows = {p: (example == p).nonzero().squeeze(1) for p in problems}
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {name: [] for name in scores}
    diffs: dict[str, list[float]] = {name: [] for name in scores}
    for _ in range(reps):
        idx = torch.cat([rows[problems[rng.randrange(len(problems))]] for _ in problems])
        a = {name: auc(s[idx], z[idx]) for name, s in scores.items()}
        for name in scores:
            draws[name].append(a[name])
            diffs[name].append(a[name] - a[ref])

    def ci(xs: list[float]) -> tuple[float, float]:
        xs = sorted(xs)
        return xs[int(0.025 * reps)], xs[int(0.975 * reps) - 1]

    point = {name: auc(s, z) for name, s in scores.items()}
    return {name: {"auc_ci": ci(draws[name]), "vs_ref": point[name] - point[ref], "vs_ref_ci": ci(diffs[name])}
            for name in scores}


def table(rows: list[dict], ref: str) -> str:
    """Markdown: one row per head."""
    out = ["| head | problems | tokens | val AUC (gold) | half-A proxy AUC [95 %] | vs " + ref +
           " [95 %] | caught at 10 / 20 / 30 % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["proxy"]
        out.append(f"| {r['name']} | {r.get('problems', '—')} | {r.get('tokens', '—')} | "
                   + (f"{r['val_auc']:.3f}" if r.get("val_auc") is not None else "—")
                   + f" | {p['auc']:.3f} [{p['auc_ci'][0]:.3f}, {p['auc_ci'][1]:.3f}] | "
                   + f"{p['vs_ref']:+.3f} [{p['vs_ref_ci'][0]:+.3f}, {p['vs_ref_ci'][1]:+.3f}] | "
                   + " / ".join(f"{p[f'recall_at_{k}pct']:.2f}" for k in (10, 20, 30)) + " |")
    return "\n".join(out)


def main() -> None:
    from colm.data import DEFAULT_DATA, halves, read_jsonl
    from colm.decode import CoLLM
    from colm.head import DeferralHead
    from colm.rollouts import read_done
    from colm.scoring import proxy_features, proxy_scores
    from colm.train import TrainConfig, fit
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True, help="a gold feature cache (DIR/gold of `colm train --features`)")
    ap.add_argument("--sizes", nargs="+", default=["500", "2000", "all"])
    ap.add_argument("--objectives", nargs="+", default=["gold-disagreement"],
                    help="objective or objective:init (e.g. marginal:disagreement, the paper's objective started "
                         "from the disagreement fit)")
    ap.add_argument("--answers", required=True, help="the expert's half-A answers (an evaluation's expert.jsonl)")
    ap.add_argument("--limit", type=int, default=100, help="half-A problems (those with an expert answer)")
    ap.add_argument("--heads", nargs="*", default=[str(C.HEAD_PATH)],
                    help="heads trained elsewhere to score beside the curve (default: the shipped one)")
    ap.add_argument("--reps", type=int, default=1000)
    C.add_engine_args(ap)
    a = ap.parse_args()
    pool, dev_a, _ = halves(read_jsonl(DEFAULT_DATA))
    f = load_cache(Path(a.features))
    have = prefix_size(f, pool)
    sizes = sorted({have if s == "all" else int(s) for s in a.sizes})
    if sizes[-1] > have:
        raise SystemExit(f"the cache holds the first {have} training problems; asked for {sizes[-1]}")
    pair, _ = C.load(a.engine, a.threads)
    out_dir = C.OUT / "curve"
    out_dir.mkdir(parents=True, exist_ok=True)
    heads, rows = {}, []
    for spec in a.objectives:
        objective, _, init = spec.partition(":")
        for n in sizes:
            name = f"{spec.replace(':', '-from-')}-{n}"
            head, m = fit(subset(f, pool, n), TrainConfig(objective=objective, init=init or "weak"),
                          pair.base.hidden_size,
                          {"base_model": pair.base_id, "expert_model": pair.expert_id, "name": name,
                           "data": {"file": DEFAULT_DATA.name, "problems": n, "dev_size": 300}})
            head.save(out_dir / f"head-{name}.safetensors")
            heads[name] = head
            rows.append({"name": name, "objective": objective, "init": init or "weak", "problems": n,
                         "tokens": m["tokens"],
                         "val_auc": m["val_auc"], "fit": {k: v for k, v in m.items() if k != "history"}})
    for path in a.heads:
        heads[Path(path).stem] = DeferralHead.load(path)
        rows.append({"name": Path(path).stem, "path": path, "val_auc": None})
    answers = read_done(Path(a.answers))
    dev = [e for e in dev_a if e.index in answers][:a.limit]
    x, z = proxy_features(CoLLM(pair), dev, answers)
    scores = {name: h.p_defer(x["h"].float(), conf=x["conf"]).detach() for name, h in heads.items()}
    scores["confidence"] = 1 - x["conf"][:, 0]       # defer where the base's top probability is lowest
    rows.append({"name": "confidence", "val_auc": None})
    ref = f"{a.objectives[0].replace(':', '-from-')}-{sizes[-1]}"
    boot = resampled(scores, z, x["example"], ref, a.reps)
    for r in rows:
        r["proxy"] = {**proxy_scores(scores[r["name"]], z), **boot[r["name"]]}
    res = {"features": a.features, "cache_holds": have, "half_a_problems": len(dev), "pair": C.describe(pair),
           "rows": rows, "ref": ref}
    print(C.write_json("learning_curve.json", {"machine": C.machine(), **res}))
    print(table(rows, ref))


if __name__ == "__main__":
    main()
