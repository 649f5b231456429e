"""Items 1 and 3: single-prompt decode speed against the cost model, and our loop against transformers.

All modes run on the same prompt for the same number of tokens (EOS ignored), interleaved within each repetition
(the order rotates between repetitions so drift on a shared machine spreads over all modes); medians are reported.

  raw_base / raw_expert  greedy loops with nothing but model calls + argmax: give t_base_step / t_expert_step
  hf_base                pair.base.generate(do_sample=False), EOS disabled
  hf_base_1token         the same with max_new_tokens=1 (prefill), to split hf_base into prefill + steady steps
  colm_base              CoLLM, Policy("base")             (our loop, records and top-k included)
  colm_random_<r>        CoLLM, Policy("random", rate=r, seed=0)
  colm_learned           CoLLM, shipped head at its threshold (only if assets/head-gsm8k.safetensors exists)

Bound (per generated token, base prefill excluded):  ((n-1)·t_base_step + D·t_expert_step) / n  with D the deferred
tokens, i.e. t_base_step + f·t_expert_step.  The catch-up cost table (expert forward of k pending tokens against
one) explains what the bound leaves out.
"""
from __future__ import annotations

import time

import torch

try:
    from . import common as C
except ImportError:  # run as a script
    import common as C


def _hf(model, ids, n, pad_id):
    from transformers import GenerationConfig
    x = torch.tensor([ids])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
    return time.perf_counter() - t, out[0, len(ids):].tolist()


@torch.inference_mode()
def catchup_cost(pair, ids, n_vocab, ks=(1, 2, 4, 8, 16), reps=3) -> dict:
    """Expert forward time for k pending tokens on a cached prompt, relative to k = 1."""
    from transformers import DynamicCache
    from colm.decode import _positions, expert_forward
    x = torch.tensor([ids])
    m = torch.ones_like(x)
    cache = DynamicCache(config=pair.expert.config)
    expert_forward(pair.expert, x, m, _positions(m), cache, 1, n_vocab)
    L = len(ids)
    res = {}
    for k in ks:
        ts = []
        for _ in range(reps):
            new = torch.tensor([ids[-k:]])
            mm = torch.ones(1, L + k, dtype=torch.long)
            t = time.perf_counter()
            expert_forward(pair.expert, new, mm, _positions(mm)[:, L:], cache, k, n_vocab)
            ts.append(time.perf_counter() - t)
            cache.crop(-k)
        res[k] = C.med(ts)
    return {"seconds": res, "relative_to_k1": {k: v / res[1] for k, v in res.items()}}


