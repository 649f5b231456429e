"""Item 2: the paper code's way as a reference.

The official Co-LLM implementation gives the expert the *full prefix* at every deferred token and keeps no expert
KV cache.  ``paper_style`` reproduces that here on the engine API (bench only, never in the library; either engine):
the base keeps its row (KV cache) as in our loop, the expert gets a fresh row per deferred token, the policy draws
are the same (Policy("random", rate, seed) consumes one draw per step in both), and only argmax is computed (no
top-k, no records) and only the last position's logits are kept, so the reference is if anything flattered.

Our loop: CoLLM.generate with the same policy.  Both run the same prompt for the same n tokens (EOS ignored),
interleaved, and the realised deferrals are identical.
"""
from __future__ import annotations

import time

import torch

try:
    from . import common as C
except ImportError:
    import common as C


@torch.inference_mode()
def paper_style(dec, ids: list[int], n: int, policy) -> dict:
    """The paper's loop on the engine API: the base steps one token at a time on its own row (hidden state asked,
    as our loop asks it); a deferred token opens a fresh expert row, feeds it the whole prefix and closes it."""
    pair = dec.pair
    rngs = policy.rngs([0])        # CoLLM.generate draws with key 0: the same draws, the same deferrals
    rows = pair.base.open(1)
    try:
        t0 = time.perf_counter()
        o = pair.base.feed(rows, [list(ids)], keep=1, hidden=True)
        h, logits = o.hidden, o.logits[0][-1:]
        seq = list(ids)
        out, deferred, expert_tokens_fed = [], 0, 0
        for i in range(n):
            p = dec.head.p_defer(h, logits) if dec.head is not None else torch.full((1,), float("nan"))
            top = torch.softmax(logits.float(), -1).max(-1).values
            if bool(policy.defer(p.cpu(), top.cpu(), rngs)[0]):
                er = pair.expert.open(1)   # the whole prefix, every time: no expert cache
                try:
                    tok = int(pair.expert.feed(er, [seq], keep=1).logits[0][-1].argmax())
                finally:
                    pair.expert.close(er)
                deferred += 1
                expert_tokens_fed += len(seq)
            else:
                tok = int(logits[0].argmax())
            seq.append(tok)
            out.append(tok)
            if i + 1 < n:
                o = pair.base.feed(rows, [[tok]], keep=1, hidden=True)
                h, logits = o.hidden, o.logits[0][-1:]
        wall = time.perf_counter() - t0
    finally:
        pair.base.close(rows)
    return {"wall_s": wall, "tokens": n, "deferred": deferred, "expert_tokens_fed": expert_tokens_fed,
            "token_ids": out}


def run(pair, quick: bool = False, n: int | None = None, reps: int | None = None, rate: float = 0.2) -> dict:
    from colm.decode import Policy
    n = n or (48 if quick else 256)
    reps = reps or (1 if quick else 2)
    msgs = C.prompts(1)[0]
    dec = C.decoder(pair)
    ids = dec.encode(msgs)
    pol = Policy("random", rate=rate, seed=0)

    def ours(n_):
        t = time.perf_counter()
        tr = dec.generate(msgs, policy=pol, max_new_tokens=n_)
        wall = time.perf_counter() - t
        tr.release()
        return {"wall_s": wall, "tokens": len(tr.steps),
                "deferred": sum(s.source == "expert" for s in tr.steps),
                "expert_tokens_fed": len(ids) + (max(i for i, s in enumerate(tr.steps) if s.source == "expert")
                                                 if tr.expert_calls else -len(ids)),
                "token_ids": tr.token_ids}

    def paper(n_):
        return paper_style(dec, ids, n_, pol)

    C.log("[paper] warm-up")
    ours(4), paper(4)
    runs = {"ours": [], "paper_style": []}
    for rep in range(reps):
        for name, f in ((("ours", ours), ("paper_style", paper)) if rep % 2 == 0
                        else (("paper_style", paper), ("ours", ours))):
            r, nz = C.timed(f, n)
            r["noise"] = nz
            runs[name].append(r)
            C.log(f"[paper] rep {rep} {name:12s} {r['wall_s']:7.2f}s deferred={r['deferred']} "
                  f"foreign={nz['foreign_cores']:.2f}")
    speed = C.summary([p["wall_s"] / o["wall_s"] for o, p in zip(runs["ours"], runs["paper_style"])])
    a, b = runs["ours"][0]["token_ids"], runs["paper_style"][0]["token_ids"]
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {
        "n_tokens": n, "reps": reps, "rate": rate, "prompt_tokens": len(ids),
        "deferred": runs["ours"][0]["deferred"], "deferral_fraction": runs["ours"][0]["deferred"] / n,
        "tokens_per_s": {k: C.summary([r["tokens"] / r["wall_s"] for r in v]) for k, v in runs.items()},
        "expert_tokens_fed": {k: v[0]["expert_tokens_fed"] for k, v in runs.items()},
        "speedup": speed, "same_tokens": a == b, "first_token_difference": first_diff,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "token_ids"} for r in v] for k, v in runs.items()},
    }


if __name__ == "__main__":
    C.script_main("paper_ref", "paper_ref", run)
