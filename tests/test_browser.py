"""The page in a real browser (Debian's Chromium via Playwright).  On the tiny models: an example to its end, hover
and click linking text and chart, the threshold by keys and by mouse, a what-if at a token, progress, escaping,
Compare, About; then once on the real default pair started as a user starts it (``app.py``'s main, loading page
included).  Every test ends with no server traceback and no browser console error."""
import json
import os
import re
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

import app
from colm import page as colm_page, viz
from colm.decode import CoLLM, Step, Trace
from conftest import free_port, make_test_head

# gradio's queue trips pandas 3 deprecations on every event; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N = 16
SUMMARY = "document.querySelector('#summary').innerText"
TOKENS = ("Array.from(document.querySelectorAll('#view .colm-tok')).map(e => [Number(e.dataset.i), e.textContent, "
          "e.className.match(/colm-(base|expert|flip)/)[1]])")


@pytest.fixture(scope="module")
def served(pair):
    dec = CoLLM(pair, make_test_head(pair.base.hidden_size))  # conftest's head, at module scope
    demo = app.build_app(dec, default_max_new=N)
    port = free_port()
    app.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", dec
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, url, errors, context=None):
    pg = context.new_page() if context else browser.new_page(viewport={"width": 1300, "height": 1000})
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(20_000)
    pg.goto(url)
    pg.wait_for_selector("#prompt textarea")
    return pg


@pytest.fixture()
def errors(capfd):
    """Browser console errors, and (after the test) the server's stderr: both must stay empty of errors."""
    seen = []
    yield seen
    assert not seen, seen
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture()
def page(browser, served, errors):
    pg = open_page(browser, served[0], errors)
    yield pg
    pg.close()


def expected(trace, flips=()):
    return [[s.position, viz.display_token(s.text), "flip" if s.position in flips else s.source]
            for s in trace.steps]


def wait_summary(page, *words):
    """Until the summary of a finished decode (it names the stop reason only at the end) shows ``words``."""
    page.wait_for_function(f"(ws) => /finished|hit max tokens|stopped/.test({SUMMARY}) && "
                           f"ws.every(w => {SUMMARY}.includes(w))", arg=list(words))


def export_enabled(page, on: bool = True) -> bool:
    """Wait until the Export button is enabled (``on``) or disabled; False if it never gets there."""
    try:
        page.wait_for_function(f"document.querySelector('#export')?.disabled === {'false' if on else 'true'}")
        return True
    except sync_api.TimeoutError:
        return False


def hover_column_top(page, i):
    """Move the mouse into column ``i`` near the top of the plot: far above a low bar."""
    col = page.locator(f"#view .colm-col[data-i='{i}']").bounding_box()
    plot = page.locator("#view .colm-plot").bounding_box()
    page.mouse.move(col["x"] + col["width"] / 2, plot["y"] + 8)


def tip_inside_plot(page) -> bool:
    tip, plot = page.locator("#view .colm-tip").bounding_box(), page.locator("#view .colm-plot").bounding_box()
    return (tip["x"] >= plot["x"] - 0.5 and tip["y"] >= plot["y"] - 0.5
            and tip["x"] + tip["width"] <= plot["x"] + plot["width"] + 0.5
            and tip["y"] + tip["height"] <= plot["y"] + plot["height"] + 0.5)


def steps_to(page, target):
    """Arrow-key presses from the slider's value to ``target`` (signed)."""
    value = float(page.input_value("#threshold input[type=number]"))
    return round((target - value) / app.THRESHOLD_STEP)


def press_to(page, target):
    slider = page.locator("#threshold input[type=range]")
    slider.focus()
    k = steps_to(page, target)
    for _ in range(abs(k)):
        slider.press("ArrowRight" if k > 0 else "ArrowLeft")


def drag_to(page, target):
    slider = page.locator("#threshold input[type=range]")
    slider.scroll_into_view_if_needed()          # mouse coordinates are the viewport's
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + float(page.input_value("#threshold input[type=number]")) * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + target * box["width"], y, steps=8)
    page.mouse.up()
    return float(page.input_value("#threshold input[type=number]"))


