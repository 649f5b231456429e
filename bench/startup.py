"""Item 6: start-up time and memory on the default engine, each start in a fresh subprocess.

  cold   COLM_CACHE_DIR = a new, empty temporary directory: assemble the default GGUFs from their chunk packages,
         verify their sha256, build the tokenizer from the GGUF metadata (and, on the torch engine only, dequantise
         to bf16), load both models, then decode.  The directory is deleted afterwards.  (The chunk files are
         probably in the OS page cache from earlier runs, so this is "cold cache", not "cold disk".)
  warm   the same from the existing cache (~/.cache/colm or $COLM_CACHE_DIR); medians over --reps (>= 3) starts.
  child  spawn -> models loaded (load_pair) -> first token of a CoLLM stream (the shipped head at its threshold, as
         the app decodes) -> 16 tokens; peak RSS = VmHWM of the child (after load, first token, 16 tokens).
  app    `python app.py --port P`: spawn -> the loading page answers (GET / = 200) -> the demo is served (its
         /generate endpoint is listed in /config); peak RSS = the app process's VmHWM when the demo is served.

Times are from the parent's spawn, so interpreter start and imports are included.

    python bench/startup.py [--cold] [--reps 3] [--engine auto] [--threads N] [--no-app]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    from . import common as C
except ImportError:
    import common as C


def _vm_hwm_gb(pid: int | str = "self") -> float | None:
    """Peak RSS of a process (VmHWM).  Unlike ru_maxrss it starts afresh at exec: Linux carries ru_maxrss over
    from the forking parent, so a child of a process that once held more would report the parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return None


def child() -> None:
    """Runs inside the subprocess: load, first token, 16 tokens; report JSON on stdout."""
    t0 = time.time()
    marks = []
    import warnings
    from colm.engines import load_pair
    t_import = time.time()
    threads = int(os.environ["COLM_BENCH_THREADS"]) if os.environ.get("COLM_BENCH_THREADS") else None
    pair = load_pair(engine=os.environ.get("COLM_BENCH_ENGINE", "auto"), threads=threads,
                     progress=lambda m: marks.append((round(time.time() - t0, 2), m)))
    t_loaded = time.time()
    hwm_load = _vm_hwm_gb()
    from colm.decode import CoLLM
    from colm.data import DEFAULT_DATA, messages, read_jsonl
    from colm.head import load_head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = load_head(pair)
    dec = CoLLM(pair, head)
    t_first, hwm_first, tr = None, None, None
    for tr in dec.stream(messages(read_jsonl(DEFAULT_DATA)[0].question), max_new_tokens=16):
        if t_first is None and tr.steps:
            t_first, hwm_first = time.time(), _vm_hwm_gb()
    t_done = time.time()
    print(json.dumps({"t_start": t0, "import_s": t_import - t0, "load_pair_s": t_loaded - t_import,
                      "t_loaded": t_loaded, "t_first_token": t_first, "t_16_tokens": t_done,
                      "first_token_after_load_s": t_first - t_loaded, "tokens": len(tr.steps),
                      "deferred": sum(s.source == "expert" for s in tr.steps), "stages": marks,
                      "pair": pair.describe(), "head": head.identity,
                      "vm_hwm_after_load_gb": hwm_load, "vm_hwm_after_first_token_gb": hwm_first,
                      "vm_hwm_after_16_tokens_gb": _vm_hwm_gb()}))


def _env(engine: str, threads: int | None, cache_dir: Path | None = None) -> dict:
    env = {**os.environ, "COLM_BENCH_ENGINE": engine, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["COLM_BENCH_THREADS"] = str(threads)
    if cache_dir is not None:
        env["COLM_CACHE_DIR"] = str(cache_dir)
    return env


def _spawn_child(env: dict) -> dict:
    t_spawn = time.time()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], capture_output=True, text=True,
                       env=env, cwd=C.ROOT, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"startup child failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["interpreter_start_s"] = r["t_start"] - t_spawn
    r["spawn_to_loaded_s"] = r["t_loaded"] - t_spawn
    r["spawn_to_first_token_s"] = r["t_first_token"] - t_spawn
    r["spawn_to_16_tokens_s"] = r["t_16_tokens"] - t_spawn
    return r


