"""What-if at one token (colm.branch): a branch equals a decode from scratch with the same forced choice.

The reference is test_reference's naive decoder (every position recomputed from the whole prefix, no caches) with
one change: at a forced position the forced model writes, whatever the policy says (the policy still draws there,
as ``decode_one`` does, so a random policy's later draws line up).  Tolerances are test_reference's.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from colm.decode import CoLLM
from colm.models import ColmError
from colm.policy import Policy
from test_reference import (RefStep, check_rows, compare, defers, engine_case, last_position,  # noqa: F401
                            TORCH_PROMPTS)

ETA = 0.5
N = 30


def reference_forced(pair, head, prompt_ids, policy: Policy, max_new_tokens: int, eos_ids, force: dict,
                     key: int = 0) -> list[RefStep]:
    """test_reference.reference_decode with ``force`` ({position: "base" | "expert"}) overriding the policy."""
    rng = policy.rngs([key])[0]
    seq, steps = list(prompt_ids), []
    with torch.inference_mode():
        for i in range(max_new_tokens):
            base_logits, h = last_position(pair.base, seq, hidden=True)
            p = float(head.p_defer(h[None], base_logits[None])[0]) if head is not None else math.nan
            expert = defers(policy, p, float(base_logits.softmax(-1).max()), rng)
            if i in force:
                expert = force[i] == "expert"
            logits = last_position(pair.expert, seq)[0] if expert else base_logits
            top2 = logits.topk(2).values
            steps.append(RefStep(int(logits.argmax()), "expert" if expert else "base", p, float(top2[0] - top2[1])))
            seq.append(steps[-1].token)
            if steps[-1].token in eos_ids:
                break
    return steps


def other(source: str) -> str:
    return "base" if source == "expert" else "expert"


def changes_token(step) -> bool:
    """The other model's top token is known at this step and differs from the one written."""
    topk = step.base_topk if step.source == "expert" else step.expert_topk
    return bool(topk) and topk[0][0] != step.token_id


def pick(steps, where: str) -> int:
    """first, last, or a middle position where the other model is known to write another token (else, where the
    expert's view is not recorded, the base-written one the base was least sure of)."""
    if where == "first":
        return 0
    if where == "last":
        return len(steps) - 1
    inner = range(1, len(steps) - 1)
    flips = [i for i in inner if changes_token(steps[i])]
    if flips:
        return min(flips, key=lambda i: abs(i - len(steps) / 2))
    unsure = [i for i in inner if steps[i].source == "base" and steps[i].expert_topk is None]
    assert unsure, "no middle position to branch at"
    return min(unsure, key=lambda i: steps[i].base_topk[0][2])


@pytest.fixture()
def dec(pair, head):
    return CoLLM(pair, head)


# ----------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_branch_matches_reference(engine_pair, where):
    kind, pair, head, prompts, n, chat = engine_case(engine_pair)
    if kind == "llamacpp" and where != "middle":
        pytest.skip("llama.cpp: one branch (tens of seconds of reference feeds); torch checks all three")
    dec = CoLLM(pair, head)
    first = dec.generate(prompts[1], threshold=ETA, max_new_tokens=n, chat=chat)
    try:
        pos = pick(first.steps, where)
        src, known = other(first.steps[pos].source), changes_token(first.steps[pos])
        old = first.token_ids
        br = dec.branch(first, pos, src, max_new_tokens=n)
    finally:
        first.release()
    br.release()     # engine rows go back now, not whenever the traces are collected
    assert br.steps[pos].source == src and br.forced_positions == [pos] and br.reused_steps == pos
    assert br.token_ids[:pos] == old[:pos]
    if where == "middle":
        assert br.token_ids[pos] != old[pos] or not known, "the forced model should write another token here"
        assert known or kind == "llamacpp", "torch records the expert's view: a position that changes is known"
    ref = reference_forced(pair, head, br.prompt_ids, Policy("colm", threshold=ETA), n, dec.eos_ids, {pos: src})
    compared = compare(kind, br, ref, ETA)
    check_rows(kind, [compared], [len(br.steps)])
    if kind == "llamacpp":
        assert compared > pos, "the comparison must reach past the branch point"


@pytest.mark.parametrize("policy", [Policy("base"), Policy("expert"), Policy("random", rate=0.4, seed=1),
                                    Policy("confidence", min_prob=0.3)], ids=lambda p: p.name)
