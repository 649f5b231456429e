"""Issue 20's first acceptance point as a user meets it: `python app.py --expert-url URL --expert-api llama-server`
against a real llama-server serving the embedded expert (built by tests/llama_server.py), driven in Chromium: the
short example to its end, a keyboard re-decode at η = 0.3, Compare.  Prints what the page showed as JSON.

    python bench/remote_page.py
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from llama_server import binary
from colm import cache
from playwright.sync_api import sync_playwright
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
sp, ap = port(), port()
gguf = cache.ensure_default_gguf(cache.DEFAULT_EXPERT)
srv = subprocess.Popen([str(binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(sp), "-t", "1", "-np", "2",
                        "-c", "8192", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(8)
LOG = Path(os.environ.get("TMPDIR", "/tmp")) / "colm-remote-page.log"
log = open(LOG, "w")
appp = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(ap), "--threads", "1", "--expert-url",
                         f"http://127.0.0.1:{sp}", "--expert-api", "llama-server"], stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
errors, out = [], {}
try:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
        pg = b.new_page(viewport={"width": 1300, "height": 1000})
        pg.set_default_timeout(300_000)
        for _ in range(240):
            try:
                pg.goto(f"http://127.0.0.1:{ap}"); break
            except Exception:
                time.sleep(0.5)
        pg.wait_for_selector("#prompt textarea")
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        out["header"] = pg.inner_text("#models")
        pg.get_by_role("button", name="Marbles (short word problem)").click()
        t = time.time(); pg.click("#generate")
        S = "document.querySelector('#summary').innerText"
        pg.wait_for_function(f"/finished|hit max tokens/.test({S})")
        out["generate_s"] = round(time.time() - t, 1)
        out["summary"] = pg.inner_text("#summary")
        out["expert_tokens_highlighted"] = pg.locator("#view .colm-tok.colm-expert").count()
        out["chart_columns"] = pg.locator("#view .colm-col").count()
        out["answer_tail"] = pg.inner_text("#view .colm-text")[-80:]
        sl = pg.locator("#threshold input[type=range]"); sl.focus()
        for _ in range(31): sl.press("ArrowRight")
        pg.wait_for_function(f"/finished|hit max tokens/.test({S}) && {S}.includes('η = 0.3)')")
        out["redecode_summary"] = pg.inner_text("#summary"); out["changes"] = pg.inner_text("#changes")[:200]
        pg.get_by_text("Compare: base only").click(); pg.click("#compare")
        pg.wait_for_selector("#compare-table table")
        out["compare"] = pg.inner_text("#compare-table")
        b.close()
finally:
    appp.terminate(); appp.wait(20); srv.terminate(); srv.wait(10)
out["console_errors"] = errors
out["server_traceback"] = "Traceback" in LOG.read_text()
print(json.dumps(out, indent=1, ensure_ascii=False))