def run(pair, quick: bool = False, n: int | None = None, reps: int | None = None, rates=(0.1, 0.2, 0.4)) -> dict:
    from colm.decode import Policy
    n = n or (24 if quick else 128)
    reps = reps or (2 if quick else 3)
    msgs = C.prompts(1)[0]
    dec = C.decoder(pair)
    ids = dec.encode(msgs)
    V = dec.n_vocab
    head = C.learned_head(pair)
    hdec = C.decoder(pair, head) if head is not None else None

    def colm(policy, d=dec):
        def f(n_):
            t = time.perf_counter()
            tr = d.generate(msgs, policy=policy, max_new_tokens=n_)
            wall = time.perf_counter() - t
            return {"wall_s": wall, "prefill_s": tr.prefill_seconds, "decode_s": tr.decode_seconds,
                    "tokens": len(tr.steps), "deferred": sum(s.source == "expert" for s in tr.steps),
                    "expert_calls": tr.expert_calls, "token_ids": tr.token_ids}
        return f

    def raw(model, expert):
        def f(n_):
            r = C.raw_decode(model, ids, n_, V, expert=expert)
            return {"wall_s": r["total_s"], "prefill_s": r["prefill_s"], "step_s": r["step_s"], "tokens": n_,
                    "deferred": n_ if expert else 0, "token_ids": r["tokens"]}
        return f

    def hf(n_):
        wall, toks = _hf(pair.base, ids, n_, dec.pad_id)
        return {"wall_s": wall, "tokens": len(toks), "token_ids": toks}

    modes = {"raw_base": raw(pair.base, False), "raw_expert": raw(pair.expert, True), "hf_base": hf,
             "hf_base_1token": lambda n_: hf(1),
             "colm_base": colm(Policy("base"))}
    for r in rates:
        modes[f"colm_random_{r:g}"] = colm(Policy("random", rate=r, seed=0))
    if hdec is not None:
        modes["colm_learned"] = colm(Policy("colm", threshold=head.threshold), hdec)

    C.log(f"[decode] warm-up ({len(modes)} modes)")
    for f in modes.values():
        f(4)
    runs = {k: [] for k in modes}
    names = list(modes)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r, nz = C.timed(modes[name], n)
            r["noise"] = nz
            runs[name].append(r)
            C.log(f"[decode] rep {rep} {name:18s} {r['wall_s']:7.2f}s  foreign={r['noise']['foreign_cores']:.2f}")
    C.log("[decode] catch-up cost vs k")
    catch = catchup_cost(pair, ids, V)

    t_b = C.summary([r["step_s"] for r in runs["raw_base"]])
    t_e = C.summary([r["step_s"] for r in runs["raw_expert"]])
    t_e_prefill = C.med([r["prefill_s"] for r in runs["raw_expert"]])
    table = {}
    for name, rs in runs.items():
        tps = C.summary([r["tokens"] / r["wall_s"] for r in rs])
        row = {"tokens_per_s": tps, "wall_s": C.summary([r["wall_s"] for r in rs]), "tokens": rs[0]["tokens"],
               "foreign_cores": C.summary([r["noise"]["foreign_cores"] for r in rs])}
        if name.startswith("colm"):
            D = rs[0]["deferred"]
            f = D / rs[0]["tokens"]
            per_tok = C.summary([(r["decode_s"] - r["prefill_s"]) / r["tokens"] for r in rs])
            bound = ((n - 1) * t_b["median"] + D * t_e["median"]) / n
            row.update({"deferral_fraction": f, "deferred": D, "expert_calls": rs[0]["expert_calls"],
                        "per_token_s": per_tok, "bound_per_token_s": bound,
                        "bound_plus_expert_prefill_per_token_s": bound + (t_e_prefill / n if D else 0.0),
                        "measured_over_bound": per_tok["median"] / bound})
        table[name] = row
    exp_tps = table["raw_expert"]["tokens_per_s"]["median"]
    table.pop("hf_base_1token")
    for name, row in table.items():
        row["speedup_vs_expert_only"] = row["tokens_per_s"]["median"] / exp_tps
    same = {name: rs[0]["token_ids"] == runs["raw_base"][0]["token_ids"]
            for name, rs in runs.items() if name in ("hf_base", "colm_base")}
    hf_pre = C.med([r["wall_s"] for r in runs["hf_base_1token"]])
    steady = {"hf_base_s": C.med([(r["wall_s"] - hf_pre) / (n - 1) for r in runs["hf_base"]]),
              "colm_base_s": C.med([(r["decode_s"] - r["prefill_s"]) / (n - 1) for r in runs["colm_base"]]),
              "raw_base_s": t_b["median"], "hf_prefill_plus_first_token_s": hf_pre,
              "colm_base_prefill_s": C.med([r["prefill_s"] for r in runs["colm_base"]])}
    steady["ours_over_hf_per_step"] = steady["hf_base_s"] / steady["colm_base_s"]
    ours_vs_hf = C.summary([a["tokens"] / a["wall_s"] / (b["tokens"] / b["wall_s"])
                            for a, b in zip(runs["colm_base"], runs["hf_base"])])
    return {"n_tokens": n, "reps": reps, "prompt_tokens": len(ids),
            "learned_head": {"threshold": head.threshold, "name": head.identity} if head is not None else None, "t_base_step_s": t_b, "t_expert_step_s": t_e,
            "t_base_prefill_s": C.med([r["prefill_s"] for r in runs["raw_base"]]),
            "t_expert_prefill_s": t_e_prefill, "modes": table, "catchup_cost": catch,
            "ours_over_hf_base": {"paired": ours_vs_hf,
                                  "of_medians": table["colm_base"]["tokens_per_s"]["median"]
                                  / table["hf_base"]["tokens_per_s"]["median"],
                                  "steady_state": steady},
            "same_tokens_as_raw_base": same,
            "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "token_ids"} for r in rs] for k, rs in runs.items()}}


if __name__ == "__main__":
    C.script_main("decode_speed", "decode", run)