def _fresh_cache(fn, *args):
    """Run ``fn(env_cache_dir, *args)`` with an empty temporary COLM_CACHE_DIR; add the bytes it wrote."""
    tmp = Path(tempfile.mkdtemp(prefix="colm-cold-"))
    try:
        r = fn(tmp, *args)
        if isinstance(r, dict):
            r["cache_gb"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**30
        return r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_start(env: dict, engine: str = "auto", threads: int | None = None, timeout: float = 1800.0) -> dict | None:
    """Spawn app.py; time the loading page (GET / answers) and the demo being served (/config lists generate)."""
    app = C.ROOT / "app.py"
    if not app.exists():
        return None
    port = _free_port()
    cmd = [sys.executable, str(app), "--port", str(port), "--engine", engine]
    cmd += ["--threads", str(threads)] if threads else []
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=C.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    page = None
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                return {"error": f"app.py exited with {p.returncode}: {p.stderr.read()[-2000:]}"}
            try:
                if page is None:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                        if resp.status == 200:
                            page = time.time() - t0
                # The loading page answers first; the demo is served once its /generate endpoint is listed.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as resp:
                    deps = json.loads(resp.read()).get("dependencies", [])
                    if any(d.get("api_name") == "generate" for d in deps):
                        return {"loading_page_s": page, "ready_s": time.time() - t0,
                                "vm_hwm_ready_gb": _vm_hwm_gb(p.pid)}
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return {"error": f"not ready after {timeout} s"}
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _child_summary(rs: list[dict]) -> dict:
    keys = ("spawn_to_loaded_s", "spawn_to_first_token_s", "spawn_to_16_tokens_s", "import_s", "load_pair_s",
            "first_token_after_load_s")
    out = {k: C.summary([r[k] for r in rs]) for k in keys}
    for k in ("vm_hwm_after_load_gb", "vm_hwm_after_first_token_gb", "vm_hwm_after_16_tokens_gb"):
        out[k] = max(r[k] for r in rs)
    return {**out, "runs": rs}


def run(quick: bool = False, reps: int | None = None, do_cold: bool | None = None, do_app: bool = True,
        engine: str = "auto", threads: int | None = None) -> dict:
    reps = reps or (1 if quick else 3)
    do_cold = (not quick) if do_cold is None else do_cold
    out = {"engine_asked": engine, "threads": threads, "reps": reps}
    if do_cold:
        C.log("[startup] cold start (fresh COLM_CACHE_DIR): child to first token")
        r, nz = C.timed(_fresh_cache, lambda d: _spawn_child(_env(engine, threads, d)))
        out["cold"] = {**r, "noise": nz}
        C.log(f"[startup] cold: loaded {r['spawn_to_loaded_s']:.1f}s, first token {r['spawn_to_first_token_s']:.1f}s, "
              f"VmHWM {r['vm_hwm_after_16_tokens_gb']:.2f} GB, cache {r['cache_gb']:.2f} GB")
        if do_app:
            C.log("[startup] cold start: app.py until the demo is served")
            r, nz = C.timed(_fresh_cache, lambda d: app_start(_env(engine, threads, d), engine, threads))
            out["cold_app"] = {**r, "noise": nz} if r else None
            C.log(f"[startup] cold app: {r}")
    warm, apps = [], []
    for i in range(reps):   # child and app interleaved, so drift hits both alike
        r, nz = C.timed(_spawn_child, _env(engine, threads))
        r["noise"] = nz
        warm.append(r)
        C.log(f"[startup] warm {i}: loaded {r['spawn_to_loaded_s']:.1f}s, first token "
              f"{r['spawn_to_first_token_s']:.1f}s, VmHWM {r['vm_hwm_after_16_tokens_gb']:.2f} GB  "
              f"foreign={nz['foreign_cores']:.2f}")
        if do_app:
            a, nz = C.timed(app_start, _env(engine, threads), engine, threads)
            if a is None:
                do_app = False
                continue
            a["noise"] = nz
            apps.append(a)
            C.log(f"[startup] warm app {i}: {a}")
    out["engine"] = warm[0]["pair"]["engine"]
    out["warm"] = _child_summary(warm)
    ok = [a for a in apps if "ready_s" in a]
    if apps:
        out["app"] = {"loading_page_s": C.summary([a["loading_page_s"] for a in ok if a["loading_page_s"]])
                      if any(a["loading_page_s"] for a in ok) else None,
                      "ready_s": C.summary([a["ready_s"] for a in ok]) if ok else None,
                      "vm_hwm_ready_gb": max((a["vm_hwm_ready_gb"] or 0) for a in ok) if ok else None,
                      "errors": [a["error"] for a in apps if "error" in a], "runs": apps}
    return out


def markdown(res: dict) -> str:
    rows = []
    for name, r in (("cold", res.get("cold")), ("warm (median)", res.get("warm"))):
        if not r:
            continue
        g = (lambda k: r[k]["median"]) if name.startswith("warm") else (lambda k: r[k])
        rows.append(f"| {name} | {g('spawn_to_loaded_s'):.1f} | {g('spawn_to_first_token_s'):.1f} | "
                    f"{g('spawn_to_16_tokens_s'):.1f} | {r['vm_hwm_after_16_tokens_gb']:.2f} |")
    lines = [f"Start-up on {res.get('engine')} ({res['reps']} warm reps):", "",
             "| start | spawn→loaded s | spawn→first token s | spawn→16 tokens s | peak RSS (VmHWM) GB |",
             "|---|---|---|---|---|", *rows]
    app_rows = []
    if res.get("cold_app") and "ready_s" in res["cold_app"]:
        c = res["cold_app"]
        app_rows.append(f"| cold | {c['loading_page_s'] or float('nan'):.1f} | {c['ready_s']:.1f} | "
                        f"{c['vm_hwm_ready_gb'] or float('nan'):.2f} |")
    a = res.get("app")
    if a and a.get("ready_s"):
        lp = a["loading_page_s"]["median"] if a.get("loading_page_s") else float("nan")
        app_rows.append(f"| warm (median) | {lp:.1f} | {a['ready_s']['median']:.1f} | {a['vm_hwm_ready_gb']:.2f} |")
    if app_rows:
        lines += ["", "| app.py | loading page s | demo served s | peak RSS (VmHWM) GB |", "|---|---|---|---|",
                  *app_rows]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 warm rep, no cold start")
    ap.add_argument("--cold", action="store_true", help="include the cold start (default: full run only)")
    ap.add_argument("--no-app", action="store_true")
    ap.add_argument("--reps", type=int, help="warm starts (default 3; quick 1)")
    C.add_engine_args(ap)
    a = ap.parse_args()
    if a.child:
        child()
    else:
        C.apply_gate(a)
        res = run(a.quick, a.reps, True if a.cold else None, not a.no_app, a.engine, a.threads)
        path = C.write_json("startup.json", {"machine": C.machine(), "startup": res})
        print(markdown(res))
        print(f"\n-> {path}")
