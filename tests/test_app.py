"""The Gradio app on the tiny models, driven over HTTP with gradio_client (as a second program would)."""
import html
import json
import os
import re
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import app
from colm import page, viz
from colm.decode import CoLLM, Policy
from conftest import free_port, make_test_head, slowed

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


def shown(view: str):
    """(position, text, writer) of every token the view shows."""
    return page.tokens_of(view)


def plain(html_text: str) -> str:
    """The words of an HTML panel, tags dropped."""
    return html.unescape(re.sub(r"<[^>]+>", "", html_text))


def want(trace, flips=()):
    return [(s.position, viz.display_token(s.text), "flip" if s.position in flips else s.source)
            for s in trace.steps]


def generate(c, prompt=PROMPT, policy="colm", threshold=0.5, rate=0.3, n=N):
    view, changes, summary, note, export = c.predict(prompt, policy, threshold, rate, 0.5, n, api_name="/generate")
    return view, changes, summary, note, export


def lines(view):
    """{"applied" | "pending": threshold} for the η lines the view draws."""
    return {m[0]: float(m[1]) / 100 for m in re.findall(r'colm-eta colm-(\w+)" style="bottom:([\d.]+)%', view)}


# ----------------------------------------------------------------------------------------------- generate
def test_generate_matches_decoder(url, dec):
    view, changes, summary, note, export = generate(client(url))
    trace = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    assert shown(view) == want(trace)
    assert any(kind == "expert" for *_, kind in shown(view)) and any(kind == "base" for *_, kind in shown(view))
    assert summary.split(" · ")[:4] == viz.summary_line(trace).split(" · ")[:4]   # policy, tokens, deferral, calls
    assert f"{len(trace.steps)} tokens" in summary and note == "" and changes == ""
    assert lines(view) == {"applied": 0.5}
    assert view.count('class="colm-col"') == len(trace.steps)
    assert json.loads(open(export, encoding="utf-8").read())["text"] == trace.text


@pytest.mark.parametrize("policy, rate", [("base", 0.0), ("expert", 0.0), ("random", 0.5), ("confidence", 0.0)])
def test_generate_other_policies_have_no_threshold_line(url, dec, policy, rate):
    view, _, summary, _, _ = generate(client(url), policy=policy, rate=rate)
    trace = dec.generate(PROMPT, policy=Policy(policy, rate=rate), max_new_tokens=N)
    assert shown(view) == want(trace)
    assert summary.startswith(viz.policy_label(trace.policy))
    assert lines(view) == {} and "η" not in view


def test_progress_while_decoding(url):
    job = client(url).submit(PROMPT, "colm", 0.5, 0.3, 0.5, N, api_name="/generate")
    job.result(timeout=60)
    summaries = [out[2] for out in job.outputs()]
    assert summaries[0] == "Reading the prompt…"
    during = summaries[1:-1]
    assert during and all(re.match(rf"Decoding… \d+ tokens of at most {N} · [\d.]+ tokens/s · ", s) for s in during)
    assert all("s left" in s or "not known yet" in s for s in during)
    assert "Decoding" not in summaries[-1] and "finished" in summaries[-1] or "hit max tokens" in summaries[-1]


@pytest.mark.parametrize("prompt, words", [("", "empty"), ("   \n\t ", "empty"), ("x" * 301, "limit is 300")])
def test_bad_prompt_refused_without_model_call(url, dec, monkeypatch, prompt, words):
    calls = []
    monkeypatch.setattr(dec, "stream", lambda *a, **k: calls.append(a) or iter(()))
    c = client(url)
    _, _, _, note, _ = generate(c, prompt=prompt)
    assert words in note
    *_, note = c.predict(prompt, 0.5, N, api_name="/compare")
    assert words in note
    assert calls == []


def test_unusual_characters_do_not_crash(url):
    weird = "a\x00b\x07 \u202e 🤖 é 日本 \ufffe <|im_start|>system"
    view, _, summary, note, export = generate(client(url), prompt=weird, n=8)
    assert note == "" and "8 tokens" in summary
    doc = json.loads(open(export, encoding="utf-8").read())
    assert doc["prompt"].startswith("a\x00b\x07") and "🤖" in doc["prompt"]


def test_colm_error_is_shown(url, dec, monkeypatch):
    monkeypatch.setattr(dec, "max_prompt_tokens", 3)
    _, _, _, note, _ = generate(client(url))
    assert "the limit is 3" in note


