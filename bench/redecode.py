"""Item 4: the threshold slider.  Time ``CoLLM.redecode(trace, eta')`` whose first flipped decision falls at 25, 50
and 90 % of an n-token answer, against a full decode at eta'.

Placing the first flip exactly.  With a plain random-weight head the first flip for eta -> eta' is the first step
whose p_defer lies between the two thresholds; only "record" positions (p closer to eta than every earlier p on
that side) can ever be first, and late records are rare (about ln(n) per side), so 90 % is usually unreachable.
The bench therefore uses a head it controls: a random-weight linear head (p varies with the hidden state as usual)
plus, at the chosen positions t only, an override that puts p_t a few fp32 ulps below eta (so the original decode
takes the base token there).  eta' is then set just below p_t: the band between eta' and eta holds p_t, the later
override positions (their offsets are nested) and (verified, not assumed) no other step, so step t flips to the
expert and nothing earlier flips.  The
override is keyed by the step index, which the bench passes to the head by wrapping ``decode_one``; the library's
redecode path runs unmodified.

Redecode consumes a trace's state (its engine rows), so the original is decoded afresh, untimed, before every
timed re-decode (greedy: the same trace every time).
Every re-decode is checked token-for-token against the full decode at the same eta'.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    from . import common as C
except ImportError:
    import common as C

TARGETS = (0.25, 0.5, 0.9)
ULP = 2.0 ** -22            # fp32 spacing just below 1.0 is 2^-24; every value used is a multiple of this


def _f32(x: float) -> float:
    return float(np.float32(x))


class OverrideHead(torch.nn.Module):
    """Wraps a DeferralHead; p at the step indices in ``override`` is replaced (see module doc)."""

    def __init__(self, head):
        super().__init__()
        self.inner, self.override, self.pos = head, {}, None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def p_defer(self, h, logits=None, conf=None):
        p = self.inner.p_defer(h, logits, conf)
        if self.pos in self.override:
            p = torch.full_like(p, self.override[self.pos])
        return p


def _track_position(dec, head: OverrideHead):
    inner = dec.decode_one

    def decode_one(st, *a, **k):
        head.pos = len(st.seqs[0]) - st.prompt_lens[0]   # index of the step being decided
        return inner(st, *a, **k)
    dec.decode_one = decode_one


def run(pair, quick: bool = False, n: int | None = None, reps: int | None = None, rate: float = 0.2) -> dict:
    n = n or (48 if quick else 256)
    reps = reps or (1 if quick else 2)
    msgs = C.prompts(1)[0]
    probe = C.decoder(pair)
    ids = probe.encode(msgs)
    rhead, p_sorted = C.random_head(pair, ids, seed=0)
    eta = _f32(round(float(np.quantile(p_sorted, 1 - rate)) * 1024) / 1024)   # ~rate deferral, exact in fp32
    head = OverrideHead(rhead)
    dec = C.decoder(pair, head)
    _track_position(dec, head)

    # Later targets get the narrower offset, so an earlier target's band also holds the later overrides and its
    # first flip is still the earliest.
    plan = {}
    for j, q in enumerate(TARGETS):
        t = min(n - 1, round(q * n))
        width = (len(TARGETS) - j) * 4 * ULP
        head.override[t] = _f32(eta - width)
        plan[q] = {"t": t, "p_override": _f32(eta - width), "eta_new": _f32(eta - width - 2 * ULP)}

    C.log(f"[redecode] eta={eta}: original decode (with overrides)")
    dec.generate(msgs, threshold=eta, max_new_tokens=4).release()  # warm-up
    (orig, orig_noise) = C.timed(dec.generate, msgs, threshold=eta, max_new_tokens=n)
    orig.release()
    orig_wall = orig_noise["wall_s"]
    p = [s.p_defer for s in orig.steps]
    for q, pl in plan.items():
        lo, hi = sorted((eta, pl["eta_new"]))
        pl["first_flip_expected"] = next((i for i, x in enumerate(p) if lo < x <= hi), None)

    results = {}
    for q, pl in plan.items():
        C.log(f"[redecode] full decode at eta'={pl['eta_new']} (target {q:.0%})")
        full, full_noise = C.timed(dec.generate, msgs, threshold=pl["eta_new"], max_new_tokens=n)
        full.release()
        re_runs = []
        for rep in range(reps):
            tr = dec.generate(msgs, threshold=eta, max_new_tokens=n)   # a fresh original (untimed)
            if tr.token_ids != orig.token_ids:
                raise RuntimeError("the original decode is not reproducible; re-decode timings would be void")
            re, nz = C.timed(dec.redecode, tr, pl["eta_new"], n)
            re.release()
            wall = nz["wall_s"]
            re_runs.append({"wall_s": wall, "decode_s": re.decode_seconds, "setup_s": re.prefill_seconds,
                            "reused": re.reused_steps, "noise": nz})
            C.log(f"[redecode] target {q:.0%} rep {rep}: reused {re.reused_steps}/{n} in {wall:.2f}s "
                  f"(full {full_noise['wall_s']:.2f}s)")
        t = re.reused_steps
        wall = C.summary([r["wall_s"] for r in re_runs])
        results[f"{q:g}"] = {
            **pl, "first_flip": t, "changed_fraction": (n - t) / n,
            "redecode_s": wall, "full_decode_s": full_noise["wall_s"],
            "time_ratio": wall["median"] / full_noise["wall_s"],
            "ratio_over_changed_fraction": wall["median"] / full_noise["wall_s"] / ((n - t) / n),
            "equals_full_decode": re.token_ids == full.token_ids and
                                  [s.source for s in re.steps] == [s.source for s in full.steps],
            "deferral_fraction_full": full.deferral_rate, "full_noise": full_noise, "runs": re_runs,
        }
    return {"n_tokens": n, "reps": reps, "eta": eta, "deferral_fraction_original": orig.deferral_rate,
            "original_decode_s": orig_wall, "targets": results}


if __name__ == "__main__":
    C.script_main("redecode", "redecode", run)
