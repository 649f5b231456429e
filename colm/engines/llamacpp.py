"""llama-cpp-python's low-level API on the same GGUF files: the fast default on a CPU.

A row is a llama.cpp sequence id in one context whose KV cells all rows share (``kv_unified``), so one
``llama_decode`` serves every row of a batch, rows of different lengths need no padding, and a crop is
``llama_memory_seq_rm`` on that sequence.  The number of sequences is fixed when the context is made: rows are
slots, taken by ``open`` and given back by ``close``; when none is left ``open`` raises ``SlotsExhausted``.

The hidden state: with embeddings on and no pooling llama.cpp returns the final post-norm hidden state, but then
*every* token of a batch becomes an output (full-vocabulary logits for each prompt token), so embeddings are
switched on only for the last token of a feed that asks for it.  llama.cpp aborts the process on some misuse
(a token id past the vocabulary, a position past the context), so every size is checked before a call.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import ColmError
from . import Out, check_crop, check_feed


class SlotsExhausted(ColmError):
    """Every sequence slot of the engine is in use."""


class ContextFull(ColmError):
    """The KV cells the rows share are all taken."""


@dataclass
class LlamaRows:
    slots: list[int]
    lengths: list[int] = field(default_factory=list)


_backend_lock = threading.Lock()
_backend_ready = False
_log_callback = None   # kept referenced: llama.cpp calls it for as long as the process lives


AMX_WARNING = ("this llama-cpp-python was built with llama.cpp's AMX kernels, which died with 'Illegal instruction' "
               "at the first token on a Xeon VM that advertises AMX: colm runs it without llama.cpp's extra weight "
               "layouts (no AMX, no repacking). README's Quick start says how to rebuild it.")


def amx_built(L) -> bool:
    """Whether this llama.cpp has the AMX kernels in: requirements.txt builds it without them on x86-64, but pip's
    wheel cache reuses an older build whatever the flags.  Their SIGILL kills the process with no Python error."""
    return b"AMX_INT8 = 1" in L.llama_print_system_info()


def _init_backend(verbose: bool = False) -> None:
    global _backend_ready, _log_callback
    import llama_cpp as L
    with _backend_lock:
        if _backend_ready:
            return
        L.llama_backend_init()
        if amx_built(L):
            warnings.warn(AMX_WARNING, RuntimeWarning, stacklevel=3)
        if not verbose:
            _log_callback = L.llama_log_callback(lambda level, text, data: None)
            L.llama_log_set(_log_callback, ctypes.c_void_p())
        _backend_ready = True


def gguf_path(source: str, role: str, progress=None) -> Path:
    """The .gguf file a source names: the embedded default (assembled, verified and kept in the cache) or a path."""
    from .. import cache
    if source == "default":
        return cache.ensure_default_gguf(cache.DEFAULT_BASE if role == "base" else cache.DEFAULT_EXPERT, progress)
    p = Path(source)
    if p.suffix != ".gguf":
        raise ColmError(f"the llamacpp engine runs GGUF files: pass 'default' or a .gguf as the {role} "
                        f"(got {source!r}), or choose --engine torch")
    if not p.is_file():
        raise ColmError(f"GGUF file not found: {source}")
    return p


class LlamaCppEngine:
    name = "llamacpp"
    shared_cache = False    # a row is its own sequence: rows are fed (and cropped) alone
    cheap_logits = False    # quantised CPU kernels are compute-bound: each extra LM-head row costs ~1/10 of a step

    def __init__(self, path: str | Path, n_vocab: int, threads: int = 1, role: str = "model", n_ctx: int = 8192,
                 n_seq: int = 8, n_batch: int = 512, verbose: bool = False):
        """n_ctx: KV cells shared by all rows; n_seq: rows that may be open at once; n_batch: tokens a call."""
        import llama_cpp as L
        self.L, self.role, self.path, self.threads, self.n_vocab = L, role, Path(path), threads, n_vocab
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ColmError(f"{self.path} is not a GGUF file (no GGUF magic); the llamacpp engine reads .gguf")
        _init_backend(verbose)
        mp = L.llama_model_default_params()
        # Read the file, do not map it: llama.cpp repacks most quantised weights into an interleaved copy of its
        # own, and the mapped pages it read them from stay mapped and counted (0.59 GB more RSS for the expert).
        mp.load_mode = L.LLAMA_LOAD_MODE_NONE
        # The AMX kernels run only on weights placed in their "extra" buffer type: without those, no AMX (and no
        # repacking either), so an older build runs where AMX would die (at the same speed on cpu-2: BENCHMARKS).
        mp.use_extra_bufts = not amx_built(L)
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise ColmError(f"llama.cpp could not load {self.path} as the {role} model (unsupported or damaged GGUF)")
        vocab = L.llama_model_get_vocab(self.model)
        self.model_vocab = L.llama_vocab_n_tokens(vocab)
        if self.model_vocab < n_vocab:
            L.llama_model_free(self.model)
            self.model = None       # freed: __del__ must not free it again
            raise ColmError(f"{self.path}: the model has {self.model_vocab} token rows but the tokenizer has "
                            f"{n_vocab} tokens: another vocabulary")
        self.hidden_size = L.llama_model_n_embd(self.model)
        self.n_ctx_total = int(n_ctx)
        self.n_ctx = min(self.n_ctx_total, L.llama_model_n_ctx_train(self.model))
        self.n_seq, self.n_batch = int(n_seq), int(n_batch)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = self.n_ctx_total, self.n_batch, self.n_batch, self.n_seq
        cp.n_threads = cp.n_threads_batch = int(threads)
        cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        cp.kv_unified = True          # every row may use any cell: one long answer or many short ones
        # Flash attention's CPU kernel accumulates in f16 over the shared cells in chunks, so a row's logits moved by
        # up to 0.3 when other rows held cells (P(top) 0.33 -> 0.31 at a first token): answers depended on other
        # sessions.  Without it a row's numbers are exactly its own, at the same speed here.
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.embeddings = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None
            raise ColmError(f"llama.cpp could not make a context of {self.n_ctx_total} tokens for {self.path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._embeddings = False
        self._free = list(range(self.n_seq))
        self._lock = threading.Lock()     # slots; a decode call is the caller's to serialise (one per engine)
        self._used = {}                   # slot -> cells held

    def __del__(self):
        L = getattr(self, "L", None)
        try:
            if getattr(self, "batch", None) is not None:
                L.llama_batch_free(self.batch)
            if getattr(self, "ctx", None):
                L.llama_free(self.ctx)
            if getattr(self, "model", None):
                L.llama_model_free(self.model)
        except Exception:
            pass
        # A garbage cycle may free this engine before a DecodeState that still holds its rows: that state's
        # close() must then find nothing to free, not a dangling context (a segfault).
        self.batch = self.ctx = self.mem = self.model = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- rows ---------------------------------------------------------------------------------------------
    def open(self, n: int) -> LlamaRows:
        with self._lock:
            if n > len(self._free):
                raise SlotsExhausted(f"all {self.n_seq} sequence slots of the {self.role} engine are in use "
                                     f"({n} wanted, {len(self._free)} free); try again when a decode finishes")
            slots, self._free = self._free[:n], self._free[n:]
        for s in slots:
            self.L.llama_memory_seq_rm(self.mem, s, -1, -1)
            self._used[s] = 0
        return LlamaRows(slots, [0] * n)

    def close(self, rows: LlamaRows) -> None:
        if getattr(self, "ctx", None) is None:       # the engine itself is already freed
            rows.slots, rows.lengths = [], []
            return
        with self._lock:
            for s in rows.slots:
                if s in self._used:
                    self.L.llama_memory_seq_rm(self.mem, s, -1, -1)
                    del self._used[s]
                    self._free.append(s)
            rows.slots, rows.lengths = [], []

    def crop(self, rows: LlamaRows, lengths) -> None:
        check_crop(rows, lengths)
        for b, (s, n) in enumerate(zip(rows.slots, lengths)):
            if n < rows.lengths[b]:
                self.L.llama_memory_seq_rm(self.mem, s, n, -1)
                rows.lengths[b] = self._used[s] = n

    # -- compute ------------------------------------------------------------------------------------------
    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings:
            self.L.llama_set_embeddings(self.ctx, on)
            self._embeddings = on

    def _decode(self, items: list, embeddings: bool) -> dict:
        """items: (slot, position, token, key or None).  One llama_decode per n_batch items; returns
        {key: (logits [V] fp32, hidden [H] fp32 or None)} for the items with a key (outputs)."""
        L, out = self.L, {}
        self._set_embeddings(embeddings)
        for s in range(0, len(items), self.n_batch):
            chunk = items[s:s + self.n_batch]
            bt = self.batch
            bt.n_tokens = len(chunk)
            for i, (slot, pos, tok, key) in enumerate(chunk):
                bt.token[i], bt.pos[i], bt.n_seq_id[i] = tok, pos, 1
                bt.seq_id[i][0] = slot
                bt.logits[i] = 1 if (key is not None or embeddings) else 0
            rc = L.llama_decode(self.ctx, bt)
            if rc != 0:
                raise ColmError(f"llama.cpp decode failed on the {self.role} model (code {rc}"
                                f"{': no room left in its context' if rc == 1 else ''})")
            for i, (_, _, _, key) in enumerate(chunk):
                if key is None:
                    continue
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.model_vocab,))
                hid = None
                if embeddings:
                    hid = torch.from_numpy(np.ctypeslib.as_array(L.llama_get_embeddings_ith(self.ctx, i),
                                                                 shape=(self.hidden_size,)).copy())
                out[key] = (torch.from_numpy(logits[:self.n_vocab].copy()), hid)
        return out

    def _check_room(self, rows: LlamaRows, tokens) -> None:
        need = sum(self._used.values()) + sum(map(len, tokens))
        if need > self.n_ctx_total:
            raise ContextFull(f"the {self.role} engine's context is full ({need} > {self.n_ctx_total} tokens over all "
                            "open rows); ask for fewer new tokens, a smaller batch, or a larger n_ctx")

    def feed(self, rows: LlamaRows, tokens, keep=1, hidden: bool = False) -> Out:
        """tokens: B lists (ragged) -> Out(logits [keep_b, V] per fed row, hidden [B, H] if asked)."""
        keep = check_feed(self, rows, tokens, keep)
        self._check_room(rows, tokens)
        head, tail = [], []   # with ``hidden`` the last token of each row goes in a second call, embeddings on
        for b, (s, t, k) in enumerate(zip(rows.slots, tokens, keep)):
            n0, n = rows.lengths[b], len(t)
            for j, tok in enumerate(t):
                key = (b, j - (n - k)) if j >= n - k else None
                (tail if hidden and j == n - 1 else head).append((s, n0 + j, int(tok), key))
        got = self._decode(head, embeddings=False) if head else {}
        if tail:
            got.update(self._decode(tail, embeddings=True))
        for b, (s, t) in enumerate(zip(rows.slots, tokens)):
            rows.lengths[b] += len(t)
            self._used[s] = rows.lengths[b]
        logits = [torch.stack([got[(b, i)][0] for i in range(k)]) if t else None
                  for b, (t, k) in enumerate(zip(tokens, keep))]
        hid = None
        if hidden:
            hid = torch.zeros(len(tokens), self.hidden_size)
            for b, (t, k) in enumerate(zip(tokens, keep)):
                if t:
                    hid[b] = got[(b, k - 1)][1]
        return Out(logits, hid)

    def score(self, seqs, at, hidden: bool, reduce, chunk: int = 256):
        """Teacher forcing, one sequence at a time in a temporary row.  seqs: token lists; at: per sequence the
        positions whose next-token logits are wanted -> (reduce's outputs concatenated, hidden [N, H] or None)."""
        parts, hids, start = [], [], 0
        rows = self.open(1)
        try:
            for seq, want in zip(seqs, at):
                self.crop(rows, [0])
                want = sorted(int(j) for j in want)
                if any(not 0 <= j < len(seq) for j in want):
                    raise ColmError("score: a wanted position lies outside its sequence")
                if len(seq) > self.n_ctx:
                    raise ColmError(f"a sequence of {len(seq)} tokens exceeds the engine's context of {self.n_ctx}")
                if any(not 0 <= int(x) < self.n_vocab for x in seq):   # llama.cpp aborts on such an id
                    raise ColmError(f"score: a token id outside the vocabulary of {self.n_vocab}")
                wanted = set(want)
                # Embeddings on makes every token an output: keep such calls small (chunk × V floats each).
                step = chunk if hidden else self.n_batch
                got = {}
                for s0 in range(0, len(seq), step):
                    items = [(rows.slots[0], j, int(seq[j]), j if j in wanted else None)
                             for j in range(s0, min(len(seq), s0 + step))]
                    got.update(self._decode(items, embeddings=hidden))
                rows.lengths[0] = self._used[rows.slots[0]] = len(seq)
                # Reduced 32 positions at a time: a [32, V] block (19 MB) stays below glibc's mmap threshold and is
                # reused, where a whole sequence's [n, V] was mapped and zero-filled anew each time (a third of the
                # time went to the kernel).
                for c in range(0, len(want), 32):
                    block = [got.pop(j) for j in want[c:c + 32]]
                    parts.append(reduce(torch.stack([lg for lg, _ in block]), start))
                    if hidden:
                        hids.append(torch.stack([h for _, h in block]))
                    start += len(block)
        finally:
            self.close(rows)
        out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
        return out, (torch.cat(hids) if hidden and hids else None)
