"""Course correction (colm.backtrack): a detection crops the answer back to the faulty line's first token, the expert
writes that line, the policy continues; the result equals a decode from scratch with those positions forced to the
expert (test_branch's naive reference, no caches).

The tiny models write no newlines, so the decode tests end lines at a character their answers do contain and detect
with a stand-in detector that names a position; the arithmetic detector is tested on text.
"""
from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from colm import backtrack as bt
from colm.backtrack import Backtrack, backtrack_stream, generate_backtracking
from colm.decode import CoLLM
from colm.models import ColmError
from colm.policy import Policy
from test_branch import reference_forced
from test_reference import TORCH_PROMPTS, check_rows, compare

ETA, N = 0.5, 30
PROMPT = TORCH_PROMPTS[0]
POLICIES = [Policy("colm", threshold=ETA), Policy("base"), Policy("random", rate=0.4, seed=1)]


@pytest.fixture()
def dec(pair, head):
    return CoLLM(pair, head)


def char_of(trace, pos: int) -> int:
    return sum(len(s.text) for s in trace.steps[:pos])


def line_break_after(text: str, char: int) -> str:
    """The tests' line break: the character the answer repeats most after ``char`` (letters and digits first), so
    a line completes after the detected position."""
    rest = text[char + 1:]
    counts = Counter(c for c in rest if c.isascii() and c.isalnum()) or Counter(c for c in rest if not c.isspace())
    return counts.most_common(1)[0][0]


def plain_and_config(dec, policy, monkeypatch, detector_for, **kw):
    """A plain decode, the position K the test names (from 8 on, the first that starts a character: a token after
    a byte piece with no text of its own), and a Backtrack whose only detector is ``detector_for(K's character)``."""
    plain = dec.generate(PROMPT, policy=policy, max_new_tokens=N)
    plain.release()
    k = next(i for i in range(8, N - 8) if plain.steps[i - 1].text and plain.steps[i].text)
    c = char_of(plain, k)
    monkeypatch.setitem(bt.DETECTORS, "test", detector_for(c))
    return plain, k, Backtrack(detectors=("test",), line_break=line_break_after(plain.text, c), **kw)


def once_at(char: int):
    """Says "the line starting at ``char`` is wrong" while that line is unchecked."""
    return lambda text, since: (char, "a test's detection") if since <= char < len(text) else None


def always_at(char: int):
    """Says it every time, whatever was checked: the line must still be rolled back only once."""
    return lambda text, since: (char, "a test's detection") if char < len(text) else None


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_a_detection_rolls_back_to_its_position_and_the_expert_rewrites_the_line(dec, pair, head, policy,
                                                                                 monkeypatch):
    plain, K, cfg = plain_and_config(dec, policy, monkeypatch, once_at)
    tr = generate_backtracking(dec, PROMPT, policy, N, cfg)
    tr.release()
    assert [r["position"] for r in tr.rollbacks] == [K]               # exactly the named position
    assert tr.token_ids[:K] == plain.token_ids[:K]
    forced = tr.forced_positions
    assert forced == list(range(K, K + len(forced))) and all(tr.steps[i].source == "expert" for i in forced)
    line = "".join(s.text for s in tr.steps[K:forced[-1] + 1])
    # the expert's line ends at its first line break (or runs to the end of the answer)
    assert cfg.line_break not in "".join(s.text for s in tr.steps[K:forced[-1]])
    assert cfg.line_break in line or forced[-1] == len(tr.steps) - 1
    rb = tr.rollbacks[0]
    assert rb["detector"] == "test" and rb["discarded"] and plain.text[char_of(plain, K):].startswith(rb["discarded"])
    assert line.startswith(rb["replacement"]) and rb["replacement"]
    # the rest is the policy's own decode from there: as from scratch with the expert forced on that line
    ref = reference_forced(pair, head, tr.prompt_ids, policy, N, dec.eos_ids, {i: "expert" for i in forced})
    check_rows("torch", [compare("torch", tr, ref, ETA if policy.name == "colm" else None)], [len(tr.steps)])
    assert tr.policy == {**policy.describe(), "backtrack": cfg.describe()}
    assert tr.reused_steps == 0 and tr.decode_seconds > 0      # one answer: nothing reused, its whole time


def test_a_line_is_rolled_back_once_and_retries_are_bounded(dec, monkeypatch):
    policy = POLICIES[0]
    _, K, cfg = plain_and_config(dec, policy, monkeypatch, always_at, max_retries=3)
    assert [r["position"] for r in generate_backtracking(dec, PROMPT, policy, N, cfg).rollbacks] == [K]
    plain, K, cfg = plain_and_config(dec, policy, monkeypatch, always_at, max_retries=0)
    none = generate_backtracking(dec, PROMPT, policy, N, cfg)
    assert none.rollbacks == [] and none.token_ids == plain.token_ids and none.forced_positions == []


def test_without_a_detection_the_answer_is_the_plain_one(dec):
    plain = dec.generate(PROMPT, threshold=ETA, max_new_tokens=N)
    tr = generate_backtracking(dec, PROMPT, Policy("colm", threshold=ETA), N)     # arithmetic: nothing to check
    assert tr.token_ids == plain.token_ids and tr.rollbacks == [] and tr.expert_fed == plain.expert_fed


def test_the_export_keeps_the_history_and_the_expert_work_of_dropped_text(dec, monkeypatch):
    policy = POLICIES[0]
    _, K, cfg = plain_and_config(dec, policy, monkeypatch, once_at)
    tr = generate_backtracking(dec, PROMPT, policy, N, cfg)
    d = json.loads(json.dumps(tr.to_dict()))
    assert d["rollbacks"] == tr.rollbacks and set(d["rollbacks"][0]) == {
        "position", "detector", "reason", "discarded", "replacement", "expert_written"}
    assert d["policy"]["backtrack"] == {"max_retries": 2, "detectors": ["test"]}
    assert tr.expert_fed >= tr.expert_calls > 0      # every call reads at least its token; dropped work included


