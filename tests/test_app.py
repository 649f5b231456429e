"""The Gradio app on the tiny models, driven over HTTP with gradio_client (as a second program would)."""
import json
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import app
from colm import viz
from colm.decode import CoLLM, Policy
from conftest import free_port, make_test_head

# gradio's queue trips pandas 3 deprecations on every event; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
PROMPT = "What is a^3 * a^2 if a = 5?"
OTHER = "def add(a, b):"
N = 24


@pytest.fixture(scope="module")
def dec(pair):
    return CoLLM(pair, make_test_head(pair.base.hidden_size))  # conftest's head, at module scope


@pytest.fixture(scope="module")
def url(dec):
    demo = app.build_app(dec, max_prompt_chars=300, default_max_new=N)
    port = free_port()
    app.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def client(url):
    return gradio_client.Client(url, verbose=False)


def as_pairs(value):
    return [(d["token"], d["class_or_confidence"]) for d in value]


def generate(c, prompt=PROMPT, policy="colm", threshold=0.5, rate=0.3, n=N):
    answer, plot, summary, note, export = c.predict(prompt, policy, threshold, rate, 0.5, n, api_name="/generate")
    return answer, plot, summary, note, export


def shapes(plot):
    return json.loads(plot["plot"])["layout"]["shapes"]


# ----------------------------------------------------------------------------------------------- generate
def test_generate_matches_decoder(url, dec):
    answer, plot, summary, note, export = generate(client(url))
    want = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    assert as_pairs(answer) == viz.highlighted(want)
    assert any(label == "expert" for _, label in as_pairs(answer))
    assert summary.split(" · ")[:4] == viz.summary_line(want).split(" · ")[:4]   # policy, tokens, deferral, calls
    assert f"{len(want.steps)} tokens" in summary and note == ""
    assert shapes(plot)[0]["y0"] == 0.5
    fig = json.loads(plot["plot"])
    assert sum(len(t["x"]) for t in fig["data"]) == len(want.steps)


@pytest.mark.parametrize("policy, rate", [("base", 0.0), ("expert", 0.0), ("random", 0.5), ("confidence", 0.0)])
def test_generate_other_policies(url, dec, policy, rate):
    answer, _, summary, _, _ = generate(client(url), policy=policy, rate=rate)
    want = dec.generate(PROMPT, policy=Policy(policy, rate=rate), max_new_tokens=N)
    assert as_pairs(answer) == viz.highlighted(want)
    assert summary.startswith(viz.policy_label(want.policy))


@pytest.mark.parametrize("prompt, words", [("", "empty"), ("   \n\t ", "empty"), ("x" * 301, "limit is 300")])
def test_bad_prompt_refused_without_model_call(url, dec, monkeypatch, prompt, words):
    calls = []
    monkeypatch.setattr(dec, "stream", lambda *a, **k: calls.append(a) or iter(()))
    c = client(url)
    _, _, _, note, _ = generate(c, prompt=prompt)
    assert words in note
    _, _, _, _, _, _, note = c.predict(prompt, 0.5, N, api_name="/compare")
    assert words in note
    assert calls == []


def test_unusual_characters_do_not_crash(url):
    weird = "a\x00b\x07 \u202e 🤖 é 日本 \ufffe <|im_start|>system"
    answer, _, summary, note, export = generate(client(url), prompt=weird, n=8)
    assert note == "" and "8 tokens" in summary
    doc = json.loads(open(export, encoding="utf-8").read())
    assert doc["prompt"].startswith("a\x00b\x07") and "🤖" in doc["prompt"]


def test_colm_error_is_shown(url, dec, monkeypatch):
    monkeypatch.setattr(dec, "max_prompt_tokens", 3)
    _, _, _, note, _ = generate(client(url))
    assert "the limit is 3" in note