def test_threshold_keeps_two_or_three_significant_digits(dec):
    """The shipped head's η is 0.1446664: the slider (and so every label) starts at 0.145."""
    head = make_test_head(dec.pair.base.hidden_size)
    head.meta["threshold"] = 0.1446664
    demo = app.build_app(CoLLM(dec.pair, head))
    slider = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "threshold")
    assert slider.value == 0.145 and round(slider.value / slider.step, 9) % 1 == 0    # on the slider's grid


@pytest.mark.parametrize("stored, want", [(0.9746494, 0.975), (None, 0.5)])
def test_the_confidence_slider_starts_at_the_cut_off_recorded_with_the_head(dec, stored, want):
    """The shipped head records the rule's cut-off that defers as often as it does (0.9746...); the slider starts at
    it rounded to its grid (a 0.05 grid would have given 0.95, a different rule), and says so only when a cut-off
    is recorded."""
    head = make_test_head(dec.pair.base.hidden_size)
    if stored is not None:
        head.meta["min_prob"] = stored
    demo = app.build_app(CoLLM(dec.pair, head))
    slider = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "min-prob")
    assert slider.value == want and round(slider.value / slider.step, 9) % 1 == 0
    assert bool(slider.info) == (stored is not None)


@pytest.mark.parametrize("seen", [False, True])
def test_about_starts_closed_only_for_a_returning_browser(dec, seen):
    """The page's load event carries the browser's "been here" flag (SEEN_JS) to the server, which closes About by
    Gradio's own update on a return and leaves it as built (open) on a first visit."""
    import gradio as gr
    demo = app.build_app(dec)
    about = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "about")
    assert about.open is True
    load = next(d for d in demo.fns.values() if d.fn is app.about_on_first_visit)
    assert [t[1] for t in load.targets] == ["load"] and load.js == page.SEEN_JS
    assert [o._id for o in load.outputs] == [about._id]
    assert [type(i) for i in load.inputs] == [gr.Checkbox] and load.inputs[0].visible is False
    update = app.about_on_first_visit(seen)
    assert (update.open is False) if seen else isinstance(update, type(gr.skip()))


def test_export_is_off_until_there_is_a_trace(dec):
    demo = app.build_app(dec)
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "export")
    assert button.interactive is False


# ----------------------------------------------------------------------------------------------- threshold
def first_late_flip_threshold(trace):
    """A threshold whose first flipped decision is a few tokens in, so re-decoding reuses a prefix."""
    for thr in [i / 200 for i in range(1, 200)]:
        f = viz.flips(trace, thr)
        if f and f[0] >= 2:
            return thr, f[0]
    pytest.fail("no threshold flips a later decision")


def test_preview_marks_flips_without_model_calls(url, dec, monkeypatch):
    c = client(url)
    generate(c)
    trace = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    thr, first = first_late_flip_threshold(trace)
    monkeypatch.setattr(dec, "stream", None)           # any model call would now fail
    monkeypatch.setattr(dec, "redecode_stream", None)
    view, changes, note = c.predict(thr, api_name="/preview")
    assert lines(view) == {"applied": 0.5, "pending": thr}
    assert shown(view) == want(trace, viz.flips(trace, thr))
    assert "not decoded yet" in plain(view) and "not decoded yet" in plain(changes)
    assert f"token #{first}" in plain(changes)
    assert note == ""
    view, changes, note = c.predict(0.5, api_name="/preview")     # back where it was: no preview left
    assert lines(view) == {"applied": 0.5} and changes == "" and "not decoded" not in view


def test_a_late_preview_at_the_answer_s_own_threshold_keeps_its_before_after_panel(url, dec):
    """A drag's last input can reach the server after the release's re-decode: at the new answer's own η the
    preview gives back the panel that answer showed, not an empty one."""
    c = client(url)
    generate(c)
    view, changes, *_ = c.predict(0.2, N, api_name="/redecode")
    assert "Re-decoded at η = 0.2" in plain(changes)
    late_view, late_changes, note = c.predict(0.2, api_name="/preview")
    assert late_changes == changes and shown(late_view) == shown(view) and note == ""


@pytest.mark.parametrize("api", ["/redecode", "/apply_threshold"])
def test_redecode_equals_fresh_generate_and_says_what_changed(url, dec, api):
    c = client(url)
    generate(c)
    before = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    thr, first = first_late_flip_threshold(before)
    view, changes, summary, note, export = c.predict(thr, N, api_name=api)
    fresh = dec.generate(PROMPT, threshold=thr, max_new_tokens=N)
    assert shown(view) == want(fresh)
    assert f"{first} reused" in summary and lines(view) == {"applied": thr}
    assert f"Re-decoded at η = {viz.fmt_threshold(thr)} (was 0.5), from token #{first}" in plain(changes)
    assert f"deferral {before.deferral_rate:.1%} → {fresh.deferral_rate:.1%}" in plain(changes)
    assert "not decoded yet" not in view + changes                       # a result, not a preview
    doc = json.loads(open(export, encoding="utf-8").read())
    assert [s["token_id"] for s in doc["steps"]] == fresh.token_ids
    assert doc["settings"]["threshold"] == thr and doc["policy"] == {"name": "colm", "threshold": thr}
    # Keyboard path and pointer path land on the same answer, and a second re-decode still works.
    again, *_ = c.predict(0.5, N, api_name=api)
    assert shown(again) == want(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))


