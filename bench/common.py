"""Shared pieces of the benchmark scripts: machine facts, noise monitor, timing summaries, prompts, heads and the
raw (record-free) step loops that give the cost-model step times.

Nothing here is a test: the scripts measure and write JSON under bench/out/, they never assert a speed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

OUT = ROOT / "bench" / "out"
HEAD_PATH = ROOT / "assets" / "head-gsm8k.safetensors"


# ----------------------------------------------------------------------------------------------- machine / noise
def _lscpu() -> dict:
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in txt.splitlines()) if v}


def machine() -> dict:
    import transformers
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except Exception:
        llama_version = None
    cpu = _lscpu()
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "colm", "bench"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", None
    flags = cpu.get("Flags", "")
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": cpu.get("CPU(s)", str(os.cpu_count())),
        "cores_per_socket": cpu.get("Core(s) per socket"), "threads_per_core": cpu.get("Thread(s) per core"),
        "bf16_flags": [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()],
        "mem_gb": mem_gb, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "llama_cpp_python": llama_version,
        "git": commit + ("+dirty" if dirty else ""), "loadavg_start": os.getloadavg(),
    }


def _proc_stat() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Noise:
    """Measures, over a block, how many CPU cores *other* processes kept busy (and hypervisor steal).

    ``foreign_cores`` near 0 means we had the machine to ourselves; 1.0 on a 2-core box means half of it was gone.
    """

    def __enter__(self):
        self.t, self.own, (self.busy, self.steal) = time.perf_counter(), _own_cpu(), _proc_stat()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        busy, steal = _proc_stat()
        own = _own_cpu() - self.own
        self.result = {"wall_s": round(wall, 3), "own_cpu_s": round(own, 3),
                       "foreign_cores": round(max(0.0, (busy - self.busy) - own) / wall, 3) if wall else 0.0,
                       "steal_cores": round((steal - self.steal) / wall, 3) if wall else 0.0}
        return False


def wait_quiet(threshold: float = 0.3, window: float = 1.0, max_wait: float = 30.0) -> dict:
    """Wait (at most ``max_wait`` s) until other processes use fewer than ``threshold`` cores over ``window`` s,
    so a timed block does not start in the middle of someone else's burst.  Returns what it saw."""
    t0 = time.perf_counter()
    while True:
        with Noise() as nz:
            time.sleep(window)
        waited = time.perf_counter() - t0
        if nz.result["foreign_cores"] < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "foreign_cores_before": nz.result["foreign_cores"]}


GATE = {"on": True, "threshold": 0.3, "max_wait": 20.0}


def timed(fn, *a, **k):
    """Run ``fn`` once after the quiet gate; returns (its result, noise record)."""
    gate = wait_quiet(GATE["threshold"], 0.5, GATE["max_wait"]) if GATE["on"] else None
    with Noise() as nz:
        r = fn(*a, **k)
    return r, {**nz.result, "gate": gate}


# ----------------------------------------------------------------------------------------------- numbers
def summary(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "spread": (max(xs) - min(xs)) / statistics.median(xs) if statistics.median(xs) else 0.0,
            "runs": [round(x, 6) for x in xs]}


def med(xs) -> float:
    return statistics.median(xs)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


# ----------------------------------------------------------------------------------------------- models / prompts
def load(engine: str = "auto", threads: int | None = None, **engine_kwargs):
    """The default pair on ``engine`` ('auto', 'torch', 'llamacpp') with ``threads`` CPU threads (default: every
    core) -> (pair, load seconds).  ``engine_kwargs`` (n_ctx, n_seq) reach the llama.cpp engine only; by default
    it gets 16 rows, so the batch benchmarks can run 16 prompts at once."""
    from colm.engines import load_pair
    engine_kwargs.setdefault("n_seq", 16)
    t = time.perf_counter()
    pair = load_pair(engine=engine, threads=threads, **engine_kwargs)
    return pair, time.perf_counter() - t


def use(pair) -> None:
    """Set torch's (process-wide) thread count to what ``load_pair`` gives this pair's engine: the pair's threads on
    torch, 1 beside llama.cpp (torch then does only per-token vector math).  Needed when one process holds pairs of
    both engines: the last ``load_pair`` would otherwise decide for both."""
    torch.set_num_threads(pair.base.threads if pair.engine == "torch" and pair.base.threads else 1)


def describe(pair) -> dict:
    """What a result was measured on: engine, threads, models (and the torch dtype)."""
    d = pair.describe()
    model = getattr(pair.base, "model", None)
    if pair.engine == "torch" and model is not None:
        d["dtype"] = str(model.dtype)
        d["attn"] = getattr(model.config, "_attn_implementation", None)
    return d


def prompts(n: int, start: int = 0) -> list[list[dict]]:
    """GSM8K-style chat prompts (the shared instruction), the first ``n`` from the default data file."""
    from colm.data import DEFAULT_DATA, messages, read_jsonl
    ex = read_jsonl(DEFAULT_DATA)
    return [messages(e.question) for e in ex[start:start + n]]


def decoder(pair, head=None, eos: bool = False):
    """A CoLLM; with ``eos=False`` end-of-sequence is ignored so every run yields exactly max_new_tokens."""
    from colm.decode import CoLLM
    dec = CoLLM(pair, head)
    if not eos:
        dec.eos_ids = []
    return dec