# ----------------------------------------------------------------------------------------------- the flow
def test_example_hover_select_threshold_keys_and_mouse_export(page, served):
    _, dec = served
    assert export_enabled(page, on=False)                            # nothing to export yet
    page.get_by_role("button", name="Algebra").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value.includes('a^3 · a^2')")
    prompt = page.input_value("#prompt textarea")
    assert prompt.endswith("'#### <number>'.")  # the training instruction came with it
    page.click("#generate")
    wait_summary(page, f"{N} tokens", "η = 0.5)")
    trace = dec.generate(prompt, threshold=0.5, max_new_tokens=N)
    assert page.evaluate(TOKENS) == expected(trace)
    assert page.locator("#view .colm-col").count() == len(trace.steps)
    assert export_enabled(page)

    # A low bar: its whole column is the hover target, and the box stays inside the plot, even at the right edge.
    low = min(trace.steps, key=lambda s: s.p_defer)
    assert low.p_defer < 0.2
    for i in (low.position, len(trace.steps) - 1):
        hover_column_top(page, i)
        page.wait_for_function(f"document.querySelector('#view .colm-tip')?.innerText.startsWith('#{i} ')")
        assert tip_inside_plot(page)
        assert "colm-hl" in page.get_attribute(f"#view .colm-tok[data-i='{i}']", "class")   # its token is marked
    # Hovering a token marks its bar; clicking it selects both and fills the details panel; a bar works the same.
    tok = next(s for s in trace.steps if s.text.strip() and s.source == "expert")
    page.hover(f"#view .colm-tok[data-i='{tok.position}']")
    assert "colm-hl" in page.get_attribute(f"#view .colm-col[data-i='{tok.position}']", "class")
    page.click(f"#view .colm-tok[data-i='{tok.position}']")
    page.wait_for_selector(f"#details :text('Token #{tok.position} of {N}')")
    assert "colm-sel" in page.get_attribute(f"#view .colm-col[data-i='{tok.position}']", "class")
    details = page.inner_text("#details")
    assert "written by the expert" in details and "> η 0.5: the head deferred" in details
    assert "the base model's top candidates" in details and "the expert's top candidates" in details
    page.click(f"#view .colm-col[data-i='{low.position}']")
    page.wait_for_selector(f"#details :text('Token #{low.position} of {N}')")
    assert "colm-sel" in page.get_attribute(f"#view .colm-tok[data-i='{low.position}']", "class")
    assert page.locator("#view .colm-sel").count() == 2             # one token, one column
    nxt = min(low.position + 1, N - 1)                              # the keyboard walks the selection too
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"#details :text('Token #{nxt} of {N}')")
    assert "colm-sel" in page.get_attribute(f"#view .colm-col[data-i='{nxt}']", "class")

    # Keyboard: arrow steps preview at once (pink, a banner, no model call), then re-decode once the keys stop,
    # landing where a fresh decode at that threshold lands, with a before/after panel.
    def late_visible_flip(t):
        f = viz.flips(trace, t)
        return f and f[0] >= 1 and any(trace.steps[i].text for i in f)
    target = next(t for t in (round(0.5 + k * app.THRESHOLD_STEP, 3) for k in range(2, 100)) if late_visible_flip(t))
    flipped = viz.flips(trace, target)
    press_to(page, target)
    wait_summary(page, f"η = {viz.fmt_threshold(target)}", f"{flipped[0]} reused")
    fresh = dec.generate(prompt, threshold=target, max_new_tokens=N)
    assert page.evaluate(TOKENS) == expected(fresh)
    changes = page.inner_text("#changes")
    # A pause between presses (a loaded machine) re-decodes on the way, by design: "was" is the last one shown.
    was = "0.5), from token #" + str(flipped[0]) if "(was 0.5)" in changes else ""
    assert f"Re-decoded at η = {viz.fmt_threshold(target)} (was {was}" in changes
    assert f"→ {fresh.deferral_rate:.1%}" in changes
    assert page.locator("#view .colm-banner").count() == 0            # a result, not a preview

    # Mouse: drag to about 0.3; letting go re-decodes at whatever value the slider landed on.
    value = drag_to(page, 0.3)
    assert 0.2 < value < 0.4
    wait_summary(page, f"η = {viz.fmt_threshold(value)}")
    assert page.evaluate(TOKENS) == expected(dec.generate(prompt, threshold=value, max_new_tokens=N))
    page.wait_for_function("(w) => document.querySelector('#changes').innerText.includes(w)",
                           arg=f"(was {viz.fmt_threshold(target)})")    # drawn with the summary or just after
    # ... and the keys bring it back to the same state the keys reached before.
    press_to(page, target)
    wait_summary(page, f"η = {viz.fmt_threshold(target)}")
    assert page.evaluate(TOKENS) == expected(fresh)

    with page.expect_download() as download:
        page.click("#export")
    doc = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert doc["prompt"] == prompt and doc["policy"]["threshold"] == target and len(doc["steps"]) == N