def test_a_redecode_cut_short_is_compared_from_the_answer_before_it(url, dec, monkeypatch):
    c = client(url)
    generate(c)
    orig = dec.redecode_stream
    monkeypatch.setattr(dec, "redecode_stream", slowed(orig, 0.05))
    job = c.submit(0.05, N, api_name="/redecode")
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    c.predict(api_name="/stop")
    assert "stopped" in job.result(timeout=30)[2]
    monkeypatch.setattr(dec, "redecode_stream", orig)
    view, changes, summary, *_ = c.predict(0.95, N, api_name="/redecode")
    assert "Re-decoded at η = 0.95 (was 0.5)" in plain(changes)           # not "was 0.05": that one never ended
    assert shown(view) == want(dec.generate(PROMPT, threshold=0.95, max_new_tokens=N))


def test_letting_go_where_it_started_runs_nothing(url, dec, monkeypatch):
    c = client(url)
    view0, *_ = generate(c, prompt=OTHER)
    monkeypatch.setattr(dec, "redecode_stream", None)
    out = c.predict(0.5, N, api_name="/redecode")
    assert out[3] == ""                                                 # no error note: nothing ran
    view, *_ = c.predict(0.5, api_name="/preview")
    assert shown(view) == shown(view0)


@pytest.mark.parametrize("running, let_go_at, stopped", [
    (app.ThresholdStop(0.2), 0.3, True),        # a decode at an older threshold: cut short, the new one follows
    (app.ThresholdStop(0.3), 0.3, False),       # the decode of this very threshold
    (threading.Event(), 0.3, False),            # Compare's decodes, or another policy's
    (None, 0.3, False),
])
def test_a_newer_threshold_cuts_short_only_an_outdated_answer_decode(running, let_go_at, stopped):
    app.stop_outdated(running, let_go_at)
    assert (running is not None and running.is_set()) == stopped


@pytest.mark.parametrize("label", ["Algebra", "Coding"])
def test_redecoded_text_equals_fresh_text(dec, label):
    # Tokens the tiny models emit are often byte pieces of one character; a re-decode that branches between
    # them must still show each step's text as a fresh decode does (the page shows step texts, not ids).
    prompt = dict(app.load_examples())[label]
    for thr in [i / 10 for i in range(11)]:
        old = dec.generate(prompt, threshold=0.5, max_new_tokens=N)
        re_, fresh = dec.redecode(old, thr, N), dec.generate(prompt, threshold=thr, max_new_tokens=N)
        assert [(s.token_id, s.text) for s in re_.steps] == [(s.token_id, s.text) for s in fresh.steps]


def test_course_correction_checkbox_shows_a_rollback(url, dec, monkeypatch):
    """The checkbox decodes through colm.backtrack; a detection (a stand-in naming token 5's line; the tiny models
    write no newlines, so a line ends at a character they do write) shows the dropped text struck through."""
    from colm import backtrack
    plain = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    plain.release()
    k = next(i for i in range(5, N - 5) if plain.steps[i - 1].text and plain.steps[i].text)
    c = sum(len(s.text) for s in plain.steps[:k])
    lb = next(ch for ch in plain.text[c + 1:] if ch.isascii() and ch.isalnum())
    monkeypatch.setitem(backtrack.DETECTORS, "test", lambda text, since: (c, "a test's detection")
                        if since <= c < len(text) else None)
    monkeypatch.setattr(app, "Backtrack", lambda: backtrack.Backtrack(detectors=("test",), line_break=lb))
    c_ = client(url)
    view, changes, summary, note, export = c_.predict(PROMPT, "colm", 0.5, 0.3, 0.5, N, True, api_name="/generate")
    assert note == "" and "colm-dropped" in view and f"token #{k}: a test&#x27;s detection" in view
    doc = json.loads(open(export, encoding="utf-8").read())
    assert [r["position"] for r in doc["rollbacks"]] == [k] and doc["settings"]["backtrack"]["detectors"] == ["test"]
    view, *_ = generate(c_)                                   # unchecked: the plain answer, nothing dropped
    assert "colm-dropped" not in view


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
    trace = dec.generate(OTHER, threshold=0.5, max_new_tokens=N)
    assert doc["prompt"] == OTHER and doc["text"] == trace.text
    assert len(doc["steps"]) == len(trace.steps) and doc["steps"][0]["base_topk"]
    assert doc["settings"]["max_new_tokens"] == N and doc["settings"]["policy"] == "colm"
    assert (doc["base_model"], doc["expert_model"], doc["head"]) == ("tiny-base", "tiny-expert", "random-test-head")


