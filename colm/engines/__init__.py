"""The model side behind one small interface: the decoder, training and evaluation never see torch or llama.cpp.

An engine runs one causal LM and holds one KV cache per *row* (a sequence being decoded).  Rows live in a
``Rows`` handle, opened for a batch and closed when done; each row has its own length (tokens its cache holds).

    rows = engine.open(B)                       B empty rows
    out  = engine.feed(rows, tokens, keep, hidden)
           tokens: list of B token lists, ragged; [] leaves a row as it is
           -> Out.logits[b]  [keep[b], V] fp32: next-token logits at row b's last keep[b] new positions
              Out.hidden     [B, H] fp32: final (post-norm) hidden state at each fed row's last position
    engine.crop(rows, lengths)                  row b forgets everything past its first lengths[b] tokens
    engine.close(rows)                          rows gone (their slots/cache freed)
    engine.score(seqs, at, hidden, reduce)      teacher forcing on whole sequences (features, thresholds)

"Crop to t and continue" is the one primitive behind re-decode, branching and backtracking: crop row b to t
tokens, then feed what comes next; the result must equal a decode of the same tokens from scratch (tests/
test_reference.py checks this on every engine).  V is the tokenizer's vocabulary (a checkpoint's padded embedding
rows are never real tokens), H the hidden size.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..models import ColmError

ENGINES = ("auto", "torch", "llamacpp")


class Interrupted(ColmError):
    """An engine abandoned a call in flight because the decode was stopped (see ``watch``); nothing was fed."""


@dataclass
class Out:
    logits: list            # per row: [keep_b, V] fp32 tensor, or None for a row that was not fed
    hidden: torch.Tensor | None   # [B, H] fp32 at each fed row's last position (rows not fed: zeros)
    topk: list | None = None      # per row: (probs [keep_b, k], ids [keep_b, k]) from an engine that returns only
                                  # a top-k (a remote server), or None

    def top(self, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's top-k (probs [keep_b, k], ids [keep_b, k]), best first, from whichever the engine returned."""
        if self.topk is not None and self.topk[b] is not None:
            probs, ids = self.topk[b]
            return probs[:, :k], ids[:, :k]
        return topk_probs(self.logits[b], k)


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (probs [..., k], ids [..., k]) without materialising a full softmax."""
    logits = logits.float()
    vals, ids = logits.topk(k, dim=-1)
    return (vals - logits.logsumexp(-1, keepdim=True)).exp(), ids


class Rows(Protocol):
    lengths: list[int]      # tokens held by each row's cache


class Engine(Protocol):
    name: str               # "torch" | "llamacpp"
    n_vocab: int            # V: the tokenizer's vocabulary
    hidden_size: int        # H
    n_ctx: int              # the most tokens one row may hold
    shared_cache: bool      # rows share one padded cache: feeding one row costs a column for every row
    cheap_logits: bool      # logits at more positions of a feed cost next to nothing (memory-bound kernels)

    def open(self, n: int) -> Rows: ...
    def feed(self, rows: Rows, tokens: Sequence[Sequence[int]], keep: Sequence[int] | int = 1,
             hidden: bool = False) -> Out: ...
    def crop(self, rows: Rows, lengths: Sequence[int]) -> None: ...
    def close(self, rows: Rows) -> None: ...
    def score(self, seqs: Sequence[Sequence[int]], at: Sequence[Sequence[int]], hidden: bool,
              reduce: Callable[[torch.Tensor, int], dict]) -> tuple[dict, torch.Tensor | None]: ...


def check_feed(engine, rows, tokens, keep) -> list[int]:
    """Validate a feed before it reaches a backend (llama.cpp aborts the process on some misuse): one token list
    per row, ids inside the vocabulary, keep within what is fed, lengths within the context.  -> keep per row."""
    if len(tokens) != len(rows.lengths):
        raise ColmError(f"feed got {len(tokens)} token lists for {len(rows.lengths)} rows")
    keep = [keep] * len(tokens) if isinstance(keep, int) else list(keep)
    for b, (t, k) in enumerate(zip(tokens, keep)):
        if t and not 0 < k <= len(t):
            raise ColmError(f"row {b}: keep={k} outside 1..{len(t)} new tokens")
        if any(not 0 <= int(x) < engine.n_vocab for x in t):
            raise ColmError(f"row {b}: token id outside the vocabulary of {engine.n_vocab}")
        if rows.lengths[b] + len(t) > engine.n_ctx:
            raise ColmError(f"the answer needs {rows.lengths[b] + len(t)} tokens of context; this engine holds "
                            f"{engine.n_ctx} per sequence (ask for fewer new tokens or a shorter prompt)")
    return keep


def check_crop(rows, lengths) -> None:
    if len(lengths) != len(rows.lengths) or any(not 0 <= n <= have for n, have in zip(lengths, rows.lengths)):
        raise ColmError(f"cannot crop rows of lengths {rows.lengths} to {list(lengths)}")


def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:   # ImportError, or a shared library that fails to load (OSError)
        return False


def resolve(name: str | None, device: str | None = "auto", sources: Sequence[str] = ("default",)) -> str:
    """'auto': llama.cpp on a CPU when it imports and every model is a GGUF ('default' or a .gguf path); torch on a
    GPU, for model directories and hub ids, or when llama.cpp is missing."""
    name = name or "auto"
    if name not in ENGINES:
        raise ColmError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name != "auto":
        if name == "llamacpp" and not llamacpp_available():
            raise ColmError("the llamacpp engine needs llama-cpp-python (pip install -r requirements.txt builds it)")
        return name
    if device and device.startswith("cuda"):
        return "torch"
    if device in (None, "auto") and torch.cuda.is_available():
        return "torch"
    if not all(s == "default" or str(s).endswith(".gguf") for s in sources):
        return "torch"
    return "llamacpp" if llamacpp_available() else "torch"


# ----------------------------------------------------------------------------------------------- pairs
@dataclass
class Pair:
    """A base and an expert behind engines of one kind, and their shared tokenizer."""
    base: Engine
    expert: Engine
    tokenizer: object
    base_id: str
    expert_id: str

    @property
    def engine(self) -> str:
        return self.base.name

    @property
    def device(self) -> torch.device:
        return getattr(self.base, "device", torch.device("cpu"))

    def describe(self) -> dict:
        return {"engine": self.engine, "base_model": self.base_id, "expert_model": self.expert_id,
                "threads": getattr(self.base, "threads", None)}


def load_pair(base: str = "default", expert: str = "default", engine: str = "auto", dtype: str | None = "auto",
              device: str | None = "auto", threads: int | None = None, trust_remote_code: bool = False,
              progress=None, expert_url: str | None = None, expert_api: str = "llama-server",
              expert_api_key: str | None = None, expert_timeout: float = 60.0, **engine_kwargs) -> Pair:
    """Load base, expert and their shared tokenizer on the chosen engine; refuse pairs whose tokenizers differ.

    ``engine``: 'auto' (llama.cpp on a CPU when installed, torch on a GPU), 'torch' or 'llamacpp'.
    ``threads``: CPU threads (default: every core).  ``engine_kwargs`` go to the llama.cpp engine (n_ctx, n_seq).
    ``expert_url``: the expert is a server (``expert_api``: llama-server, vllm or sglang; colm.engines.remote) and
    ``expert`` is not loaded; the server must share the base's vocabulary (checked on connect).
    """
    from .. import cache, models
    kind = resolve(engine, device, (base,) if expert_url else (base, expert))
    threads = threads or default_threads()
    ident = lambda src, role: ((cache.DEFAULT_BASE if role == "base" else cache.DEFAULT_EXPERT).name
                               if src == "default" else src)

    def remote(tok):
        from .remote import RemoteEngine
        if progress:
            progress(f"connecting to the expert server ({expert_api} at {expert_url})")
        e = RemoteEngine(expert_url, expert_api, tok, len(tok), api_key=expert_api_key, timeout=expert_timeout)
        return e, e.model or e.describe()

    if kind == "torch":
        from .torch_engine import TorchEngine
        torch.set_num_threads(threads)
        base_tok = models.load_tokenizer(base, progress, trust_remote_code)
        b = models.load_model(base, "base", dtype, device, trust_remote_code, progress)
        n_vocab = len(base_tok)
        if expert_url:
            e, e_id = remote(base_tok)
            return Pair(TorchEngine(b, n_vocab, threads), e, base_tok, ident(base, "base"), e_id)
        expert_tok = base_tok if expert == base else models.load_tokenizer(expert, progress, trust_remote_code)
        e = models.load_model(expert, "expert", dtype, device, trust_remote_code, progress)
        models.check_compatible(b, e, base_tok, expert_tok)
        return Pair(TorchEngine(b, n_vocab, threads), TorchEngine(e, n_vocab, threads), base_tok,
                    ident(base, "base"), ident(expert, "expert"))
    from .llamacpp import LlamaCppEngine, gguf_path
    # Beside llama.cpp, torch only does per-token vector math (top-k, the head: < 1 ms on one thread).  Its own
    # thread pool would spin against llama.cpp's for the same cores: 0.7 ms became 36-48 ms on 2 busy cores.
    torch.set_num_threads(1)
    base_path = gguf_path(base, "base", progress)     # refuse non-GGUF at once
    expert_path = None if expert_url else gguf_path(expert, "expert", progress)
    tok = models.load_tokenizer(base, progress, trust_remote_code)
    n_vocab = len(tok)
    if expert_url:
        e, e_id = remote(tok)      # connect (and check the vocabulary) before the base takes a minute to load
        return Pair(LlamaCppEngine(base_path, n_vocab, threads, role="base", **engine_kwargs), e, tok,
                    ident(base, "base"), e_id)
    expert_tok = tok if expert == base else models.load_tokenizer(expert, progress, trust_remote_code)
    models.check_same_vocab(tok, expert_tok)     # each engine checks its model's rows against the tokenizer
    # llama.cpp reads and repacks a model without the GIL: the expert loads beside the base.  If the base fails,
    # leaving the pool still waits for the expert's load, so none is left running.
    with ThreadPoolExecutor(1, thread_name_prefix="colm-load-expert") as pool:
        pending = pool.submit(LlamaCppEngine, expert_path, n_vocab, threads, role="expert", **engine_kwargs)
        b = LlamaCppEngine(base_path, n_vocab, threads, role="base", **engine_kwargs)
        e = pending.result()
    return Pair(b, e, tok, ident(base, "base"), ident(expert, "expert"))
