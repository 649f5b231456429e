"""colm.signals on hand-made steps (every number checkable by hand) and on one real decode of the tiny pair."""
from __future__ import annotations

import math

import pytest

from colm.decode import CoLLM
from colm.signals import CUTOFFS, KINDS, Flag, answer_score, flags, signals, step_signals
from colm.trace import Step, Trace


def tk(*pairs):
    """Top-k records from (id, prob) pairs."""
    return [(i, f"t{i}", p) for i, p in pairs]


def step(pos=0, token=5, source="base", p=0.1, base=((5, 0.9), (6, 0.05)), expert=None) -> Step:
    return Step(pos, token, f"t{token}", source, p, tk(*base), tk(*expert) if expert else None)


def trace(steps, policy=None) -> Trace:
    return Trace("q", [1, 2], policy or {"name": "colm", "threshold": 0.2}, list(steps))


# ----------------------------------------------------------------------------------------------- step signals
def test_writer_signals_read_the_writer_s_own_top_k():
    s = step(source="base", base=((5, 0.4), (6, 0.35), (7, 0.1)))
    sig = step_signals(s)
    assert sig["unsure"] == pytest.approx(0.6) and sig["margin"] == pytest.approx(0.95)
    e = step(source="expert", token=6, base=((5, 0.4), (6, 0.35)), expert=((6, 0.8), (5, 0.1)))
    sig = step_signals(e)
    assert sig["unsure"] == pytest.approx(0.2) and sig["margin"] == pytest.approx(0.3)


def test_a_forced_token_below_the_writer_s_top_is_unsure():
    """A branch can make a model write a token that is not its first choice: P of the token written counts."""
    s = step(source="expert", token=5, expert=((6, 0.7), (5, 0.2)))
    assert step_signals(s)["unsure"] == pytest.approx(0.8)


@pytest.mark.parametrize("source,token,base,expert,want", [
    ("base", 5, ((5, 0.6), (6, 0.3)), ((6, 0.7), (5, 0.2)), 0.5),     # the expert prefers 6 by 0.5
    ("base", 5, ((5, 0.6), (6, 0.3)), ((5, 0.7), (6, 0.2)), 0.0),     # it agrees
    ("base", 5, ((5, 0.6), (6, 0.3)), ((6, 0.7), (7, 0.2)), 0.7),     # the written token is outside its top-k
    ("expert", 6, ((5, 0.9), (6, 0.05)), ((6, 0.5), (5, 0.4)), 0.85),  # the base prefers 5
])
def test_disagreement_is_the_other_model_s_preference_for_another_token(source, token, base, expert, want):
    assert step_signals(step(token=token, source=source, base=base, expert=expert))["disagree"] == pytest.approx(want)


def test_unknown_inputs_give_nan():
    sig = step_signals(step(expert=None), threshold=None)
    assert math.isnan(sig["disagree"]) and math.isnan(sig["near"])
    assert math.isnan(step_signals(step(p=float("nan")), threshold=0.2)["near"])


@pytest.mark.parametrize("p,want", [(0.2, 1.0), (0.5, 0.25), (0.05, 0.2105)])
def test_near_the_threshold_in_odds(p, want):
    # exp(-|logit p - logit 0.2|): p = 0.5 is 4x the odds of 0.2, p = 0.05 is 1/4.75 of them
    assert step_signals(step(p=p), threshold=0.2)["near"] == pytest.approx(want, abs=1e-3)


# ----------------------------------------------------------------------------------------------- flags
def test_flags_at_the_cut_offs_with_reasons():
    steps = [step(0), step(1, base=((5, 0.45), (6, 0.4))),                   # unsure and margin
             step(2, expert=((9, 0.8), (5, 0.1))),                           # the expert would write 9
             step(3, p=0.21)]                                                # p_defer at η
    got = flags(trace(steps))
    assert [(f.position, f.kind) for f in got] == [(1, "unsure"), (1, "margin"), (2, "disagree"), (3, "near")]
    assert all(isinstance(f, Flag) and 0 <= f.score <= 1 and f.reason for f in got)
    assert "expert would have written 't9'" in got[2].reason and "45%" in got[0].reason


@pytest.mark.parametrize("kind", KINDS)
def test_a_flag_appears_exactly_at_its_cut_off(kind):
    sig = signals(trace([step(0, base=((5, 0.45), (6, 0.4)), expert=((9, 0.8), (5, 0.1)), p=0.21)]))[0]
    assert sig[kind] >= CUTOFFS[kind]
    assert flags(trace([step(0, base=((5, 0.45), (6, 0.4)), expert=((9, 0.8), (5, 0.1)), p=0.21)]),
                 kinds=[kind], cutoffs={kind: sig[kind]})
    assert not flags(trace([step(0, base=((5, 0.45), (6, 0.4)), expert=((9, 0.8), (5, 0.1)), p=0.21)]),
                     kinds=[kind], cutoffs={kind: sig[kind] + 1e-9})


def test_no_near_flags_without_a_threshold_policy():
    tr = trace([step(0, p=0.2)], policy={"name": "random", "rate": 0.3, "seed": 0})
    assert not [f for f in flags(tr) if f.kind == "near"]
    assert [f.kind for f in flags(tr, threshold=0.2)] == ["near"]


# ----------------------------------------------------------------------------------------------- answer score
def test_answer_score_rises_with_unsure_tokens_and_ignores_appended_confident_ones():
    sure = [step(i) for i in range(10)]
    shaky = sure[:5] + [step(i, base=((5, 0.3), (6, 0.25))) for i in range(5, 10)]
    assert answer_score(trace(shaky)) > answer_score(trace(sure))
    longer = shaky + [step(i) for i in range(10, 200)]
    assert answer_score(trace(longer)) == pytest.approx(answer_score(trace(shaky)))


def test_answer_score_of_an_empty_answer_is_nan():
    assert math.isnan(answer_score(trace([])))


def test_signals_and_flags_on_a_real_decode(pair, head):
    tr = CoLLM(pair, head).generate("What is a^3 * a^2 if a = 5?", threshold=0.5, max_new_tokens=24)
    sig = signals(tr)
    assert len(sig) == len(tr.steps)
    for s, v in zip(tr.steps, sig):
        assert 0 <= v["unsure"] <= 1 and 0 <= v["margin"] <= 1 and 0 < v["near"] <= 1
        assert math.isnan(v["disagree"]) == (s.expert_topk is None if s.source == "base" else False)
    got = flags(tr)
    assert got, "a random tiny model is unsure somewhere"
    assert [f.position for f in got] == sorted(f.position for f in got)
    assert 0 <= answer_score(tr) <= 1