def test_preview_while_dragging_is_not_the_result(page, served):
    _, dec = served
    page.fill("#prompt textarea", "What is 2 + 2?")
    page.click("#generate")
    wait_summary(page, "η = 0.5)")
    trace = dec.generate("What is 2 + 2?", threshold=0.5, max_new_tokens=N)
    assert "would change writer" not in page.inner_text("#view")       # nothing can flip yet: no pink legend
    target = next(t / 200 for t in range(60, 200) if viz.flips(trace, t / 200))
    slider = page.locator("#threshold input[type=range]")
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 0.5 * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + target * box["width"], y, steps=8)     # held: a preview only
    pending = float(page.input_value("#threshold input[type=number]"))
    page.wait_for_selector(f"#view .colm-banner:text('Preview at η = {viz.fmt_threshold(pending)}: not decoded yet')")
    flips = viz.flips(trace, pending)
    assert page.evaluate(TOKENS) == expected(trace, flips)
    assert "not decoded yet" in page.inner_text("#changes") and page.locator("#view .colm-eta").count() == 2
    assert ("would change writer" in page.inner_text("#view")) == bool(flips)
    page.mouse.up()
    wait_summary(page, f"η = {viz.fmt_threshold(pending)}")
    assert page.locator("#view .colm-banner").count() == 0 and "Re-decoded" in page.inner_text("#changes")