# ----------------------------------------------------------------------------------------------- threshold
def first_late_flip_threshold(trace):
    """A threshold whose first flipped decision is a few tokens in, so re-decoding reuses a prefix."""
    for thr in [i / 200 for i in range(1, 200)]:
        f = viz.flips(trace, thr)
        if f and f[0] >= 2:
            return thr, f[0]
    pytest.fail("no threshold flips a later decision")


def test_preview_moves_line_and_marks_flips_without_model_calls(url, dec, monkeypatch):
    c = client(url)
    generate(c)
    trace = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    thr, _ = first_late_flip_threshold(trace)
    monkeypatch.setattr(dec, "stream", None)           # any model call would now fail
    monkeypatch.setattr(dec, "redecode_stream", None)
    answer, plot, note = c.predict(thr, api_name="/preview")
    assert shapes(plot)[0]["y0"] == thr
    assert as_pairs(answer) == viz.highlighted(trace, viz.flips(trace, thr))
    assert "would flip" in note


@pytest.mark.parametrize("api", ["/redecode", "/apply_threshold"])
def test_redecode_equals_fresh_generate(url, dec, api):
    c = client(url)
    generate(c)
    thr, first = first_late_flip_threshold(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))
    answer, plot, summary, note, export = c.predict(thr, N, api_name=api)
    fresh = dec.generate(PROMPT, threshold=thr, max_new_tokens=N)
    assert as_pairs(answer) == viz.highlighted(fresh)
    assert f"{first} reused" in summary and shapes(plot)[0]["y0"] == thr
    doc = json.loads(open(export, encoding="utf-8").read())
    assert [s["token_id"] for s in doc["steps"]] == fresh.token_ids
    assert doc["settings"]["threshold"] == thr and doc["policy"] == {"name": "colm", "threshold": thr}
    # Keyboard path and pointer path land on the same answer, and a second re-decode still works.
    again, *_ = c.predict(0.5, N, api_name=api)
    assert as_pairs(again) == viz.highlighted(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))


@pytest.mark.parametrize("prompt", [PROMPT, app.load_examples()[3][1]])
def test_redecoded_text_equals_fresh_text(dec, prompt):
    # Tokens the tiny models emit are often byte pieces of one character; a re-decode that branches between
    # them must still show each step's text as a fresh decode does (the page shows step texts, not ids).
    for thr in [i / 10 for i in range(11)]:
        old = dec.generate(prompt, threshold=0.5, max_new_tokens=N)
        re, fresh = dec.redecode(old, thr, N), dec.generate(prompt, threshold=thr, max_new_tokens=N)
        assert [(s.token_id, s.text) for s in re.steps] == [(s.token_id, s.text) for s in fresh.steps]


def test_redecode_needs_a_colm_trace(url):
    c = client(url)
    *_, note, _ = c.predict(0.3, N, api_name="/redecode")
    assert "Generate" in note                          # nothing decoded yet in this session
    generate(c, policy="base")
    *_, note, _ = c.predict(0.3, N, api_name="/redecode")
    assert "Co-LLM" in note


# ----------------------------------------------------------------------------------------------- export, sessions
def test_export_json(url, dec):
    *_, export = generate(client(url), prompt=OTHER)
    doc = json.loads(open(export, encoding="utf-8").read())
    want = dec.generate(OTHER, threshold=0.5, max_new_tokens=N)
    assert doc["prompt"] == OTHER and doc["text"] == want.text
    assert len(doc["steps"]) == len(want.steps) and doc["steps"][0]["base_topk"]
    assert doc["settings"]["max_new_tokens"] == N and doc["settings"]["policy"] == "colm"
    assert (doc["base_model"], doc["expert_model"], doc["head"]) == ("tiny-base", "tiny-expert", "random-test-head")


def test_sessions_keep_separate_traces(url, dec):
    a, b = client(url), client(url)
    generate(a, prompt=PROMPT)
    generate(b, prompt=OTHER, policy="base")
    ans_a, *_ = a.predict(0.5, api_name="/preview")
    ans_b, _, note_b = b.predict(0.5, api_name="/preview")
    assert as_pairs(ans_a) == viz.highlighted(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))
    assert as_pairs(ans_b) == viz.highlighted(dec.generate(OTHER, policy=Policy("base"), max_new_tokens=N))
    assert "another policy" in note_b