def test_stop_ends_the_answer_without_more_rollbacks(dec, monkeypatch):
    policy = POLICIES[0]
    _, K, cfg = plain_and_config(dec, policy, monkeypatch, once_at)
    stop = threading.Event()
    last = None
    for last in backtrack_stream(dec, PROMPT, policy, N, cfg, stop=stop):
        if len(last.steps) == K - 2:
            stop.set()
    assert last.stop_reason == "cancelled" and last.rollbacks == [] and len(last.steps) == K - 2


@pytest.mark.parametrize("text, since, want", [
    ("We buy 12 * 7 = 86 apples.\n", 0, (0, "12 * 7 = 86, but it is 84")),
    ("Fine: 2 + 2 = 4\nThen \\(3 \\times 4 = 13\\)\n", 0, (16, "3 * 4 = 13, but it is 12")),
    ("We buy 12 * 7 = 86 apples.", 0, None),                       # the line is not complete yet
    ("We buy 12 * 7 = 86 apples.\nOK 1 + 1 = 2\n", 27, None),      # only lines from ``since`` on
    ("```\nx = 2 * 3 = 7\n```\n", 0, None),                       # code is left alone
])
def test_the_arithmetic_detector_names_the_faulty_line(text, since, want):
    assert bt.arithmetic(text, since) == want


@pytest.mark.parametrize("kw, words", [({"detectors": ("nope",)}, "unknown detector"), ({"detectors": ()}, "unknown"),
                                       ({"max_retries": -1}, "max_retries"), ({"line_break": ""}, "line_break")])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(ColmError, match=words):
        Backtrack(**kw)


def test_a_backtracking_run_decodes_again_only_the_answers_with_a_wrong_line(dec, monkeypatch, tmp_path):
    """colm.runs.run_backtracking: an answer whose completed lines pass every detector keeps the plain record; the
    others are decoded again with course correction (as generate_backtracking decodes them); a rerun resumes."""
    from colm.evaluate import evaluate
    from colm.runs import run_backtracking, run_policy
    from test_evaluate import examples
    exs, policy = examples(4), POLICIES[0]
    plain = run_policy(dec, exs, policy, tmp_path / "plain.jsonl", batch_size=1, max_new_tokens=N, progress=False)
    target = exs[1].index
    head = plain[target]["text"][:6]
    monkeypatch.setitem(bt.DETECTORS, "test", lambda text, since: (2, "test") if since <= 2 < len(text)
                        and text.startswith(head) else None)
    cfg = Backtrack(detectors=("test",), line_break=line_break_after(plain[target]["text"], 2))
    recs = run_backtracking(dec, exs, policy, plain, tmp_path / "bt.jsonl", cfg, N)
    assert [recs[e.index]["backtrack"] for e in exs] == ["none fired", "decoded", "none fired", "none fired"]
    assert all(recs[e.index]["ids"] == plain[e.index]["ids"] for e in exs if e.index != target)
    from colm.data import messages
    want = generate_backtracking(dec, messages(exs[1].question), policy, N, cfg)
    assert recs[target]["ids"] == want.token_ids and recs[target]["rollbacks"] == want.rollbacks != []
    monkeypatch.setattr("colm.backtrack.backtrack_stream", None)          # a rerun decodes nothing
    assert run_backtracking(dec, exs, policy, plain, tmp_path / "bt.jsonl", cfg, N) == recs
    monkeypatch.undo()
    monkeypatch.setitem(bt.DETECTORS, "test", lambda text, since: (2, "test") if since <= 2 < len(text)
                        and text.startswith(head) else None)
    res = evaluate(dec, exs, tmp_path / "ev", thresholds=[ETA], batch_size=1, max_new_tokens=N, baselines=False,
                   backtrack=cfg)
    b = res["backtrack"]
    assert b["n"] == 4 and b["fired"] == 1 and b["rollbacks"] >= 1 and b["fixed"] + b["broke"] <= 1
    assert b["expert_fed"][1] >= b["expert_fed"][0] and "paired_vs_colm" in b
    assert "backtrack_curve" not in res                       # one threshold: the chosen point is the curve
    # A sweep: every η with correction too, each from its own plain run; the chosen point's file is shared.
    sweep = evaluate(dec, exs, tmp_path / "ev", thresholds=[1.0, ETA], batch_size=1, max_new_tokens=N,
                     baselines=False, backtrack=cfg)
    curve = sweep["backtrack_curve"]
    assert [p["threshold"] for p in curve] == [1.0, ETA] and curve[1] == b
    assert curve[0]["expert_written"][0] == 0 and all(p["n"] == 4 for p in curve)


def test_a_corrected_answer_can_be_branched_and_re_decoded(dec, monkeypatch):
    """The trace's policy carries the backtrack settings; a what-if or a threshold re-decode of it still works and
    keeps the rollbacks that lie in the text it keeps."""
    policy = POLICIES[0]
    _, K, cfg = plain_and_config(dec, policy, monkeypatch, once_at)
    tr = generate_backtracking(dec, PROMPT, policy, N, cfg)
    last = len(tr.steps) - 1
    br = dec.branch(tr, last, "base" if tr.steps[last].source == "expert" else "expert", max_new_tokens=N)
    assert [r["position"] for r in br.rollbacks] == [K] and br.steps[last].forced
    again = dec.redecode(br, 0.999, max_new_tokens=N)      # first flip before K: the correction goes with its text
    assert all(r["position"] < again.reused_steps for r in again.rollbacks)
    br.release()
    again.release()