def test_branch_continues_the_trace_s_own_policy(pair, head, dec, policy):
    first = dec.generate(TORCH_PROMPTS[0], policy=policy, max_new_tokens=N)
    pos = len(first.steps) // 2
    src = other(first.steps[pos].source)
    br = dec.branch(first, pos, src, max_new_tokens=N)
    assert br.policy == first.policy
    ref = reference_forced(pair, head, br.prompt_ids, policy, N, dec.eos_ids, {pos: src})
    check_rows("torch", [compare("torch", br, ref)], [len(br.steps)])


def test_branching_twice(pair, head, dec):
    first = dec.generate(TORCH_PROMPTS[0], threshold=ETA, max_new_tokens=N)
    a = pick(first.steps, "middle") - 4
    one = dec.branch(first, a, other(first.steps[a].source), max_new_tokens=N)
    b = a + 6
    two = dec.branch(one, b, other(one.steps[b].source), max_new_tokens=N)
    force = {a: one.steps[a].source, b: two.steps[b].source}
    assert two.forced_positions == [a, b] and two.steps[a].forced and two.steps[b].forced
    ref = reference_forced(pair, head, two.prompt_ids, Policy("colm", threshold=ETA), N, dec.eos_ids, force)
    check_rows("torch", [compare("torch", two, ref)], [len(two.steps)])
    # Back before the first branch point: the later forced choice is gone with the text it was made in.
    three = dec.branch(two, a - 2, "expert", max_new_tokens=N)
    assert three.forced_positions == [a - 2]
    ref = reference_forced(pair, head, three.prompt_ids, Policy("colm", threshold=ETA), N, dec.eos_ids,
                           {a - 2: "expert"})
    check_rows("torch", [compare("torch", three, ref)], [len(three.steps)])


def test_branch_stops_by_the_one_end_rule(pair, head):
    """The branch ends at an end token (here a token only its continuation writes, made an end token)."""
    dec = CoLLM(pair, head)
    first = dec.generate(TORCH_PROMPTS[2], threshold=ETA, max_new_tokens=N)
    pos = pick(first.steps, "middle")
    br = dec.branch(first, pos, other(first.steps[pos].source), max_new_tokens=N)
    before = set(first.token_ids) | set(br.token_ids[:pos + 1])
    end = next((t for t in br.token_ids[pos + 1:] if t not in before), None)
    assert end is not None, "the continuation writes no token of its own"
    dec2 = CoLLM(pair, head)
    dec2.eos_ids = [end]
    first2 = dec2.generate(TORCH_PROMPTS[2], threshold=ETA, max_new_tokens=N)
    assert first2.token_ids[:pos + 1] == first.token_ids[:pos + 1]
    br2 = dec2.branch(first2, pos, other(first2.steps[pos].source), max_new_tokens=N)
    cut = br.token_ids.index(end)
    assert br2.token_ids == br.token_ids[:cut + 1] and br2.stop_reason == "eos"


def test_branch_streams_the_growing_trace(dec):
    first = dec.generate(TORCH_PROMPTS[1], threshold=ETA, max_new_tokens=12)
    seen = [len(tr.steps) for tr in dec.branch_stream(first, 3, "expert", max_new_tokens=12)]
    assert seen[0] == 4 and seen[-1] == 12 and seen == sorted(seen)


# ----------------------------------------------------------------------------------------------- re-decode
def test_redecode_at_the_same_threshold_keeps_the_forced_position(dec):
    """The forced step disagrees with the threshold by construction; the first-flip search must skip it."""
    first = dec.generate(TORCH_PROMPTS[0], threshold=ETA, max_new_tokens=N)
    pos = pick(first.steps, "middle")
    br = dec.branch(first, pos, other(first.steps[pos].source), max_new_tokens=N)
    re = dec.redecode(br, ETA, max_new_tokens=N)
    assert re.reused_steps == len(br.steps) and re.token_ids == br.token_ids
    assert re.forced_positions == [pos]


def flip_around(steps, pos: int, after: bool) -> tuple[float, int]:
    """A threshold whose first flipped (unforced) decision lies after ``pos`` (or before it) -> (η, first flip)."""
    ps = sorted({s.p_defer for s in steps})
    for lo, hi in zip(ps, ps[1:]):
        new = (lo + hi) / 2
        t = next((i for i, s in enumerate(steps) if not s.forced and (s.p_defer > new) != (s.source == "expert")),
                 len(steps))
        if (pos < t < len(steps)) if after else (t < pos):
            return new, t
    pytest.skip("no threshold flips a decision on that side of the forced position")


