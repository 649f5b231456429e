"""The page's acceptance flow (issue 19), timed step by step on the default engine, as a user drives it.

    python bench/page_timings.py [--example "Marbles (short word problem)"] [--engine auto] [--threads N]
                                 [--keys-to 0.3] [--mouse-to 0.5]

Starts ``app.py`` as a user does (loading page included) in its own process, drives it in Debian's Chromium and
times each step from the user's action to what they wait for: the demo page; an example to its final answer at the
default length; a hover box over the lowest bar; a click on a token to its details; the threshold by arrow keys,
by mouse, and by keys back, each to its re-decoded answer (the keys' time includes the page's 0.5 s wait for the
keys to stop); a what-if at a token near the end to its continued answer; Compare to its table; Export to the
downloaded file.  Writes bench/out/page_timings.json and prints a Markdown table.  Nothing here asserts a speed;
the flow's correctness is tests/test_browser.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking"]
SUMMARY = "document.querySelector('#summary').innerText"
STEP = 0.005        # app.THRESHOLD_STEP (not imported: this process loads no models and no gradio)


def wait_summary(page, *words):
    page.wait_for_function(f"(ws) => /finished|hit max tokens|stopped/.test({SUMMARY}) && "
                           f"ws.every(w => {SUMMARY}.includes(w))", arg=list(words))


def threshold_value(page) -> float:
    return float(page.input_value("#threshold input[type=number]"))


def press_to(page, target):
    slider = page.locator("#threshold input[type=range]")
    slider.focus()
    k = round((target - threshold_value(page)) / STEP)
    for _ in range(abs(k)):
        slider.press("ArrowRight" if k > 0 else "ArrowLeft")


def drag_to(page, target) -> float:
    page.locator("#threshold input[type=range]").scroll_into_view_if_needed()   # mouse coordinates: the viewport's
    box = page.locator("#threshold input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + threshold_value(page) * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + target * box["width"], y, steps=8)
    page.mouse.up()
    return threshold_value(page)


def fmt(x: float) -> str:
    return f"{x:.3g}"


def run_flow(page, url: str, a, started: float) -> list[dict]:
    rows = []

    def step(name, fn, **extra):
        t0 = time.perf_counter()
        out = fn()
        rows.append({"step": name, "seconds": round(time.perf_counter() - t0, 3), "loadavg": os.getloadavg()[0],
                     **extra, **(out or {})})
        C.log(rows[-1])

    while True:                        # the loading page answers first on the same port
        try:
            page.goto(url)
            break
        except Exception:
            time.sleep(0.25)
    page.wait_for_selector("#prompt textarea")
    rows.append({"step": "start to the demo page (loading page included)", "seconds":
                 round(time.perf_counter() - started, 3), "loadavg": os.getloadavg()[0]})
    C.log(rows[-1])

    def example():
        page.get_by_role("button", name=a.example).click()
        page.click("#generate")
        wait_summary(page)
        return {"summary": page.inner_text("#summary")}
    step("example to its final answer", example)

    def hover():
        heights = page.evaluate("Array.from(document.querySelectorAll('#view .colm-bar'))"
                                ".map(b => parseFloat(b.style.height))")
        low = heights.index(min(heights))
        col = page.locator(f"#view .colm-col[data-i='{low}']").bounding_box()
        plot = page.locator("#view .colm-plot").bounding_box()
        page.mouse.move(col["x"] + col["width"] / 2, plot["y"] + 8)
        page.wait_for_function(f"document.querySelector('#view .colm-tip')?.innerText.startsWith('#{low} ')")
        return {"position": low}
    step("hover the lowest bar to its box", hover)

    def click():
        i = page.evaluate("document.querySelector('#view .colm-tok:not(.colm-special)').dataset.i")
        page.click(f"#view .colm-tok[data-i='{i}']")
        page.wait_for_selector(f"#details :text('Token #{i} of')")
    step("click a token to its details", click)

    def keys(target):
        def go():
            press_to(page, target)
            wait_summary(page, f"η = {fmt(target)})")
            return {"summary": page.inner_text("#summary")}
        return go
    step(f"threshold by arrow keys to {fmt(a.keys_to)}, re-decoded", keys(a.keys_to))
    answer = page.inner_text("#view .colm-text")

    def mouse():
        value = drag_to(page, a.mouse_to)
        wait_summary(page, f"η = {fmt(value)})")
        return {"threshold": value, "summary": page.inner_text("#summary")}
    step(f"threshold by mouse to about {fmt(a.mouse_to)}, re-decoded", mouse)
    step(f"threshold by arrow keys back to {fmt(a.keys_to)}, re-decoded", keys(a.keys_to))
    rows[-1]["same_answer_as_the_keys_before"] = page.inner_text("#view .colm-text") == answer

    def what_if():
        # The last token with text eight tokens before the end: a short continuation, as a user inspecting the
        # final line would choose.
        pos = page.evaluate("(() => { const t = Array.from(document.querySelectorAll('#view .colm-tok'))"
                            ".slice(0, -8).filter(e => e.textContent.trim()); return t[t.length - 1].dataset.i; })()")
        page.click(f"#view .colm-tok[data-i='{pos}']")
        page.click("#branch:not([disabled])")
        wait_summary(page, f"{pos} reused")
        return {"position": int(pos), "summary": page.inner_text("#summary")}
    step("what-if at a token (the other model writes it), continued", what_if)

    def compare():
        page.get_by_text("Compare: base only").click()
        page.click("#compare")
        page.wait_for_selector("#compare-table table")
        return {"table": page.inner_text("#compare-table")}
    step("Compare to its table (three decodes)", compare)

    def export():
        with page.expect_download() as download:
            page.click("#export")
        return {"bytes": Path(download.value.path()).stat().st_size}
    step("Export to the downloaded file", export)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="Marbles (short word problem)")
    ap.add_argument("--keys-to", type=float, default=0.3)
    ap.add_argument("--mouse-to", type=float, default=0.5)
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--engine", a.engine]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    machine = C.machine()
    log = Path(tempfile.mkdtemp(prefix="colm-page-timings-")) / "server.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(15 * 60_000)
            rows = run_flow(page, f"http://127.0.0.1:{port}", a, started)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    server = log.read_text()
    result = {"machine": machine, "engine": a.engine, "threads": a.threads, "example": a.example,
              "server_traceback": "Traceback" in server, "steps": rows}
    print(C.write_json("page_timings.json", result))
    print("\n| step | seconds | load avg |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['loadavg']:.1f} |")
    same = [r["same_answer_as_the_keys_before"] for r in rows if "same_answer_as_the_keys_before" in r]
    print(f"\nkeys, mouse, keys back: same answer {same}; server traceback: {result['server_traceback']}")


if __name__ == "__main__":
    main()
