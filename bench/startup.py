"""Item 6: start-up time and memory, each measured in a fresh subprocess.

  cold   COLM_CACHE_DIR = a new temporary directory: assemble the GGUF chunks, verify, dequantise, save the
         safetensors cache, then load both models.  The directory is deleted afterwards.  (The chunk files are
         probably in the OS page cache from earlier runs, so this is "cold cache", not "cold disk".)
  warm   load_pair() from the existing cache (~/.cache/colm or $COLM_CACHE_DIR).
  app    `python app.py --port P` until GET / answers (the app loads the pair before it serves), if app.py exists.
  RSS    ru_maxrss of the warm child after load_pair, and after a 16-token Co-LLM decode (both models active).
         The safetensors weights are memory-mapped, so RSS after load_pair is small; the pages come in on the first
         forward passes, which is why the first decode is timed too.

Times are from the parent's spawn to the child's "ready" stamp, so interpreter start and imports are included.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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


def _vm_hwm_kb() -> int:
    """Peak RSS of this address space.  Unlike ru_maxrss it starts afresh at exec: Linux carries ru_maxrss
    over from the forking parent, so a child of a process that once held more reports the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child() -> None:
    """Runs inside the subprocess: load, stamp, decode a few tokens, report JSON on stdout."""
    t0 = time.time()
    marks = []
    import torch
    if os.environ.get("COLM_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["COLM_BENCH_THREADS"]))
    from colm.engines import load_pair
    t_import = time.time()
    pair = load_pair(progress=lambda m: marks.append((round(time.time() - t0, 2), m)))
    t_ready = time.time()
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_load = _vm_hwm_kb()
    from colm.decode import CoLLM, Policy
    from colm.data import DEFAULT_DATA, messages, read_jsonl
    dec = CoLLM(pair)
    t_gen = time.time()
    dec.generate(messages(read_jsonl(DEFAULT_DATA)[0].question), policy=Policy("random", rate=0.2, seed=0),
                 max_new_tokens=16)
    rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_gen = _vm_hwm_kb()
    first_decode = time.time() - t_gen
    print(json.dumps({"t_start": t0, "import_s": t_import - t0, "load_pair_s": t_ready - t_import, "t_ready": t_ready,
                      "first_decode_16_tokens_s": first_decode,
                      "stages": marks, "rss_after_load_gb": rss_load / 2**20, "rss_after_decode_gb": rss_gen / 2**20,
                      "vm_hwm_after_load_gb": hwm_load / 2**20, "vm_hwm_after_decode_gb": hwm_gen / 2**20,
                      "dtype": str(pair.base.dtype)}))


def _spawn_child(env=None) -> dict:
    import torch
    env = {**(env or os.environ), "COLM_BENCH_THREADS": str(torch.get_num_threads())}
    t_spawn = time.time()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], capture_output=True, text=True,
                       env=env, cwd=C.ROOT, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"startup child failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["spawn_to_ready_s"] = r["t_ready"] - t_spawn
    r["interpreter_start_s"] = r["t_start"] - t_spawn
    return r


def cold() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="colm-cold-"))
    try:
        env = {**os.environ, "COLM_CACHE_DIR": str(tmp)}
        r, nz = C.timed(_spawn_child, env)
        r["noise"] = nz
        r["cache_gb"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**30
        return r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_ready(timeout: float = 180.0) -> dict | None:
    app = C.ROOT / "app.py"
    if not app.exists():
        return None
    port = _free_port()
    t0 = time.time()
    p = subprocess.Popen([sys.executable, str(app), "--port", str(port)], cwd=C.ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                return {"error": f"app.py exited with {p.returncode}: {p.stderr.read()[-2000:]}"}
            try:
                # The loading page answers first; the demo is ready once its /generate endpoint is listed.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as resp:
                    deps = json.loads(resp.read()).get("dependencies", [])
                    if any(d.get("api_name") == "generate" for d in deps):
                        return {"ready_s": time.time() - t0, "port": port}
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        return {"error": f"not ready after {timeout} s"}
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(quick: bool = False, reps: int | None = None, do_cold: bool | None = None, do_app: bool = True) -> dict:
    reps = reps or (1 if quick else 3)
    do_cold = (not quick) if do_cold is None else do_cold
    out = {}
    if do_cold:
        C.log("[startup] cold start (fresh COLM_CACHE_DIR)")
        out["cold"] = cold()
        C.log(f"[startup] cold: {out['cold']['spawn_to_ready_s']:.1f}s")
    warm = []
    for i in range(reps):
        r, nz = C.timed(_spawn_child)
        r["noise"] = nz
        warm.append(r)
        C.log(f"[startup] warm {i}: {r['spawn_to_ready_s']:.1f}s  rss {r['rss_after_decode_gb']:.2f} GB")
    out["warm"] = {"spawn_to_ready_s": C.summary([r["spawn_to_ready_s"] for r in warm]),
                   "load_pair_s": C.summary([r["load_pair_s"] for r in warm]),
                   "import_s": C.summary([r["import_s"] for r in warm]),
                   "first_decode_16_tokens_s": C.summary([r["first_decode_16_tokens_s"] for r in warm]),
                   "rss_after_load_gb": max(r["rss_after_load_gb"] for r in warm),
                   "rss_after_decode_gb": max(r["rss_after_decode_gb"] for r in warm),
                   "vm_hwm_after_decode_gb": max(r["vm_hwm_after_decode_gb"] for r in warm),
                   "parent_ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "runs": warm}
    if do_app:
        C.log("[startup] app.py until it serves")
        out["app"] = app_ready()
        if out["app"]:
            C.log(f"[startup] app: {out['app']}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cold", action="store_true", help="include the cold start (default: full run only)")
    ap.add_argument("--no-app", action="store_true")
    ap.add_argument("--reps", type=int)
    a = ap.parse_args()
    if a.child:
        child()
    else:
        res = run(a.quick, a.reps, True if a.cold else None, not a.no_app)
        print(C.write_json("startup.json", {"machine": C.machine(), "startup": res}))