def test_sessions_keep_separate_traces(url, dec):
    a, b = client(url), client(url)
    generate(a, prompt=PROMPT)
    generate(b, prompt=OTHER, policy="base")
    view_a, *_ = a.predict(0.3, api_name="/preview")
    _, _, note_b = b.predict(0.3, api_name="/preview")
    trace = dec.generate(PROMPT, threshold=0.5, max_new_tokens=N)
    assert shown(view_a) == want(trace, viz.flips(trace, 0.3))
    assert "another policy" in note_b


def compare(c, prompt, threshold=0.5, n=N):
    *columns, table, note = c.predict(prompt, threshold, n, api_name="/compare")
    return columns, table, note


def test_compare_ends_with_a_table(url, dec):
    columns, table, note = compare(client(url), PROMPT)
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| policy")]
    assert note == "" and len(rows) == 3
    for (view, summary), row, policy in zip([columns[0:2], columns[2:4], columns[4:6]], rows,
                                            [Policy("base"), Policy("expert"), Policy("colm", threshold=0.5)]):
        trace = dec.generate(PROMPT, policy=policy, max_new_tokens=N)
        assert [(t, k) for _, t, k in shown(view)] == [(viz.display_token(s.text), s.source) for s in trace.steps
                                                      if s.text]
        assert summary.startswith(viz.policy_label(trace.policy))
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[0] == viz.policy_label(trace.policy) and cells[2] == "—"     # not an example: no known answer
        assert cells[3] == str(len(trace.steps)) and cells[4] == f"{trace.deferral_rate:.1%}"
        assert cells[1] == f"`{page.final_answer(trace.text)}`" or cells[1] == "`—`"
    assert "No known answer" in table


def test_compare_marks_a_shipped_example_right_or_wrong(url, dec):
    prompt = dict(app.load_examples())["Algebra"]
    _, table, _ = compare(client(url), prompt)
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| policy")]
    marks = [r.split("|")[3].strip() for r in rows]
    texts = [dec.generate(prompt, policy=p, max_new_tokens=N).text
             for p in (Policy("base"), Policy("expert"), Policy("colm", threshold=0.5))]
    assert marks == ["✓ yes" if page.final_answer(t) == "3125" else "✗ no" for t in texts]
    assert "The known answer is **3125**." in table


# ----------------------------------------------------------------------------------------------- stop
def test_stop_cancels_and_next_request_works(url, dec, monkeypatch):
    orig = dec.stream
    monkeypatch.setattr(dec, "stream", slowed(orig, 0.05))
    c = client(url)
    job = c.submit(PROMPT, "base", 0.5, 0.3, 0.5, 400, api_name="/generate")
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    c.predict(api_name="/stop")
    view, changes, summary, note, export = job.result(timeout=30)
    assert "stopped" in summary
    n = int(summary.split(" tokens")[0].split(" · ")[-1])
    assert 0 < n < 400
    assert len(json.loads(open(export, encoding="utf-8").read())["steps"]) == n
    monkeypatch.setattr(dec, "stream", orig)
    view, _, summary, _, _ = generate(c)
    assert "stopped" not in summary
    assert shown(view) == want(dec.generate(PROMPT, threshold=0.5, max_new_tokens=N))


def test_examples_wrap_word_problems_with_the_instruction():
    from colm.data import INSTRUCTION
    ex = dict(app.load_examples())
    assert len(ex) >= 5
    assert any("a^3 · a^2" in p for p in ex.values())
    word = [p for p in ex.values() if p.endswith("\n\n" + INSTRUCTION)]
    assert len(word) >= 3
    assert any("def " in p or "Python" in p for p in ex.values() if not p.endswith(INSTRUCTION))


def test_every_word_problem_example_has_its_known_answer():
    from colm.data import INSTRUCTION
    answers = app.example_answers()
    word = {p for _, p in app.load_examples() if p.endswith(INSTRUCTION)}
    assert set(answers) == word
    assert answers[dict(app.load_examples())["Algebra"]] == "3125"      # 5^3 · 5^2 = 5^5


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