def test_what_if_at_a_token_continues_from_the_cached_prefix(page, served):
    """Click a token, have the other model write it: the page shows what a from-scratch decode with that forced
    choice gives, says what changed, and records the forced position in the export."""
    _, dec = served
    prompt = "What is 2 + 2?"
    page.fill("#prompt textarea", prompt)
    assert page.locator("#branch").is_disabled()                    # nothing selected yet
    page.click("#generate")
    wait_summary(page, "η = 0.5)")
    trace = dec.generate(prompt, threshold=0.5, max_new_tokens=N)
    pos = next(s.position for s in trace.steps[N // 2:] if s.text.strip())
    other = "base" if trace.steps[pos].source == "expert" else "expert"
    page.click(f"#view .colm-tok[data-i='{pos}']")
    who = {"base": "the base model", "expert": "the expert"}[other]
    page.wait_for_selector(f"#branch:text('What if {who} wrote token #{pos}?'):not([disabled])")
    page.click("#branch")
    wait_summary(page, f"{pos} reused")
    want = dec.branch(trace, pos, other, N)
    assert page.evaluate(TOKENS) == expected(want)
    assert f"What-if at token #{pos}: {who} wrote it" in page.inner_text("#changes")
    assert f"Forced positions in this answer: #{pos}." in page.inner_text("#changes")
    page.wait_for_selector("#details :text('Click a token')")          # the old selection went with the old answer
    assert page.locator("#branch").is_disabled()
    page.click(f"#view .colm-tok[data-i='{pos}']")
    page.wait_for_selector(f"#details :text('you chose {who} here (what-if)')")
    assert export_enabled(page)
    with page.expect_download() as download:
        page.click("#export")
    doc = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert doc["forced_positions"] == [pos] and doc["settings"]["what_if"] == {"position": pos, "source": other}


@pytest.mark.parametrize("policy", ["random", "base"])
def test_policies_without_a_threshold_have_no_line_and_no_flip_legend(page, policy):
    page.locator("#policy").get_by_text(policy if policy == "random" else "base only", exact=True).click()
    page.fill("#prompt textarea", "hello")
    page.click("#generate")
    wait_summary(page, f"{N} tokens")
    assert page.locator("#view .colm-eta").count() == 0
    assert "η" not in page.inner_text("#view") and "does not use" in page.inner_text("#view")
    page.locator("#threshold input[type=range]").focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_selector("#note :text('applies to the Co-LLM policy')")
    assert page.locator("#view .colm-eta").count() == 0 and "would change" not in page.inner_text("#view")


def test_progress_while_decoding_and_export_off_meanwhile(page, served, monkeypatch):
    _, dec = served
    orig, gate = dec.stream, threading.Event()

    def held(*a, **k):           # stops after three tokens until the test has read the page
        for i, tr in enumerate(orig(*a, **k)):
            if i == 3:
                gate.wait(60)
            yield tr
    page.fill("#prompt textarea", "hello")
    page.click("#generate")
    wait_summary(page, f"{N} tokens")
    assert export_enabled(page)
    monkeypatch.setattr(dec, "stream", held)
    page.click("#generate")
    try:
        page.wait_for_function(f"/^Decoding… 3 tokens of at most {N} · [0-9.]+ tokens\\/s · /.test({SUMMARY})")
        assert re.search(r"at most \d+ s left|not known yet", page.inner_text("#summary"))
        assert export_enabled(page, on=False)                         # the old file is not this answer
    finally:
        gate.set()
    wait_summary(page, f"{N} tokens")
    assert export_enabled(page)


def test_model_text_is_shown_as_text(page, served, monkeypatch):
    _, dec = served
    evil = ["<script>window.pwned=1</script>", "<img src=x onerror=window.pwned=1>", "a\u202eb", "c\ud800d", " ok"]
    steps = [Step(i, 100 + i, t, "expert" if i % 2 else "base", 0.3 + 0.1 * i, [(100 + i, t, 0.5)], [(1, t, 0.4)])
             for i, t in enumerate(evil)]
    crafted = Trace("x", [1], {"name": "colm", "threshold": 0.5}, steps, stop_reason="eos")
    monkeypatch.setattr(dec, "stream", lambda *a, **k: iter([crafted]))
    page.fill("#prompt textarea", "anything")
    page.click("#generate")
    wait_summary(page, f"{len(evil)} tokens")
    assert page.evaluate(TOKENS) == expected(crafted)                  # "\u202e" and "\ud800" shown as escapes
    assert page.locator("#view script, #view img, #details img").count() == 0
    page.click("#view .colm-tok[data-i='1']")
    page.wait_for_selector("#details :text('Token #1')")
    hover_column_top(page, 0)
    page.wait_for_function("document.querySelector('#view .colm-tip')?.innerText.startsWith('#0 ')")
    assert "<script>window.pwned=1</script>" in page.inner_text("#view .colm-tip")
    assert "'<img·src=x·onerror=window.pwned=1>', written by the expert" in page.inner_text("#details")
    assert page.evaluate("window.pwned") is None


def test_compare_ends_with_a_summary_table(page, served):
    _, dec = served
    page.get_by_role("button", name="Algebra").click()
    page.get_by_text("Compare: base only").click()
    page.click("#compare")
    page.wait_for_selector("#compare-table table")
    rows = page.locator("#compare-table tbody tr")
    assert rows.count() == 3
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert [c[0] for c in cells] == ["base only", "expert only", "Co-LLM (η = 0.5)"]
    assert all(c[2] in ("✓ yes", "✗ no") for c in cells) and all(c[3] == str(N) for c in cells)
    assert "The known answer is 3125." in page.inner_text("#compare-table")


def test_about_is_open_on_the_first_visit_only(browser, served, errors):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})     # a visitor's own storage
    try:
        first = open_page(browser, served[0], errors, context)
        first.wait_for_function("localStorage.getItem('colm-about-seen') === '1'")     # the load event's js step ran
        first.wait_for_timeout(1500)            # and its answer (nothing, on a first visit) had time to arrive
        assert first.locator("#about .colm-about").is_visible()
        link = first.locator("#about a[href='https://arxiv.org/abs/2403.03870']")
        assert link.count() == 1
        text = first.inner_text("#about")
        assert "the slider trades accuracy for expert calls" in text.lower()
        assert f"({viz.PALETTE['expert'].name} in the answer" in text
        first.close()
        again = open_page(browser, served[0], errors, context)
        again.wait_for_function("document.querySelector('#about .colm-about').offsetParent === null")
        again.close()
    finally:
        context.close()


def test_empty_prompt_shows_message(page):
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    page.wait_for_selector("#note :text('prompt is empty')")