@pytest.mark.parametrize("after", [True, False], ids=["flip-after", "flip-before"])
def test_redecode_keeps_forced_before_its_first_flip_and_drops_them_after(pair, head, dec, after):
    first = dec.generate(TORCH_PROMPTS[0], threshold=ETA, max_new_tokens=N)
    pos = pick(first.steps, "middle")
    src = other(first.steps[pos].source)
    br = dec.branch(first, pos, src, max_new_tokens=N)
    new, t = flip_around(br.steps, pos, after)
    re = dec.redecode(br, new, max_new_tokens=N)
    assert re.reused_steps == t
    force = {pos: src} if after else {}
    assert re.forced_positions == sorted(force)
    ref = reference_forced(pair, head, re.prompt_ids, Policy("colm", threshold=new), N, dec.eos_ids, force)
    check_rows("torch", [compare("torch", re, ref)], [len(re.steps)])


# ----------------------------------------------------------------------------------------------- records, errors
def test_forced_positions_in_the_json(dec):
    first = dec.generate(TORCH_PROMPTS[1], threshold=ETA, max_new_tokens=10)
    br = dec.branch(first, 4, "expert", max_new_tokens=10)
    d = json.loads(json.dumps(br.to_dict()))
    assert d["forced_positions"] == [4]
    assert [s.get("forced", False) for s in d["steps"]] == [i == 4 for i in range(len(br.steps))]
    assert d["steps"][4]["source"] == "expert" and d["steps"][4]["expert_topk"]
    assert "forced" not in first.to_dict(full=False)["steps"][0]


@pytest.mark.parametrize("position,source,msg", [
    (-1, "expert", "position"), (10, "expert", "position"), (2.0, "expert", "position"), (True, "base", "position"),
    (3, "Expert", "source"), (3, None, "source"),
])
def test_bad_position_or_source_is_refused_before_anything_is_cropped(dec, position, source, msg):
    first = dec.generate(TORCH_PROMPTS[1], threshold=ETA, max_new_tokens=10)
    with pytest.raises(ColmError, match=msg):
        dec.branch_stream(first, position, source, max_new_tokens=10)
    assert first.state is not None and dec.branch(first, 3, "expert", max_new_tokens=10).steps[3].forced


def test_position_past_max_new_tokens_is_refused(dec):
    first = dec.generate(TORCH_PROMPTS[1], threshold=ETA, max_new_tokens=10)
    with pytest.raises(ColmError, match="max_new_tokens"):
        dec.branch(first, 8, "expert", max_new_tokens=5)


@pytest.mark.parametrize("how", ["released", "branched", "redecoded", "batch"])
def test_traces_without_state_cannot_be_branched(dec, how):
    tr = dec.generate(TORCH_PROMPTS[1], threshold=ETA, max_new_tokens=8)
    if how == "released":
        tr.release()
    elif how == "branched":
        dec.branch(tr, 2, "expert", max_new_tokens=8)
    elif how == "redecoded":
        dec.redecode(tr, 0.3, max_new_tokens=8)
    else:
        tr = dec.generate_batch(TORCH_PROMPTS[:2], Policy("colm", threshold=ETA), max_new_tokens=8)[0]
    with pytest.raises(ColmError, match="cannot be branched"):
        dec.branch(tr, 2, "expert", max_new_tokens=8)


# ----------------------------------------------------------------------------------------------- CLI
def cli(pair_dirs, *args):
    return subprocess.run([sys.executable, "-m", "colm", "generate", "What is 2+2?", "--base",
                           str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"), "--dtype", "fp32", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_force_equals_the_library_call(pair_dirs, pair):
    r = cli(pair_dirs, "--policy", "base", "--max-new-tokens", "10", "--json", "--force", "6=expert",
            "--force", "2=expert")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    dec = CoLLM(pair)
    want = dec.generate("What is 2+2?", policy=Policy("base"), max_new_tokens=10)
    want = dec.branch(dec.branch(want, 2, "expert", max_new_tokens=10), 6, "expert", max_new_tokens=10)
    assert [s["token_id"] for s in d["steps"]] == want.token_ids
    assert d["forced_positions"] == [2, 6] and [s["source"] for s in d["steps"]][2] == "expert"


@pytest.mark.parametrize("value,msg", [("x=expert", "--force"), ("3=gpt", "--force"), ("3", "--force"),
                                       ("-1=base", "--force"), ("50=base", "position")])
def test_cli_bad_force(pair_dirs, value, msg):
    r = cli(pair_dirs, "--policy", "base", "--max-new-tokens", "10", "--force", value)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