def learned_head(pair):
    """The shipped head, if one exists yet (else None)."""
    if not HEAD_PATH.exists():
        return None
    from colm.head import DeferralHead
    return DeferralHead.load(HEAD_PATH, pair.base, pair.base_id)


@torch.inference_mode()
def random_head(pair, prompt_ids: list[int], seed: int = 0, logit_std: float = 2.0, n_probe: int = 48):
    """A head with random weights whose logit has std ``logit_std`` on real hidden states (so p_defer varies
    instead of saturating at 0/1).  Returns (head, sorted p_defer values on a greedy base continuation).

    The probe states are the base's final hidden states the decoder would see: after the prompt and after each of
    ``n_probe`` greedy tokens (engine API: one row, the prompt fed, then one token a step, hidden=True)."""
    from colm.head import DeferralHead
    base = pair.base
    H = base.hidden_size
    g = torch.Generator().manual_seed(seed)
    head = DeferralHead(H, {"name": f"random head (seed {seed})", "trained": False})
    w = torch.randn(1, H, generator=g)
    rows = base.open(1)
    try:
        out = base.feed(rows, [list(prompt_ids)], keep=1, hidden=True)
        hs = [out.hidden[0].clone()]
        for _ in range(n_probe):
            out = base.feed(rows, [[int(out.logits[0][-1].argmax())]], keep=1, hidden=True)
            hs.append(out.hidden[0].clone())
    finally:
        base.close(rows)
    h = torch.stack(hs).float().cpu()
    z = h @ w[0]
    w = w * (logit_std / z.std().clamp_min(1e-6))
    with torch.no_grad():
        head.linear.weight.copy_(w)
        head.linear.bias.fill_(float(-(h @ w[0]).mean()))
    head.to(pair.device)
    p = head.p_defer(h.to(pair.device)).cpu().sort().values
    return head, p.tolist()


# ----------------------------------------------------------------------------------------------- raw step loops
@torch.inference_mode()
def raw_decode(engine, prompt_ids: list[int], n: int, hidden: bool = False) -> dict:
    """Greedy decode with nothing but engine calls and an argmax: the per-token step time of one model with its KV
    cache, averaged over the same context lengths a real n-token answer covers (calls as in ``greedy_stepper``).
    Pass ``hidden=True`` for the base (the decoder asks it for the hidden state every step), False for the expert.
    """
    step = greedy_stepper(engine, prompt_ids, hidden)
    try:
        t0 = time.perf_counter()
        logits = step(None)
        t1 = time.perf_counter()
        toks = []
        for _ in range(n - 1):
            tok = int(logits.argmax())
            toks.append(tok)
            logits = step(tok)
        toks.append(int(logits.argmax()))
        t2 = time.perf_counter()
    finally:
        step.close()
    return {"prefill_s": t1 - t0, "step_s": (t2 - t1) / max(1, n - 1), "total_s": t2 - t0, "tokens": toks}


def greedy_stepper(engine, prompt_ids: list[int], hidden: bool = False) -> "GreedyStepper":
    return GreedyStepper(engine, prompt_ids, hidden)


class GreedyStepper:
    """``step(None)`` prefills the prompt, ``step(tok)`` feeds one token id; each returns the last logits [V].
    ``step.close()`` frees the engine row.

    ``hidden=True`` calls the engine the way Co-LLM's base step does (the final hidden state returned too);
    ``hidden=False`` the way a one-token expert catch-up does.
    """

    def __init__(self, engine, prompt_ids: list[int], hidden: bool = False):
        self.engine, self.prompt, self.hidden = engine, list(prompt_ids), hidden
        self.rows = engine.open(1)

    @torch.inference_mode()
    def __call__(self, tok):
        toks = self.prompt if tok is None else [int(tok)]
        return self.engine.feed(self.rows, [toks], keep=1, hidden=self.hidden).logits[0][-1]

    def close(self) -> None:
        if self.rows is not None:
            self.engine.close(self.rows)
            self.rows = None


def add_engine_args(ap, engines: bool = False) -> None:
    """--engine (or --engines) and --threads, as every script takes them, plus --no-gate."""
    if engines:
        ap.add_argument("--engines", default="torch,llamacpp", help="comma-separated: torch, llamacpp")
    else:
        ap.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    ap.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    ap.add_argument("--no-gate", action="store_true", help="do not wait for a quiet moment before timed blocks")


def apply_gate(a) -> None:
    """--no-gate, and the gate's threshold: quiet enough = the cores this run uses are free (other processes use
    at most the rest, plus a little)."""
    GATE["on"] = not getattr(a, "no_gate", False)
    threads = getattr(a, "threads", None) or len(os.sched_getaffinity(0))
    GATE["threshold"] = max(0.3, (os.cpu_count() or 1) - threads + 0.3)


def script_main(name: str, key: str, run) -> None:
    """The shared ``__main__`` of the suite's scripts: --quick/--tokens/--reps/--engine/--threads, load the default
    pair, run, write bench/out/<name>.json and print its path."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--reps", type=int)
    add_engine_args(ap)
    a = ap.parse_args()
    apply_gate(a)
    pair, load_s = load(a.engine, a.threads)
    res = run(pair, a.quick, a.tokens, a.reps)
    print(write_json(f"{name}.json", {"machine": machine(), "pair": describe(pair), "load_pair_s": load_s,
                                      key: res}))