# ----------------------------------------------------------------------------------------------- the real page
def test_app_main_on_the_default_engine(tmp_path, browser):
    """As a user starts it: `python app.py` on the embedded default pair and the default engine (llama.cpp on a
    CPU), loading page included.  The short example to its final answer at the default length; hover a low bar;
    click a token; the threshold by keys, by mouse and by keys again to the same answer; a what-if at a token;
    Compare's table; export off before and on after.  The server log must end with no traceback, the browser console with no error."""
    import subprocess
    import sys
    import time
    from conftest import default_pair_installed
    if not default_pair_installed():
        pytest.skip("embedded default pair or llama-cpp-python not installed")
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(app.__file__)), "--port", str(port), "--threads", "2"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    errors = []
    try:
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        deadline = time.monotonic() + 120
        while True:     # the loading page comes up first, on the same port
            try:
                pg.goto(f"http://127.0.0.1:{port}")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        pg.set_default_timeout(240_000)
        pg.wait_for_selector("#prompt textarea")          # the demo, after the loading page reloaded
        # From here on: the loading page's polls during the hand-over (server down for a moment) are not counted.
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        assert "engine llamacpp" in pg.inner_text("#models") and export_enabled(pg, on=False)
        assert pg.input_value("#threshold input[type=number]") == "0.145"          # the shipped η, 3 digits
        label, question = next((e["label"], e) for e in json.loads(app.EXAMPLES.read_text()) if "short" in e["label"])
        pg.get_by_role("button", name=label).click()
        pg.click("#generate")
        wait_summary(pg, "finished")                       # its end, not the token limit
        assert f"#### {question['answer']}" in pg.inner_text("#view .colm-text")
        assert "Co-LLM (η = 0.145)" in pg.inner_text("#summary") and export_enabled(pg)
        heights = pg.evaluate("Array.from(document.querySelectorAll('#view .colm-bar'))"
                              ".map(b => parseFloat(b.style.height))")
        low = heights.index(min(heights))
        hover_column_top(pg, low)
        pg.wait_for_function(f"document.querySelector('#view .colm-tip')?.innerText.startsWith('#{low} ')")
        assert "p_defer" in pg.inner_text("#view .colm-tip") and tip_inside_plot(pg)
        pg.click(f"#view .colm-tok[data-i='{low}']")
        pg.wait_for_selector(f"#details :text('Token #{low} of')")
        assert "colm-sel" in pg.get_attribute(f"#view .colm-col[data-i='{low}']", "class")
        # Higher thresholds: fewer expert tokens, so the re-decodes stay quick on a CPU.
        press_to(pg, 0.3)                                  # keys
        wait_summary(pg, "η = 0.3)")
        by_keys = pg.evaluate(TOKENS)
        assert "Re-decoded at η = 0.3 (was " in pg.inner_text("#changes")   # keys may pass through others
        value = drag_to(pg, 0.5)                           # mouse
        wait_summary(pg, f"η = {viz.fmt_threshold(value)})")
        assert f"Re-decoded at η = {viz.fmt_threshold(value)} (was 0.3)" in pg.inner_text("#changes")
        press_to(pg, 0.3)                                  # keys again, from elsewhere: the same answer
        wait_summary(pg, "η = 0.3)")
        assert pg.evaluate(TOKENS) == by_keys
        # What-if near the end (a short continuation): the other model writes that token, the rest follows.
        pos, _, writer = next(t for t in reversed(by_keys[:-8]) if t[1].strip())
        pg.click(f"#view .colm-tok[data-i='{pos}']")
        pg.click(f"#branch:not([disabled])")
        wait_summary(pg, f"{pos} reused")
        assert f"What-if at token #{pos}:" in pg.inner_text("#changes")
        assert pg.evaluate(TOKENS)[:pos] == by_keys[:pos] and pg.evaluate(TOKENS)[pos][2] != writer
        pg.get_by_text("Compare: base only").click()
        pg.click("#compare")
        pg.wait_for_selector("#compare-table table")
        assert pg.locator("#compare-table tbody tr").count() == 3
        assert f"The known answer is {question['answer']}." in pg.inner_text("#compare-table")
        pg.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    server = log.read_text()
    assert "Traceback" not in server, server[-3000:]
    assert not errors, errors