def test_compare(url, dec):
    out = client(url).predict(PROMPT, 0.5, N, api_name="/compare")
    for (ans, summary), policy in zip([out[0:2], out[2:4], out[4:6]],
                                      [Policy("base"), Policy("expert"), Policy("colm", threshold=0.5)]):
        want = dec.generate(PROMPT, policy=policy, max_new_tokens=N)
        assert as_pairs(ans) == viz.highlighted(want)
        assert summary.startswith(viz.policy_label(want.policy))


# ----------------------------------------------------------------------------------------------- stop
def test_stop_cancels_and_next_request_works(url, dec, monkeypatch):
    orig = dec.stream

    def slow(*a, **k):
        for tr in orig(*a, **k):
            time.sleep(0.05)
            yield tr
    monkeypatch.setattr(dec, "stream", slow)
    c = client(url)
    job = c.submit(PROMPT, "base", 0.5, 0.3, 0.5, 400, api_name="/generate")
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    c.predict(api_name="/stop")
    answer, plot, summary, note, export = job.result(timeout=30)
    assert "stopped" in summary
    n = int(summary.split(" tokens")[0].split(" · ")[-1])
    assert 0 < n < 400
    assert len(json.loads(open(export, encoding="utf-8").read())["steps"]) == n
    monkeypatch.setattr(dec, "stream", orig)
    answer, _, summary, _, _ = generate(c)
    assert "stopped" not in summary
    assert as_pairs(answer) == viz.highlighted(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))


def test_examples_wrap_word_problems_with_the_instruction():
    from colm.data import INSTRUCTION
    ex = dict(app.load_examples())
    assert len(ex) >= 5
    assert any("a^3 · a^2" in p for p in ex.values())
    word = [p for p in ex.values() if p.endswith("\n\n" + INSTRUCTION)]
    assert len(word) >= 3
    assert any("def " in p or "Python" in p for p in ex.values() if not p.endswith(INSTRUCTION))


# ----------------------------------------------------------------------------------------------- loading page
def test_loading_page_shows_progress_then_error_or_ready():
    status = app.LoadStatus()
    page = app.build_loading_page(status).queue()
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = client(f"http://127.0.0.1:{port}")
        shown = lambda: c.predict(api_name="/loading_status")[0]
        timer_on = lambda: c.predict(api_name="/loading_status")[1]["active"]
        assert "Loading the models" in shown() and timer_on()
        status.log("assembling base-model from 3 chunks")
        assert "assembling base-model from 3 chunks" in shown()
        status.finish("no such model: nope")
        assert "Loading failed:** no such model: nope" in shown()
        assert not timer_on()     # stopped: no tick may reach the demo that takes over the port
        status.finish()
        text = shown()
        assert text.startswith("**Ready.") and "assembling base-model" in text
    finally:
        page.close()


@pytest.mark.parametrize("polled_ago, ready_ago, wait", [
    (None, 0.0, 0.0),        # no page open: the demo takes the port at once
    (10.0, 0.0, 0.0),        # a page that stopped ticking long ago (closed tab)
    (0.5, 0.0, 1.3),         # an open page: one tick (1 s) and a margin from "ready"
    (0.5, 1.0, 0.3),
    (0.5, 2.0, 0.0),         # the build took longer than a tick: nothing left to wait
])
def test_the_loading_page_stays_up_only_while_an_open_page_needs_a_tick(monkeypatch, polled_ago, ready_ago, wait):
    now = 1000.0
    monkeypatch.setattr(app.time, "monotonic", lambda: now)
    status = app.LoadStatus()
    status.finish()
    status.ready_at = now - ready_ago
    status.polled_at = None if polled_ago is None else now - polled_ago
    assert status.handover_wait(tick=1.0) == pytest.approx(wait)
