"""The page in a real browser (Debian's Chromium via Playwright) on the tiny models: type, generate, read the
highlighted answer and the chart, move the threshold with keys and with the mouse, click an example."""
import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

import app
from colm import viz
from colm.decode import CoLLM
from conftest import free_port, make_test_head

# gradio's queue trips pandas 3 deprecations on every event; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N = 16
SHAPE_Y = "document.querySelector('#chart .js-plotly-plot')?.layout?.shapes?.[0]?.y0"
SUMMARY = "document.querySelector('#summary').innerText"


@pytest.fixture(scope="module")
def served(pair):
    dec = CoLLM(pair, make_test_head(pair.base.hidden_size))  # conftest's head, at module scope
    demo = app.build_app(dec, default_max_new=N)
    port = free_port()
    app.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", dec
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        pg.set_default_timeout(20_000)
        pg.goto(served[0])
        pg.wait_for_selector("#prompt textarea")
        yield pg
        browser.close()


def expert_text(trace) -> str:
    # The page splits lines into separate spans, so compare without the newlines.
    return "".join(t for t, label in viz.highlighted(trace) if label == "expert").replace("\n", "")


def page_expert_text(page) -> str:
    return page.evaluate("Array.from(document.querySelectorAll('#answer .token.highlighted .text'))"
                         ".map(e => e.textContent).join('')")


def wait_summary(page, *words):
    """Until the summary of a finished decode (it names the stop reason only at the end) shows ``words``."""
    page.wait_for_function(f"(ws) => /finished|hit max tokens/.test({SUMMARY}) && ws.every(w => {SUMMARY}.includes(w))",
                           arg=list(words))


def test_example_generate_threshold(page, served):
    _, dec = served
    page.get_by_role("button", name="Algebra").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value.includes('a^3 · a^2')")
    prompt = page.input_value("#prompt textarea")
    assert prompt.endswith("'#### <number>'.")  # the training instruction came with it

    page.click("#generate")
    wait_summary(page, f"{N} tokens", "η = 0.50")
    trace = dec.generate(prompt, threshold=0.5, max_new_tokens=N)
    assert page.locator("#answer .token.highlighted").count() >= 1
    assert page_expert_text(page) == expert_text(trace)
    page.wait_for_function(f"{SHAPE_Y} === 0.5")
    n_bars = page.evaluate("document.querySelector('#chart .js-plotly-plot').data.reduce((n, t) => n + t.x.length, 0)")
    assert n_bars == len(trace.steps)

    # Keyboard: arrow steps move the line at once (no model call) and mark the decisions that would flip.
    steps = next(k for k in range(5, 50, 5)
                 if any(trace.steps[i].text for i in viz.flips(trace, 0.5 + k / 100)))  # a flip with visible text
    target = 0.5 + steps / 100
    slider = page.locator("#threshold input[type=range]")
    slider.focus()
    for _ in range(steps):
        slider.press("ArrowRight")
    page.wait_for_function(f"Math.abs({SHAPE_Y} - {target}) < 1e-9")
    flipped = viz.flips(trace, target)
    page.wait_for_selector("#note :text('would flip')")
    flip_spans = page.locator("#answer .token.highlighted[style*='204, 121, 167']")   # FLIP_COLOR #CC79A7
    assert flip_spans.count() >= 1
    # Arrow keys fire no release event: the Apply button re-decodes from the first flip, landing where a fresh
    # decode at the new threshold would.
    page.click("#apply")
    wait_summary(page, f"η = {target:.2f}", f"{flipped[0]} reused")
    assert page_expert_text(page) == expert_text(dec.generate(prompt, threshold=target, max_new_tokens=N))

    # Mouse: drag the thumb down to about 0.3; the release re-decodes at whatever value the slider landed on.
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + target * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.3 * box["width"], y, steps=8)
    page.mouse.up()
    value = float(page.input_value("#threshold input[type=number]"))
    assert 0.2 < value < 0.4
    wait_summary(page, f"η = {value:.2f}")
    page.wait_for_function(f"Math.abs({SHAPE_Y} - {value}) < 1e-9")
    assert page_expert_text(page) == expert_text(dec.generate(prompt, threshold=value, max_new_tokens=N))

    with page.expect_download() as download:
        page.click("#export")
    doc = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert doc["prompt"] == prompt and doc["policy"]["threshold"] == value and len(doc["steps"]) == N


def test_empty_prompt_shows_message(page):
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    page.wait_for_selector("#note :text('prompt is empty')")


def test_app_main_on_the_default_engine(tmp_path, page):
    """As a user starts it: `python app.py` on the embedded default pair and the default engine (llama.cpp on a
    CPU), loading page included; generate a short Co-LLM answer with the shipped head and re-decode at another
    threshold.  The server log must end with no traceback, the browser console with no error."""
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
        # the module's browser (one Playwright per process), a new page of it
        pg = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})
        deadline = time.monotonic() + 120
        while True:     # the loading page comes up first, on the same port
            try:
                pg.goto(f"http://127.0.0.1:{port}")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        pg.set_default_timeout(120_000)
        pg.wait_for_selector("#prompt textarea")          # the demo, after the loading page reloaded
        # From here on: the loading page's polls during the hand-over (server down for a moment) are not counted.
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        assert "engine llamacpp" in pg.inner_text("#models")
        pg.fill("#prompt textarea", "What is 12 * 7? Answer briefly.")
        pg.fill("#max-new input[type=number]", "24")
        pg.press("#max-new input[type=number]", "Enter")
        pg.click("#generate")
        wait_summary(pg)            # finished, or hit the 24 tokens
        text = pg.inner_text("#summary")
        assert "Co-LLM" in text and "tokens/s" in text
        pg.fill("#threshold input[type=number]", "0.05")
        pg.press("#threshold input[type=number]", "Enter")
        pg.click("#apply")
        wait_summary(pg, "η = 0.05")
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
