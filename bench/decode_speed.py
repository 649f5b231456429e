"""Issue 17: the engine comparison.  Single-prompt decode speed of every engine against the cost model, in ONE run.

    python bench/decode_speed.py                                # torch and llamacpp, 128 tokens, 3 repetitions
    python bench/decode_speed.py --engines llamacpp --batch-sizes 1,2,4,8
    python bench/decode_speed.py --quick --tokens 8 --reps 1 --no-gate     # a smoke run

Both pairs are loaded in the one process (torch's default pair dequantises the GGUF to bf16 on its first load,
~1-2 min, cached after).  Every mode of every engine runs on the same prompt for the same number of tokens (EOS
ignored), interleaved within each repetition (the order rotates between repetitions, engines alternate, so drift
on a shared machine spreads over all of them); medians over the repetitions are reported.

  raw_base / raw_expert  greedy loops with nothing but engine calls + argmax (colm/engines API: one row, the prompt
                         fed, then one token a step; the base with hidden=True as the decoder asks it, the expert
                         without): give t_base_step / t_expert_step
  base_only              CoLLM, Policy("base")               (our loop, records and top-k included)
  expert_only            CoLLM, Policy("expert")             (the base still runs every step: its bound is t_b + t_e)
  colm_random_<r>        CoLLM, Policy("random", rate=r, seed=0)
  colm_learned           CoLLM, the shipped head (assets/head-gsm8k.safetensors) at its stored threshold

Before every timed block torch's process-wide thread count is set as ``load_pair`` sets it for that engine alone
(--threads on torch; 1 beside llama.cpp), so holding both pairs in one process does not change either's numbers.

Cost-model bound per generated token (base prefill excluded): t_base_step + f * t_expert_step, f the measured
deferral rate; ``measured_over_bound`` = (decode time after the prefill / tokens) / bound.  The expert's prompt
prefill falls inside the first catch-up, so a second ratio adds it, spread over the n tokens.  The catch-up table
(expert feed of k pending tokens against one) explains the rest.  ``engine_ratio``: llamacpp tokens/s over torch
tokens/s per mode (paired by repetition, then the median).

``--batch-sizes 1,2,4,8`` also measures ``CoLLM.generate_batch`` throughput (tokens/s over all rows, the shipped head
at its threshold) per batch size on llamacpp (bench/batch.py's measurement; no target).

Writes bench/out/decode_speed.json and prints a Markdown table on stdout (the progress goes to stderr).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

try:
    from . import common as C
except ImportError:  # run as a script
    import common as C

SETTLE_S = 0.3   # pause before each timed block: the other engine's worker threads stop spinning


@torch.inference_mode()
def catchup_cost(pair, ids: list[int], ks=(1, 2, 4, 8, 16), reps: int = 3) -> dict:
    """Expert feed time for k pending tokens on a cached prefix, relative to k = 1, with logits kept as the default
    decoder keeps them (every covered position where logits are cheap, torch; the last only, llama.cpp), and the
    least-squares line seconds = a + b * k through the points (the cost model's catch-up term).  The prefix is the
    prompt less its last max(ks) tokens; the k pending tokens are the prompt's next k."""
    C.use(pair)
    eng = pair.expert
    every = eng.cheap_logits
    ks = [k for k in ks if k < len(ids)]
    L = len(ids) - max(ks)
    rows = eng.open(1)
    res = {}
    try:
        eng.feed(rows, [ids[:L]], keep=1)
        eng.feed(rows, [ids[L:L + 1]], keep=1)   # warm-up
        eng.crop(rows, [L])
        for k in ks:
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                eng.feed(rows, [ids[L:L + k]], keep=k if every else 1)
                ts.append(time.perf_counter() - t)
                eng.crop(rows, [L])
            res[k] = C.med(ts)
    finally:
        eng.close(rows)
    xs, ys = list(res), list(res.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"prefix_tokens": L, "keep": "k" if every else 1, "seconds": res,
            "relative_to_k1": {k: v / res[ks[0]] for k, v in res.items()}, "fit_a_s": my - b * mx, "fit_b_s": b}


def catchups(steps, prompt_len: int) -> list[int]:
    """Pending tokens at each expert call of a lazy decode: the prompt and every token up to the first deferred
    position, then the tokens since the previous deferral."""
    at = [s.position for s in steps if s.source == "expert"]
    return [prompt_len + at[0]] + [b - a for a, b in zip(at, at[1:])] if at else []


def _modes(pair, msgs, ids, rates) -> tuple[dict, dict | None]:
    """name -> f(n) for one engine's pair; and the learned head's description (None without one)."""
    from colm.decode import Policy
    dec = C.decoder(pair)
    head = C.learned_head(pair)

    def colm(policy, d=dec):
        def f(n_):
            t = time.perf_counter()
            tr = d.generate(msgs, policy=policy, max_new_tokens=n_)
            wall = time.perf_counter() - t
            tr.release()
            return {"wall_s": wall, "prefill_s": tr.prefill_seconds, "decode_s": tr.decode_seconds,
                    "tokens": len(tr.steps), "deferred": sum(s.source == "expert" for s in tr.steps),
                    "catchups": catchups(tr.steps, len(tr.prompt_ids)),
                    "expert_calls": tr.expert_calls, "token_ids": tr.token_ids}
        return f

    def raw(engine, hidden):
        def f(n_):
            r = C.raw_decode(engine, ids, n_, hidden=hidden)
            return {"wall_s": r["total_s"], "prefill_s": r["prefill_s"], "step_s": r["step_s"], "tokens": n_,
                    "token_ids": r["tokens"]}
        return f

    def on(f):          # torch's thread count as this engine's own process would have it
        def g(n_):
            C.use(pair)
            return f(n_)
        return g

    modes = {"raw_base": raw(pair.base, True), "raw_expert": raw(pair.expert, False),
             "base_only": colm(Policy("base")), "expert_only": colm(Policy("expert"))}
    for r in rates:
        modes[f"colm_random_{r:g}"] = colm(Policy("random", rate=r, seed=0))
    if head is not None:
        modes["colm_learned"] = colm(Policy("colm", threshold=head.threshold), C.decoder(pair, head))
    return {k: on(f) for k, f in modes.items()}, ({"threshold": head.threshold, "name": head.identity} if head is not None else None)


def _first_diff(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _engine_table(runs: dict, n: int, cc: dict | None = None) -> dict:
    """One engine's runs {mode: [run, ...]} -> step times, per-mode rows against the cost model.

    Two bounds per token.  The simple one, t_base + f * t_expert, holds where a catch-up of k tokens costs one
    expert step (torch: memory-bound).  The catch-up one charges each expert call its measured cost instead:
    (n * t_base + expert prefill + sum over the later calls of (a + b * k)) / n, the first call being the expert's
    prompt prefill plus b per generated token it covers (a, b: the catch-up line of ``catchup_cost``)."""
    t_b = C.summary([r["step_s"] for r in runs["raw_base"]])
    t_e = C.summary([r["step_s"] for r in runs["raw_expert"]])
    t_b_pre = C.med([r["prefill_s"] for r in runs["raw_base"]])
    t_e_pre = C.med([r["prefill_s"] for r in runs["raw_expert"]])
    raw_expert_tps = C.med([r["tokens"] / r["wall_s"] for r in runs["raw_expert"]])
    table = {}
    for name, rs in runs.items():
        row = {"tokens_per_s": C.summary([r["tokens"] / r["wall_s"] for r in rs]),
               "wall_s": C.summary([r["wall_s"] for r in rs]), "tokens": rs[0]["tokens"],
               "foreign_cores": C.summary([r["noise"]["foreign_cores"] for r in rs])}
        if name.startswith("raw_"):
            row["per_token_s"] = C.summary([r["step_s"] for r in rs])
        else:
            D = rs[0]["deferred"]
            f = D / rs[0]["tokens"]
            per_tok = C.summary([(r["decode_s"] - r["prefill_s"]) / r["tokens"] for r in rs])
            bound = t_b["median"] + f * t_e["median"]
            with_pre = bound + (t_e_pre / n if D else 0.0)
            if cc is not None and rs[0].get("catchups"):
                ks = rs[0]["catchups"]
                first_gen = ks[0] - (rs[0]["catchups_prompt"] if "catchups_prompt" in rs[0] else 0)
                cost = (t_e_pre + cc["fit_b_s"] * max(0, first_gen)
                        + sum(cc["fit_a_s"] + cc["fit_b_s"] * k for k in ks[1:]))
                cb = t_b["median"] + cost / rs[0]["tokens"]
                row.update({"catchup_bound_per_token_s": cb, "measured_over_catchup_bound": per_tok["median"] / cb,
                            "mean_catchup_tokens": sum(ks[1:]) / max(1, len(ks) - 1)})
            row.update({"deferral_fraction": f, "deferred": D, "expert_calls": rs[0]["expert_calls"],
                        "deferred_same_every_rep": len({r["deferred"] for r in rs}) == 1,
                        "per_token_s": per_tok, "prefill_s": C.med([r["prefill_s"] for r in rs]),
                        "bound_per_token_s": bound, "measured_over_bound": per_tok["median"] / bound,
                        "bound_plus_expert_prefill_per_token_s": with_pre,
                        "measured_over_bound_plus_expert_prefill": per_tok["median"] / with_pre})
        row["speedup_vs_raw_expert"] = row["tokens_per_s"]["median"] / raw_expert_tps
        table[name] = row
    same = {"base_only_vs_raw_base": runs["base_only"][0]["token_ids"] == runs["raw_base"][0]["token_ids"],
            "expert_only_vs_raw_expert": runs["expert_only"][0]["token_ids"] == runs["raw_expert"][0]["token_ids"]}
    loop = {"base_only_step_over_raw_base_step":
            C.med([(r["decode_s"] - r["prefill_s"]) / max(1, r["tokens"] - 1) for r in runs["base_only"]])
            / t_b["median"]}
    return {"t_base_step_s": t_b, "t_expert_step_s": t_e, "t_base_prefill_s": t_b_pre, "t_expert_prefill_s": t_e_pre,
            "modes": table, "same_tokens": same, "loop_overhead": loop}


def run(pairs: dict, quick: bool = False, n: int | None = None, reps: int | None = None, rates=(0.1, 0.2),
        prompt_index: int = 0, catchup: bool = True) -> dict:
    """pairs: engine name -> Pair (one or more engines).  Returns the JSON-ready result."""
    n = n or (24 if quick else 128)
    reps = reps or (1 if quick else 3)
    msgs = C.prompts(1, prompt_index)[0]
    engines = list(pairs)
    modes, heads, ids_of = {}, {}, {}
    for e, pair in pairs.items():
        ids_of[e] = C.decoder(pair).encode(msgs)
        ms, heads[e] = _modes(pair, msgs, ids_of[e], rates)
        for name, f in ms.items():
            modes[(e, name)] = f
    names = sorted({m for _, m in modes}, key=lambda m: [m for _, m in modes].index(m))
    order0 = [(e, m) for m in names for e in engines if (e, m) in modes]   # engines alternate

    C.log(f"[decode] warm-up ({len(modes)} modes on {', '.join(engines)})")
    for f in modes.values():
        f(4)
    runs = {k: [] for k in modes}
    for rep in range(reps):
        k = rep * len(order0) // reps     # each repetition starts elsewhere in the order
        for key in order0[k:] + order0[:k]:
            time.sleep(SETTLE_S)
            r, nz = C.timed(modes[key], n)
            r["noise"] = nz
            runs[key].append(r)
            C.log(f"[decode] rep {rep} {key[0]:8s} {key[1]:18s} {r['wall_s']:7.2f}s  "
                  f"{r['tokens'] / r['wall_s']:6.2f} tok/s  foreign={nz['foreign_cores']:.2f}")

    out = {"n_tokens": n, "reps": reps, "prompt_index": prompt_index, "prompt_tokens": len(ids_of[engines[0]]),
           "same_prompt_ids": len({tuple(v) for v in ids_of.values()}) == 1, "rates": list(rates), "engines": {}}
    for e in engines:
        per = {m: rs for (ee, m), rs in runs.items() if ee == e}
        cc = None
        if catchup:
            C.log(f"[decode] {e}: catch-up cost vs k")
            cc = catchup_cost(pairs[e], ids_of[e])
        for rs in per.values():
            for r in rs:
                r["catchups_prompt"] = len(ids_of[e])
        res = _engine_table(per, n, cc)
        res["pair"] = C.describe(pairs[e])
        res["learned_head"] = heads[e]
        if cc is not None:
            res["catchup_cost"] = cc
        res["runs"] = {m: [{kk: vv for kk, vv in r.items() if kk != "token_ids"} for r in rs] for m, rs in per.items()}
        res["token_ids"] = {m: rs[0]["token_ids"] for m, rs in per.items()}
        out["engines"][e] = res
    if "torch" in pairs and "llamacpp" in pairs:
        ratio = {}
        for m in names:
            a, b = runs.get(("llamacpp", m)), runs.get(("torch", m))
            if a and b:
                ratio[m] = {"paired": C.summary([x["tokens"] / x["wall_s"] / (y["tokens"] / y["wall_s"])
                                                 for x, y in zip(a, b)]),
                            "of_medians": out["engines"]["llamacpp"]["modes"][m]["tokens_per_s"]["median"]
                            / out["engines"]["torch"]["modes"][m]["tokens_per_s"]["median"]}
        t, ll = out["engines"]["torch"], out["engines"]["llamacpp"]
        out["engine_ratio"] = {
            "what": "llamacpp speed over torch speed (>1: llamacpp faster)", "tokens_per_s": ratio,
            "base_step": t["t_base_step_s"]["median"] / ll["t_base_step_s"]["median"],
            "expert_step": t["t_expert_step_s"]["median"] / ll["t_expert_step_s"]["median"],
            "base_prefill": t["t_base_prefill_s"] / ll["t_base_prefill_s"],
            "expert_prefill": t["t_expert_prefill_s"] / ll["t_expert_prefill_s"],
            # bf16 dequantised from the same GGUF vs llama.cpp's quantised kernels: greedy tokens may part ways
            "raw_base_first_token_difference": _first_diff(t["token_ids"]["raw_base"], ll["token_ids"]["raw_base"]),
            "raw_expert_first_token_difference": _first_diff(t["token_ids"]["raw_expert"],
                                                             ll["token_ids"]["raw_expert"]),
        }
    return out


# ----------------------------------------------------------------------------------------------- Markdown
def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def markdown(res: dict) -> str:
    lines = [f"Decode speed: {res['n_tokens']} tokens (EOS ignored), prompt {res['prompt_tokens']} tokens, "
             f"{res['reps']} interleaved reps, medians.", "",
             "| engine | mode | f | tokens/s (min–max) | ms/token | bound ms/token | measured/bound | "
             "+expert prefill | catch-up bound ms/token | measured/catch-up bound | vs raw expert |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e, r in res["engines"].items():
        for m, row in r["modes"].items():
            tps, bound = row["tokens_per_s"], row.get("bound_per_token_s")
            cells = [e, m, f"{row['deferral_fraction']:.3f}" if "deferral_fraction" in row else "-",
                     f"{tps['median']:.2f} ({tps['min']:.2f}–{tps['max']:.2f})", _ms(row["per_token_s"]["median"]),
                     _ms(bound) if bound else "-", f"{row['measured_over_bound']:.3f}" if bound else "-",
                     f"{row['measured_over_bound_plus_expert_prefill']:.3f}" if bound else "-",
                     _ms(row["catchup_bound_per_token_s"]) if "catchup_bound_per_token_s" in row else "-",
                     f"{row['measured_over_catchup_bound']:.3f}" if "catchup_bound_per_token_s" in row else "-",
                     f"{row['speedup_vs_raw_expert']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| engine | t_base_step ms | t_expert_step ms | base prefill s | expert prefill s | "
              "loop step / raw base step | catch-up k=1,2,4,8,16 (× k=1) |", "|---|---|---|---|---|---|---|"]
    for e, r in res["engines"].items():
        cc = r.get("catchup_cost")
        cc_s = (", ".join(f"{v:.2f}" for v in cc["relative_to_k1"].values())
                + f" (keep {cc['keep']}; a {_ms(cc['fit_a_s'])} ms + b {_ms(cc['fit_b_s'])} ms/token)") if cc else "-"
        lines.append(f"| {e} | {_ms(r['t_base_step_s']['median'])} | {_ms(r['t_expert_step_s']['median'])} | "
                     f"{r['t_base_prefill_s']:.3f} | {r['t_expert_prefill_s']:.3f} | "
                     f"{r['loop_overhead']['base_only_step_over_raw_base_step']:.3f} | {cc_s} |")
    er = res.get("engine_ratio")
    if er:
        lines += ["", "llamacpp / torch speed (paired tokens/s ratio, median): " +
                  ", ".join(f"{m} {v['paired']['median']:.2f}x" for m, v in er["tokens_per_s"].items()) +
                  f"; base step {er['base_step']:.2f}x, expert step {er['expert_step']:.2f}x."]
    b = res.get("batch")
    if b:
        lines += ["", f"generate_batch on llamacpp ({b['n_tokens']} tokens per row, {b['head']} head at "
                  f"{b['threshold']:.4f}, {b['reps']} reps):", "",
                  "| batch | tokens/s (all rows) | vs batch 1 | row deferral |", "|---|---|---|---|"]
        for k, v in b["sizes"].items():
            lines.append(f"| {k} | {v['tokens_per_s']['median']:.2f} | {v['speedup_vs_batch1']:.2f}x | "
                         f"{v['row_deferral']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 tokens, 1 rep (smoke run; not for numbers)")
    ap.add_argument("--tokens", type=int, help="tokens per answer (default 128; quick 24)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 3; quick 1)")
    ap.add_argument("--rates", default="0.1,0.2", help="Co-LLM random deferral rates")
    ap.add_argument("--prompt", type=int, default=0, help="index of the GSM8K question used as the prompt")
    ap.add_argument("--batch-sizes", default="", help="e.g. 1,2,4,8: generate_batch throughput on llamacpp")
    ap.add_argument("--batch-tokens", type=int, help="tokens per row for --batch-sizes (default: --tokens)")
    ap.add_argument("--no-catchup", action="store_true")
    C.add_engine_args(ap, engines=True)
    a = ap.parse_args(argv)
    C.apply_gate(a)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"torch", "llamacpp"}:
        ap.error("--engines takes torch and/or llamacpp")
    sizes = tuple(int(x) for x in a.batch_sizes.split(",") if x.strip())
    pairs, load_s = {}, {}
    for e in engines:
        C.log(f"[decode] loading the default pair on {e}")
        pairs[e], load_s[e] = C.load(e, a.threads, n_seq=max((16, *sizes)))
    res = run(pairs, a.quick, a.tokens, a.reps, tuple(float(x) for x in a.rates.split(",") if x.strip()), a.prompt,
              not a.no_catchup)
    res["load_pair_s"] = load_s
    if sizes:
        try:
            from . import batch
        except ImportError:
            import batch
        if "llamacpp" not in pairs:
            C.log("[decode] loading the default pair on llamacpp for --batch-sizes")
            pairs["llamacpp"], load_s["llamacpp"] = C.load("llamacpp", a.threads, n_seq=max((16, *sizes)))
        C.use(pairs["llamacpp"])
        res["batch"] = batch.run(pairs["llamacpp"], a.quick, a.batch_tokens or res["n_tokens"], res["reps"], sizes)
    path = C.write_json("decode_speed.json", {"machine": C.machine(), "command": "python bench/decode_speed.py " +
                                              " ".join(sys.argv[1:] if argv is None else argv),
                                              "decode": res})
    print(markdown(res))
    print(f"\n-> {path}")


if __name__ == "__main__":
    main()
