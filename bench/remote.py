"""Issue 20: the expert on a loopback llama-server against the same expert in process, in ONE run.

    python bench/remote.py [--tokens 128] [--reps 3] [--threads 2]

Starts the llama-server that tests/llama_server.py builds (same llama.cpp as llama-cpp-python) on the embedded
expert GGUF, then decodes the same prompts with the shipped head on (a) the local llama.cpp pair and (b) the local
base + the server as expert, interleaved, EOS ignored.  Reports tokens/s of each, the tokens both wrote alike, and
the overhead per expert call: (t_remote - t_local) / expert calls (HTTP, JSON, the server's own bookkeeping; both
sides compute the same catch-ups).  Writes bench/out/remote.json and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from colm import cache  # noqa: E402
from colm.decode import CoLLM  # noqa: E402
from colm.engines import load_pair  # noqa: E402
from colm.head import load_head  # noqa: E402

try:
    from . import common as C
except ImportError:
    import common as C

PROMPTS = ["What is a^3 * a^2 if a = 5?",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?"]


def start_server(threads: int, port: int):
    import llama_server
    exe = llama_server.binary() or llama_server.build(log=C.log)
    gguf = cache.ensure_default_gguf(cache.DEFAULT_EXPERT)
    proc = subprocess.Popen([str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t",
                             str(threads), "-np", "1", "-c", "8192", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from conftest import free_port
    proc, url = start_server(a.threads, free_port())
    try:
        local = load_pair(engine="llamacpp", threads=a.threads, n_seq=2, n_ctx=4096)
        head = load_head(local)
        remote_pair = load_pair(engine="llamacpp", threads=a.threads, n_seq=2, n_ctx=4096, expert_url=url,
                                expert_timeout=300)
        decs = {"local": CoLLM(local, head), "remote": CoLLM(remote_pair, head)}
        for d in decs.values():
            d.stop_at_answer = False
            d.eos_ids = []                  # EOS ignored: equal lengths on both sides
            d.generate(PROMPTS[0], max_new_tokens=4).release()
        runs = {k: [] for k in decs}
        for rep in range(a.reps):
            for p in PROMPTS:
                order = list(decs) if rep % 2 == 0 else list(decs)[::-1]
                for name in order:
                    t = time.perf_counter()
                    tr = decs[name].generate(p, max_new_tokens=a.tokens)
                    wall = time.perf_counter() - t
                    runs[name].append({"prompt": PROMPTS.index(p), "wall_s": wall, "tokens": len(tr.steps),
                                       "expert_calls": tr.expert_calls, "token_ids": tr.token_ids})
                    tr.release()
                    C.log(f"[remote] rep {rep} {name:6s} prompt {PROMPTS.index(p)} {wall:6.2f} s "
                          f"{len(tr.steps) / wall:5.1f} tok/s calls {tr.expert_calls}")
        res = {"tokens": a.tokens, "reps": a.reps, "threads": a.threads, "url": url, "runs": runs}
        tps = {k: statistics.median(r["tokens"] / r["wall_s"] for r in v) for k, v in runs.items()}
        over = [(r["wall_s"] - l["wall_s"]) / max(1, r["expert_calls"]) for l, r in zip(runs["local"], runs["remote"])]
        same = [l["token_ids"] == r["token_ids"] for l, r in zip(runs["local"], runs["remote"])]
        res.update({"tokens_per_s": tps, "remote_over_local": tps["remote"] / tps["local"],
                    "overhead_per_expert_call_ms": statistics.median(over) * 1e3, "same_tokens": same})
        path = C.write_json("remote.json", {"machine": C.machine(), "command": "python bench/remote.py " +
                                            " ".join(sys.argv[1:] if argv is None else argv), "remote": res})
        print(f"| expert | Co-LLM tokens/s (median) |\n|---|---|\n| in process (llama.cpp) | {tps['local']:.2f} |\n"
              f"| loopback llama-server | {tps['remote']:.2f} |\n\nremote / local {res['remote_over_local']:.3f}; "
              f"overhead per expert call {res['overhead_per_expert_call_ms']:.1f} ms (median); same tokens in "
              f"{sum(same)}/{len(same)} answers\n\n-> {path}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
