"""Regenerate assets/screenshot.png: the real app on the default pair with the shipped head, in Debian's Chromium.

    python bench/screenshot.py [--example "Bakery sales (word problem)"] [--max-new 160] [--out assets/screenshot.png]
                               [--engine auto|torch|llamacpp] [--threads N]
    python bench/screenshot.py --problem 1850 --backtrack --max-new 512 --out assets/course-correction.png

Starts the app in-process on a free port, clicks an example, sets the token limit, generates at the head's own
threshold and waits for the decode to finish, then clicks the first expert-written token (its details and
what-if button) before the full-page screenshot.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="Bakery sales (word problem)")
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--out", default=str(ROOT / "assets" / "screenshot.png"))
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--problem", type=int, default=None,
                    help="instead of an example: this GSM8K training-file line (with the shared instruction)")
    ap.add_argument("--backtrack", action="store_true", help="tick Course correction before generating")
    a = ap.parse_args()
    import app
    from playwright.sync_api import sync_playwright
    from colm import CoLLM, load_head, load_pair
    pair = load_pair(engine=a.engine, threads=a.threads)
    head = load_head(pair)
    demo = app.build_app(CoLLM(pair, head), default_max_new=a.max_new)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(15 * 60_000)
            page.goto(f"http://127.0.0.1:{port}")
            if a.problem is None:
                page.get_by_role("button", name=a.example).click()
            else:
                from colm.data import DEFAULT_DATA, messages, read_jsonl
                question = next(e.question for e in read_jsonl(DEFAULT_DATA) if e.index == a.problem)
                page.fill("#prompt textarea", messages(question)[0]["content"])
            if a.backtrack:
                page.check("#backtrack input")
            page.click("#generate")
            page.wait_for_function("/finished|hit max tokens/.test(document.querySelector('#summary').innerText)")
            page.wait_for_timeout(1500)   # the last chart update
            # The details panel and its what-if button, for the first expert-written token with text (or, after a
            # course correction, the first token of the rewritten line).
            first = page.locator("#view .colm-dropped + .colm-tok") if a.backtrack else None
            (first.first if first is not None and first.count() else
             page.locator("#view .colm-tok.colm-expert:not(.colm-special)").first).click()
            page.wait_for_selector("#branch:not([disabled])")
            if a.backtrack:
                page.locator("#view .colm-dropped").first.scroll_into_view_if_needed()
            page.screenshot(path=a.out, full_page=True)
            print(page.inner_text("#summary"))
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
