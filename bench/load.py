"""Load and fault check of the web demo, over loopback only.

Starts ``app.py`` as a separate server process on 127.0.0.1 (its default host), then:

  1. concurrency: S gradio_client sessions at once, each running R generations with its own prompts; every answer
     must complete, its exported trace must carry that session's prompt and settings (no cross-session mixing),
     the page's answer must match the trace, and the session's state (/preview) must still hold its own answer;
  2. Stop: K times in a row, start a long generation and press Stop mid-way; each must end "stopped", and the
     request after them must work normally;
  3. the server's RSS (psutil, sampled every 0.1 s: before / peak / after) and thread count must stay flat across
     each phase, measured after a warm-up round of the same shape (thread pools grow to their working size once).

    python bench/load.py            # the default models (the full run; a few minutes on a CPU)
    python bench/load.py --quick    # tiny random models (CI runs this; well under a minute)
    python bench/load.py --engine torch --threads 2     # --engine/--threads are passed to app.py

Bounded: S x R generations of --max-new-tokens tokens, K stops, a deadline on every wait.  Writes JSON (--out) and
prints the figures; exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx                # noqa: E402  (gradio's own HTTP client)
import psutil               # noqa: E402
from gradio_client import Client  # noqa: E402

from colm.page import tokens_of  # noqa: E402
from colm.viz import display_token  # noqa: E402

POLICIES = ["colm", "random", "base", "expert", "confidence"]
MB = 1 << 20
RSS_SLACK_MB = 64          # allowed RSS growth per phase after warm-up (or 2 % of the RSS, if more): allocator
                           # noise, each session's last trace, Gradio's per-session component copies
THREAD_SLACK = 8           # pooled worker threads come and go (seen: +5 on a loaded CPU); a leak of one per request adds 20 (10 per stop)


# ----------------------------------------------------------------------------------------------- set-up
def tiny_models(where: Path) -> list[str]:
    """The test suite's tiny random pair (shared tokenizer) and a random 'trained' head, saved under ``where``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import make_model, make_tokenizer
    from colm.head import DeferralHead
    tok = make_tokenizer()
    for name, model in (("base", make_model(tok, 0)), ("expert", make_model(tok, 1, hidden=48, layers=3, pad_vocab=8))):
        model.save_pretrained(where / name)
        tok.save_pretrained(where / name)
    torch.manual_seed(3)
    head = DeferralHead(32, {"trained": True, "threshold": 0.5, "name": "random-test-head"})
    torch.nn.init.normal_(head.linear.weight, std=1.0)
    head.save(where / "head.safetensors")
    return ["--base", str(where / "base"), "--expert", str(where / "expert"), "--head", str(where / "head.safetensors"),
            "--dtype", "fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python app.py`` in its own process; RSS and threads read through psutil."""

    def __init__(self, model_args: list[str], log: Path, ready_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.tmp = log.parent / "server-tmp"       # the server's own TMPDIR: what it leaves behind is visible
        self.tmp.mkdir()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *model_args],
                                     cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(self.tmp)})
        self.ps = psutil.Process(self.proc.pid)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.time() - t0 > ready_timeout:
                self.stop()
                raise RuntimeError(f"app.py not ready after {ready_timeout:.0f} s:\n{self.log_tail()}")
            try:
                # The loading page answers first; the demo is up once its /generate endpoint is listed.
                r = httpx.get(f"{self.url}/config", timeout=5)
                if r.status_code == 200 and any(d.get("api_name") == "generate"
                                                for d in r.json().get("dependencies", [])):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        self.start_seconds = time.time() - t0

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def threads(self) -> int:
        return self.ps.num_threads()

    def listening(self) -> list[str]:
        conns = getattr(self.ps, "net_connections", self.ps.connections)(kind="inet")
        return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN})

    def stop(self) -> int | None:
        """SIGTERM (what `kill` and service managers send), then SIGKILL after 30 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def exports_left(self) -> list[str]:
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.glob("colm-app-*"))


class Sampler:
    """Peak RSS of the server while a phase runs."""

    def __init__(self, server: Server):
        self.server, self.peak, self._stop = server, server.rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.server.rss())
            except psutil.Error:
                return

    def close(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


# ----------------------------------------------------------------------------------------------- phases
def prompt_for(session: int, request: int) -> str:
    return f"[session {session}, request {request}] What is {7 * session + 3} + {11 * request + 5}? Answer briefly."


def _html(value) -> str:
    """A gr.HTML output as the client returns it: the markup, or an update dict holding it."""
    if isinstance(value, dict):
        return value.get("value") or ""
    return value or ""


def one_generation(client: Client, session: int, request: int, max_new: int) -> dict:
    prompt, policy = prompt_for(session, request), POLICIES[(session + request) % len(POLICIES)]
    t0 = time.perf_counter()
    answer, _plot, summary, note, export = client.predict(prompt, policy, 0.5, 0.3, 0.5, max_new, api_name="/generate")
    seconds = time.perf_counter() - t0
    problems = []
    if note:
        problems.append(f"refused: {note}")
        return {"session": session, "request": request, "seconds": seconds, "problems": problems}
    doc = json.loads(Path(export).read_text(encoding="utf-8"))
    if doc["prompt"] != prompt:
        problems.append(f"trace carries another prompt: {doc['prompt'][:60]!r}")
    if doc["settings"]["policy"] != policy or doc["policy"]["name"] != policy:
        problems.append(f"trace carries another policy: {doc['policy']}")
    page = "".join(t for _, t, _ in tokens_of(_html(answer)))     # the view's HTML: what a reader sees
    if page != "".join(display_token(s["text"]) for s in doc["steps"]):
        problems.append("page answer differs from its trace")
    if policy == "colm":     # the preview (no model call) redraws the answer the session's state holds
        preview, _, _ = client.predict(0.5, api_name="/preview")   # (other policies' answers have no preview)
        if "".join(t for _, t, _ in tokens_of(_html(preview))) != page:
            problems.append("session state holds another answer")
    return {"session": session, "request": request, "seconds": seconds, "tokens": len(doc["steps"]),
            "decode_seconds": doc["decode_seconds"], "problems": problems,
            "models": [doc["base_model"], doc["expert_model"], doc["head"]]}


def session_run(url: str, session: int, requests: int, max_new: int, start: threading.Barrier) -> list[dict]:
    client = Client(url, verbose=False)
    start.wait(timeout=120)
    return [one_generation(client, session, r, max_new) for r in range(requests)]


def concurrent_round(url: str, sessions: int, requests: int, max_new: int) -> list[dict]:
    start = threading.Barrier(sessions)
    with ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(session_run, url, s, requests, max_new, start) for s in range(sessions)]
        return [r for f in futures for r in f.result(timeout=3600)]


def stop_once(client: Client, long_new: int, deadline_s: float = 120) -> dict:
    job = client.submit("Count from 1 to 1000, one number per line.", "base", 0.5, 0.3, 0.5, long_new,
                        api_name="/generate")
    t0 = time.time()
    while len(job.outputs()) < 3 and time.time() - t0 < deadline_s:
        time.sleep(0.02)
    client.predict(api_name="/stop")
    summary = job.result(timeout=deadline_s)[2]
    n = int(summary.split(" tokens")[0].split(" · ")[-1]) if " tokens" in summary else -1
    return {"stopped": "stopped" in summary, "tokens": n, "seconds": time.time() - t0}


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"min": round(xs[0], 3), "median": round(xs[len(xs) // 2], 3), "max": round(xs[-1], 3),
            "mean": round(sum(xs) / len(xs), 3)}


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random models (the CI run)")
    p.add_argument("--base", help="model args passed to app.py (default: the embedded pair, or tiny with --quick)")
    p.add_argument("--expert")
    p.add_argument("--head")
    p.add_argument("--dtype", default=None)
    p.add_argument("--engine", default=None, choices=["auto", "torch", "llamacpp"], help="passed to app.py")
    p.add_argument("--threads", type=int, default=None, help="passed to app.py")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--stops", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON results (default: bench/out/load[-quick].json)")
    args = p.parse_args(argv)
    assert 1 <= args.sessions <= 16 and 1 <= args.requests <= 50 and 0 <= args.stops <= 50, "keep it bounded"
    out = Path(args.out or ROOT / "bench" / "out" / f"load{'-quick' if args.quick else ''}.json")
    tmp = Path(tempfile.mkdtemp(prefix="colm-load-"))
    if args.base or args.expert:
        model_args = ["--base", args.base or "default", "--expert", args.expert or "default"]
        model_args += ["--head", args.head] if args.head else []
    elif args.quick:
        model_args = tiny_models(tmp)
    else:
        model_args = ["--head", args.head] if args.head else []
    if args.dtype:
        if "--dtype" in model_args:
            del model_args[model_args.index("--dtype"):model_args.index("--dtype") + 2]
        model_args += ["--dtype", args.dtype]
    model_args += ["--engine", args.engine] if args.engine else []
    model_args += ["--threads", str(args.threads)] if args.threads else []
    long_new = 900 if args.quick else 1024        # Stop lands long before either ends (tiny context: 1024)

    t_all = time.time()
    try:
        server = Server(model_args, tmp / "server.log", ready_timeout=180 if args.quick else 900)
    except RuntimeError as e:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"ok": False, "failures": [str(e)]}, indent=1))
        print(f"FAILED: {e}")
        return 1
    res: dict = {"command": " ".join([Path(sys.executable).name, "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
                            f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, {platform.system()}",
                 "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                             "") if Path("/proc/cpuinfo").exists() else "",
                 "model_args": model_args, "sessions": args.sessions, "requests_per_session": args.requests,
                 "max_new_tokens": args.max_new_tokens, "server_start_seconds": round(server.start_seconds, 1)}
    failures: list[str] = []
    try:
        res["listening"] = server.listening()
        if not res["listening"] or any(not a.startswith("127.0.0.1:") for a in res["listening"]):
            failures.append(f"server listens beyond loopback: {res['listening']}")

        # warm-up of the same shape, then the measured run
        warm = concurrent_round(server.url, args.sessions, 1, args.max_new_tokens)
        failures += [f"warm-up s{r['session']}: {p}" for r in warm for p in r["problems"]]
        time.sleep(1.0)
        rss0, thr0 = server.rss(), server.threads()
        rss_slack = max(RSS_SLACK_MB * MB, 0.02 * rss0)
        res["rss_slack_mb"] = round(rss_slack / MB, 1)
        sampler = Sampler(server)
        t0 = time.time()
        runs = concurrent_round(server.url, args.sessions, args.requests, args.max_new_tokens)
        wall = time.time() - t0
        peak = sampler.close()
        time.sleep(1.0)
        rss1, thr1 = server.rss(), server.threads()
        done = [r for r in runs if not r["problems"]]
        failures += [f"s{r['session']} r{r['request']}: {p}" for r in runs for p in r["problems"]]
        tokens = sum(r.get("tokens", 0) for r in runs)
        res["load"] = {
            "generations": len(runs), "completed_clean": len(done), "wall_seconds": round(wall, 2),
            "tokens": tokens, "throughput_tokens_per_second": round(tokens / wall, 2),
            "request_seconds": stats([r["seconds"] for r in runs]),
            "decode_seconds": stats([r["decode_seconds"] for r in runs if "decode_seconds" in r]),
            "models": runs[0].get("models"),
            "rss_mb": {"before": round(rss0 / MB, 1), "peak": round(peak / MB, 1), "after": round(rss1 / MB, 1),
                       "growth": round((rss1 - rss0) / MB, 1)},
            "threads": {"before": thr0, "after": thr1},
        }
        if len(runs) != args.sessions * args.requests:
            failures.append(f"{len(runs)} of {args.sessions * args.requests} generations came back")
        if rss1 - rss0 > rss_slack:
            failures.append(f"server RSS grew {(rss1 - rss0) / MB:.0f} MB over the load run")
        if thr1 > thr0 + THREAD_SLACK:
            failures.append(f"server threads grew {thr0} -> {thr1} over the load run")

        # Stop, K times in a row
        if args.stops:
            client = Client(server.url, verbose=False)
            first = stop_once(client, long_new)                     # warm-up
            time.sleep(0.5)
            rss0, thr0 = server.rss(), server.threads()
            stops = [stop_once(client, long_new) for _ in range(args.stops)]
            after = one_generation(client, 99, 0, args.max_new_tokens)
            time.sleep(1.0)
            rss1, thr1 = server.rss(), server.threads()
            res["stop"] = {"presses": args.stops, "stopped": sum(s["stopped"] for s in stops),
                           "tokens_before_stop": [s["tokens"] for s in stops],
                           "seconds_each": stats([s["seconds"] for s in stops]),
                           "next_request_ok": not after["problems"], "warm_up_stopped": first["stopped"],
                           "rss_mb": {"before": round(rss0 / MB, 1), "after": round(rss1 / MB, 1),
                                      "growth": round((rss1 - rss0) / MB, 1)},
                           "threads": {"before": thr0, "after": thr1}}
            if res["stop"]["stopped"] != args.stops or any(not 0 < s["tokens"] < long_new for s in stops):
                failures.append(f"only {res['stop']['stopped']} of {args.stops} generations stopped mid-way")
            failures += [f"after the stops: {p}" for p in after["problems"]]
            if rss1 - rss0 > rss_slack:
                failures.append(f"server RSS grew {(rss1 - rss0) / MB:.0f} MB over {args.stops} stops")
            if thr1 > thr0 + THREAD_SLACK:
                failures.append(f"server threads grew {thr0} -> {thr1} over {args.stops} stops")
        if server.proc.poll() is not None:
            failures.append(f"server died: {server.log_tail()}")
    except Exception as e:   # report, never hang: the server is stopped below either way
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        res["server_exit_status"] = server.stop()
    res["exports_left_after_exit"] = server.exports_left()
    if res["server_exit_status"] != 0:
        failures.append(f"server exit status {res['server_exit_status']} on SIGTERM (wanted a clean 0)")
    if res["exports_left_after_exit"]:
        failures.append(f"server left its export folder behind: {res['exports_left_after_exit']}")
    res["total_seconds"] = round(time.time() - t_all, 1)
    res["failures"], res["ok"] = failures, not failures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))

    load, stop = res.get("load", {}), res.get("stop", {})
    print(f"server: {res.get('listening')} started in {res['server_start_seconds']} s")
    if load:
        print(f"load: {load['completed_clean']}/{load['generations']} generations clean from {args.sessions} sessions "
              f"in {load['wall_seconds']} s ({load['throughput_tokens_per_second']} tokens/s); per request "
              f"{load['request_seconds']}")
        print(f"      RSS MB {load['rss_mb']}; threads {load['threads']}")
    if stop:
        print(f"stop: {stop['stopped']}/{stop['presses']} stopped (tokens {stop['tokens_before_stop']}); next request "
              f"ok: {stop['next_request_ok']}; RSS MB {stop['rss_mb']}; threads {stop['threads']}")
    print(("OK" if res["ok"] else "FAILED: " + "; ".join(failures)) + f"  ({res['total_seconds']} s, {out})")
    if res["ok"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"server log: {server.log}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
