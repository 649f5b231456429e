"""Threshold selection and evaluation: the accuracy-vs-deferral curve, against the paper's baselines.

Every decode, Co-LLM and baselines alike, is a resumable run file in ``--out``/runs/ written by
``colm.runs.run_policy`` (one line per problem, a manifest beside it that a resume must match), so an evaluation can
stop and resume (or be extended) without redoing work, and never resumes from a file another setting wrote.  The
two teacher-forced passes (``colm.scoring``) are cached there too, keyed by the head's weights and the answers.
The random baseline runs with several seeds (0, 1, 2 by default) and is reported as their mean ± sd.

The protocol (colm.data.halves): choose the head variant and η on dev half A (``--split dev-a``, the default),
report once on dev half B (``--split dev-b --thresholds η``).  Every accuracy carries a 95 % Wilson interval and
the count of answers that hit the token budget; Co-LLM against each baseline is a paired comparison on the same
problems (``paired``: bootstrap interval of the difference and McNemar's exact test).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from .data import Example
from .decode import CoLLM, Policy
from .models import ColmError
from .runs import backtracked, data_fingerprint, read_done, run_policy, summarize  # noqa: F401  (re-exported)
from .scoring import disagreement_proxy, proxy_features, proxy_scores, teacher_forced_scores  # noqa: F401
from .stats import paired as paired_comparison

RANDOM_SEEDS = (0, 1, 2)
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def quantile_thresholds(p: torch.Tensor, fractions=FRACTIONS) -> list[float]:
    """η_f such that a fraction f of the tokens have p_defer > η_f (the paper code's sweep).

    f = 0 maps to 1.0: never defer.
    """
    p = p.double().flatten()
    return [1.0 if f <= 0 else float(torch.quantile(p, 1.0 - f)) for f in fractions]


def choose(points: list[dict], max_deferral: float | None = None) -> dict:
    """Best accuracy among the points that defer at most ``max_deferral`` (a cost budget: the expert's share of
    the tokens); ties go to the lower deferral frequency (cheaper)."""
    ok = [r for r in points if max_deferral is None or r["deferral"] <= max_deferral]
    if not ok:
        raise ColmError(f"no threshold defers at most {max_deferral:.0%} of tokens (lowest: "
                        f"{min(r['deferral'] for r in points):.1%}); add a smaller deferral fraction to the sweep")
    return max(ok, key=lambda r: (r["accuracy"], -r["deferral"]))


def random_spread(rate: float, per_seed: list[dict]) -> dict:
    """Random deferral at one rate over several seeds: the means (as ``accuracy``/``deferral``, so it reads like any
    other point), their sample sd, min and max, and every seed's own point under ``per_seed``."""
    out = {"rate": rate, "seeds": [p["seed"] for p in per_seed], "n": per_seed[0]["n"]}
    for k in ("accuracy", "deferral", "mean_tokens"):
        xs = [p[k] for p in per_seed]
        out[k] = statistics.fmean(xs)
        out[f"{k}_sd"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        if k == "accuracy":
            out["accuracy_min"], out["accuracy_max"] = min(xs), max(xs)
    out["per_seed"] = per_seed
    return out


def evaluate(dec: CoLLM, examples: list[Example], out: Path, fractions=FRACTIONS, sweep_examples=None,
             thresholds: list[float] | None = None, batch_size: int = 16, max_new_tokens: int = 256,
             baselines: bool = True, on_update=None, baseline_rate: float | None = None,
             max_deferral: float | None = None, random_rates=(), random_seeds=RANDOM_SEEDS, data: dict | None = None,
             restart: bool = False, data_file: str | None = None, backtrack=None, min_prob: float | None = None) -> dict:
    """Sweep (or take) thresholds, pick the best on ``sweep_examples``, then evaluate it and the baselines on all
    ``examples``: base-only, expert-only, random and confidence deferral at the chosen point's frequency (or at
    ``baseline_rate``, which lets those two run in parallel with the Co-LLM decode and be picked up from their files).
    ``max_deferral`` restricts the choice to points within that budget; ``random_rates`` adds random deferral at
    those frequencies too, for the random curve of the paper's plot.  Random deferral runs once per seed in
    ``random_seeds`` (files ``random-RATE-seedS.jsonl``) and is reported as mean ± sd with the per-seed points.
    ``data`` identifies the data file (``colm.runs.data_fingerprint``; default: of ``examples``); ``restart``
    moves aside run files written by other settings instead of refusing them (``colm.runs.open_run``).
    ``on_update(results)`` is called after every stage, so a long run leaves partial results behind.  ``backtrack``
    (a ``colm.backtrack.Backtrack``) adds the chosen point with course correction (``results["backtrack"]``) and,
    with more than one threshold, every swept point with it too (``results["backtrack_curve"]``).  ``min_prob``
    fixes the confidence baseline's cut-off (the one chosen on half A, for a half-B report) instead of matching the
    share here."""
    on_update = on_update or (lambda r: None)
    runs = out / "runs"
    sweep_examples = sweep_examples or examples
    random_seeds = list(random_seeds)
    if baselines and not random_seeds:
        raise ColmError("the random baseline needs at least one seed")
    pair = dec.pair
    data = data or data_fingerprint(examples)

    def run(policy: Policy, name: str, exs: list[Example], **kw) -> dict[int, dict]:
        tag = {"model": policy.name} if policy.name in ("base", "expert") else None
        return run_policy(dec, exs, policy, runs / f"{name}.jsonl", batch_size, max_new_tokens, tag=tag, data=data,
                          restart=restart, data_file=data_file, **kw)

    base = run(Policy("base"), "base", examples)
    results: dict = {"n_examples": len(examples), "n_sweep": len(sweep_examples), "max_new_tokens": max_new_tokens,
                     "base_model": pair.base_id, "expert_model": pair.expert_id, "head": dec.head.identity,
                     "engine": pair.engine}
    results["base"] = summarize(base, "base")
    if baselines:
        expert = run(Policy("expert"), "expert", examples)
        results["expert"] = summarize(expert, "expert")
        results["proxy"] = disagreement_proxy(dec, sweep_examples, expert, cache=runs)
        on_update(results)
    elif not restart and {e.index for e in examples} <= set(read_done(runs / "expert.jsonl")):
        # An expert run already finished for these problems is reported without baselines too: the curve's
        # reference costs nothing then.  One made under other settings is left alone, never moved or redone.
        try:
            results["expert"] = summarize(run(Policy("expert"), "expert", examples), "expert")
        except ColmError:
            pass
    # Thresholds from the head's scores along the base's own answers: what the decoder sees before it defers.  The
    # confidence baseline's cut-off comes from the same pass (unless fixed on half A); with neither needed, skip it
    # (minutes on a real pair).
    p = top = None
    if thresholds is None or (baselines and min_prob is None):
        p, top = teacher_forced_scores(dec, sweep_examples, base, cache=runs)
    if thresholds is None:
        thresholds = quantile_thresholds(p, fractions)

    chosen_runs: list[dict[int, dict]] = []     # the records of the last colm() call: the chosen point's

    def colm(thr: float, exs: list[Example]) -> dict:
        if thr >= 1.0:
            # p_defer ≤ 1 never exceeds η = 1: the base-only tokens (tested), so the base's decode stands in.
            chosen_runs[:] = [{e.index: base[e.index] for e in exs}]
            return {"threshold": thr, **summarize(chosen_runs[0], "base"), "expert_calls": 0}
        chosen_runs[:] = [run(Policy("colm", threshold=thr), f"colm-{thr:.6f}", exs)]
        return {"threshold": thr, **summarize(chosen_runs[0])}

    results["colm"], results["random"] = [], []
    for thr in thresholds:
        results["colm"].append(colm(thr, sweep_examples))
        if backtrack is not None and len(thresholds) > 1:
            # Course correction costs expert work, so it is judged against the plain curve at equal cost: the same
            # η with correction is a point further right, not the same point (issue 21's matched-cost comparison).
            results.setdefault("backtrack_curve", []).append(
                backtracked(dec, sweep_examples, thr, chosen_runs[0], runs, backtrack, max_new_tokens, data,
                            restart, data_file))
        on_update(results)
    chosen = choose(results["colm"], max_deferral)
    if max_deferral is not None:
        results["max_deferral"] = max_deferral
    results["chosen"] = colm(chosen["threshold"], examples)
    on_update(results)
    if backtrack is not None:
        results["backtrack"] = backtracked(dec, examples, chosen["threshold"], chosen_runs[0], runs, backtrack,
                                           max_new_tokens, data, restart, data_file)
        on_update(results)
    if baselines:
        f = round(results["chosen"]["deferral"] if baseline_rate is None else baseline_rate, 3)
        random_runs = {}
        for rate in sorted({f, *(round(r, 3) for r in random_rates)}):
            per_seed = []
            for seed in random_seeds:
                rnd = run(Policy("random", rate=rate, seed=seed), f"random-{rate:.3f}-seed{seed}", examples)
                per_seed.append({"seed": seed, **summarize(rnd)})
                if rate == f:
                    random_runs[f"random_seed{seed}"] = rnd
            results["random"].append(random_spread(rate, per_seed))
            on_update(results)
        if min_prob is None:
            # The confidence policy's cut-off giving the same share of tokens along the base's answers.  The file
            # (and its manifest) is named by that share, not by the cut-off, so a rerun whose teacher-forced pass
            # rounds differently (another thread count) still finds it.
            cut, name, where = float(torch.quantile(top.double(), f)) if f > 0 else 0.0, f"confidence-{f:.3f}", {}
            key = {"name": "confidence", "deferral_share": f}
        else:   # chosen on half A, like η: half B reports the rule as it was fixed there
            cut, name, where = min_prob, f"confidence-A{min_prob:.4f}", {"chosen_on": "dev-a"}
            key = {"name": "confidence", "min_prob": min_prob, **where}
        conf = run(Policy("confidence", min_prob=cut), name, examples, key=key)
        results["confidence"] = [{"min_prob": cut, **where, **summarize(conf)}]
        on_update(results)
        results["paired"] = paired_table(chosen_runs[0], {"expert": expert, "base": base, "confidence": conf,
                                                           **random_runs})
        on_update(results)
    return results


def paired_table(colm: dict[int, dict], others: dict[str, dict[int, dict]]) -> dict:
    """Co-LLM against each other run on the problems both answered: ``colm.stats.paired`` (A = Co-LLM)."""
    right = lambda recs: {i: bool(r["correct"]) for i, r in recs.items()}
    return {f"colm_vs_{name}": paired_comparison(right(colm), right(recs)) for name, recs in others.items()}


def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="GSM8K-format JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--split", default="dev-a", choices=["dev-a", "dev-b", "dev", "file"],
                   help="dev-a (alias dev): choose η and the head here; dev-b: report here, once, with --thresholds; "
                        "file: every problem in --data (colm.data.halves)")
    p.add_argument("--dev-size", type=int, default=300)
    p.add_argument("--limit", type=int, default=200, help="evaluate on the first N problems of the split")
    p.add_argument("--sweep-limit", type=int, default=None, help="sweep thresholds on the first N (default: all)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="deferral frequencies to sweep")
    p.add_argument("--thresholds", default=None, help="comma-separated thresholds instead of a sweep")
    p.add_argument("--head", default=None, help="deferral head (default: the shipped head)")
    p.add_argument("--out", required=True, help="output directory: results.json, curve.html, runs/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="token budget per answer; answers also end at a completed '#### n' line")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--baseline-rate", type=float, default=None,
                   help="deferral frequency for the random and confidence baselines (default: the chosen point's)")
    p.add_argument("--max-deferral", type=float, default=None,
                   help="choose the best threshold among those deferring at most this share of tokens (a budget)")
    p.add_argument("--random-rates", default=None,
                   help="comma-separated extra deferral frequencies for the random baseline (its curve)")
    p.add_argument("--random-seeds", default=",".join(map(str, RANDOM_SEEDS)),
                   help="comma-separated seeds for the random baseline, reported as mean ± sd over them")
    p.add_argument("--restart", action="store_true",
                   help="a run file under OUT/runs/ written with other settings (or without a manifest) is moved aside "
                        "(NAME.jsonl.replaced-TIME) and decoded again, instead of stopping with an error; matching "
                        "runs are still reused")
    p.add_argument("--write-threshold", action="store_true", help="store the chosen threshold in the head file")
    p.add_argument("--backtrack", action="store_true",
                   help="also run the chosen point (and, with several thresholds, every swept one) with course "
                        "correction (colm.backtrack): results['backtrack'] and ['backtrack_curve']")
    p.add_argument("--max-retries", type=int, default=2, help="--backtrack: rollbacks an answer at most")


def _fractions(text: str, flag: str) -> list[float]:
    """Comma-separated shares in [0, 1], or a clean error naming the flag."""
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        raise ColmError(f"{flag} takes comma-separated numbers in [0, 1], got {text!r}") from None
    if not all(0.0 <= x <= 1.0 for x in out):
        raise ColmError(f"{flag} must be in [0, 1], got {text}")
    return out


def _seeds(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise ColmError(f"--random-seeds takes comma-separated integers, got {text!r}") from None
    if any(x < 0 for x in out) or len(set(out)) != len(out):
        raise ColmError(f"--random-seeds must be distinct integers ≥ 0, got {text}")
    return out


def main(args) -> int:
    from .data import DEFAULT_DATA, read_jsonl, select
    from .loading import load_from_args
    # Checked before the models load (a minute), so a typo fails at once.
    for flag, value in (("--baseline-rate", args.baseline_rate), ("--max-deferral", args.max_deferral)):
        if value is not None:
            _fractions(str(value), flag)
    random_rates = _fractions(args.random_rates, "--random-rates") if args.random_rates else []
    random_seeds = _seeds(args.random_seeds)
    fractions = _fractions(args.fractions, "--fractions")
    thresholds = _fractions(args.thresholds, "--thresholds") if args.thresholds else None   # η is a probability
    if args.backtrack:
        from .backtrack import Backtrack
        backtrack = Backtrack(max_retries=args.max_retries)
    else:
        backtrack = None
    data = Path(args.data) if args.data else DEFAULT_DATA
    rows = read_jsonl(data)
    examples = select(rows, args.split, args.dev_size)
    examples = examples[:args.limit]
    pair, head = load_from_args(args, need_head=True)
    if not head.trained:
        raise ColmError("evaluate needs a trained head (--head PATH)")
    dec = CoLLM(pair, head)
    sweep = examples[:args.sweep_limit] if args.sweep_limit else examples
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(res):
        res["split"] = args.split
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / "results.json")

    res = evaluate(dec, examples, out, fractions, sweep, thresholds, args.batch_size, args.max_new_tokens,
                   not args.no_baselines, on_update=save, baseline_rate=args.baseline_rate,
                   max_deferral=args.max_deferral, random_rates=random_rates, random_seeds=random_seeds,
                   data=data_fingerprint(rows), restart=args.restart, data_file=data.name, backtrack=backtrack,
                   min_prob=(head.meta.get("min_probs") or {}).get(pair.engine) if args.split == "dev-b" else None)
    save(res)
    from .viz import curve_figure
    curve_figure(res).write_html(str(out / "curve.html"), include_plotlyjs=True)
    if args.write_threshold:
        head_path = Path(args.head) if args.head else None
        if head_path is None:
            from .head import SHIPPED_HEAD
            head_path = SHIPPED_HEAD
        if args.split == "dev-b":
            raise ColmError("--write-threshold stores η chosen on dev half A (--split dev-a); half B is for reporting")
        moved = (head.meta.get("thresholds") or {}).get(pair.engine) != res["chosen"]["threshold"]
        head.meta["threshold"] = res["chosen"]["threshold"]
        head.meta.setdefault("thresholds", {})[pair.engine] = res["chosen"]["threshold"]   # η per engine
        if res.get("confidence") and args.baseline_rate is None:
            # the rule at the head's share, for the page and CLI to compare at equal cost
            head.meta["min_prob"] = res["confidence"][0]["min_prob"]
            head.meta.setdefault("min_probs", {})[pair.engine] = res["confidence"][0]["min_prob"]
        elif moved:   # a cut-off matched to the old η would no longer cost the same
            head.meta.pop("min_prob", None)
            (head.meta.get("min_probs") or {}).pop(pair.engine, None)
        protocol = {"chosen_on": args.split, "engine": pair.engine, "dev_size": args.dev_size,
                    "n_examples": len(examples), "max_new_tokens": args.max_new_tokens,
                    "max_deferral": args.max_deferral, "stop": "eos or '#### n' line"}
        head.meta["protocol"] = protocol
        head.meta.setdefault("protocols", {})[pair.engine] = protocol
        keep = ("n_examples", "max_new_tokens", "max_deferral", "base", "expert", "chosen", "colm", "random",
                "confidence", "proxy", "paired", "backtrack", "backtrack_curve")
        # "dev" is the evidence with every baseline (tests/test_shipped_head.py reads it); a run without them
        # (η confirmed on another engine or budget) is kept beside it under its own key instead of replacing it.
        key = "dev" if not args.no_baselines else f"{args.split}/{pair.engine}/{args.max_new_tokens}"
        head.meta.setdefault("metrics", {})[key] = {k: res[k] for k in keep if k in res}
        head.save(head_path)
    print(json.dumps({k: res[k] for k in ("base", "expert", "chosen", "random", "confidence", "paired", "backtrack")
                      if k in res},
                     indent=1))
    return 0
