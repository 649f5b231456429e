"""An expert behind HTTP — llama.cpp's ``llama-server``, vLLM or SGLang — asked by token ids, at deferred positions.

The base stays local (the head reads its hidden state); the expert is only asked for its next-token distribution
when a position is deferred.  A row is the token list this client has sent for one answer; every request sends the
whole list and the server's prefix cache does the catching-up (it evaluates only the suffix it has not cached), so
``crop`` is local and a server restart costs recomputation, never correctness.

Stock servers, pinned to the expert's greedy choice and its unmodified distribution:
    llama-server  POST /completion   prompt=[ids], n_predict=1, n_probs=k, temperature=-1 (greedy; probabilities are
                                     a plain softmax of the logits, no sampler applied), cache_prompt, return_tokens
    vLLM          POST /v1/completions  prompt=[ids], max_tokens=1, temperature=0, logprobs=k,
                                     return_tokens_as_token_ids; prompt_logprobs=k for earlier positions
    SGLang        POST /generate     input_ids, max_new_tokens=1, temperature=0, return_logprob, top_logprobs_num=k,
                                     logprob_start_len for earlier positions
Text-only APIs (TGI's, hosted chat APIs) cannot hand over exact tokens and are refused.  The vocabulary is checked
on connect: probe strings (special tokens included) must tokenize to the same ids on both sides.

Faults: a token request is idempotent, so it is retried with backoff (``retries``) and then fails with a
``RemoteExpertError`` naming the server; ``interrupt`` (the page's Stop) abandons a request in flight.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from ..errors import ColmError
from . import Interrupted, Out, check_crop, check_feed
from .servers import ADAPTERS, APIS, TEXT_ONLY, RemoteExpertError, _sglang_request, _vllm_request  # noqa: F401

PROBES = ("What is a^3 * a^2 if a = 5?  12,345.50\n\n\tdef f(x):\n    return x**2",
          "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "日本語 🙂 naïve — “quotes”")


@dataclass
class RemoteRows:
    seqs: list[list[int]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]


# ----------------------------------------------------------------------------------------------- engine
class RemoteEngine:
    """The expert on a server.  Rows are client-side token lists; ``feed`` asks for the next-token top-k after
    each fed row (rows in parallel, one request each) and returns it as ``Out.topk``, not full logits."""
    name = "remote"
    shared_cache = False
    hidden_size = 0

    def __init__(self, url: str, api: str, tokenizer, n_vocab: int, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, top_k: int = 5, n_ctx: int = 32768, concurrency: int = 8,
                 client=None, check_vocab: bool = True):
        import httpx
        api = (api or "").lower()
        if api in TEXT_ONLY or api not in APIS:
            raise ColmError(f"--expert-api {api!r}: colm needs a server that takes token ids and returns the "
                            f"expert's top-k by token id ({', '.join(APIS)}); text-only APIs re-tokenize, so the "
                            "expert's tokens could not be handed over exactly")
        if not url.startswith(("http://", "https://")):
            raise ColmError(f"--expert-url must start with http:// or https:// (got {url!r})")
        self.url, self.api, self.top_k, self.n_vocab, self.n_ctx = url.rstrip("/"), api, top_k, n_vocab, n_ctx
        self.retries, self.timeout = retries, timeout
        self._request, self._reply, self.cheap_logits = ADAPTERS[api]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = client or httpx.Client(base_url=self.url, headers=headers,
                                           timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="colm-expert")
        self._cancel = threading.Event()
        self._stop: threading.Event | None = None
        self.model = ""
        self.requests = 0
        if api == "vllm":
            self.model = self._get("/v1/models")["data"][0]["id"]
        if check_vocab:
            self.check_vocabulary(tokenizer)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> str:
        return f"{self.api} at {self.url}"

    # -- http -----------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One idempotent request with bounded retries (backoff 0.5, 1, 2 s ...); the last failure is raised."""
        import httpx
        why = ""
        for attempt in range(self.retries + 1):
            if self._stopped():
                raise Interrupted("stopped while waiting for the expert server")
            try:
                r = self.http.request(method, path, json=body)
                if r.status_code in (401, 403):
                    raise RemoteExpertError(f"the expert server at {self.url} refused the request "
                                            f"({r.status_code}): check --expert-api-key")
                if r.status_code == 404:
                    raise RemoteExpertError(f"the expert server at {self.url} has no {path} (404): is it a "
                                            f"{self.api} server? (--expert-api)")
                if r.status_code >= 400:
                    raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {r.text[:200]}", request=r.request,
                                                response=r)
                return r.json()
            except RemoteExpertError:
                raise
            except (httpx.HTTPError, ValueError) as e:   # down, slow, reset, 5xx, a reply that is not JSON
                why = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    t_end = time.monotonic() + 0.5 * 2 ** attempt
                    while time.monotonic() < t_end:
                        if self._stopped():
                            raise Interrupted("stopped while waiting for the expert server") from None
                        time.sleep(0.05)
        raise RemoteExpertError(f"the expert server at {self.url} did not answer after {self.retries + 1} "
                                f"tries ({why})")

    def _get(self, path: str) -> dict:
        return self._call("GET", path)

    def interrupt(self) -> None:
        """Abandon requests in flight now; the next ``feed`` clears it."""
        self._cancel.set()

    def watch(self, stop: threading.Event | None) -> None:
        """The decode's Stop event: once set, a request in flight is abandoned (``Interrupted``)."""
        self._stop = stop

    def _stopped(self) -> bool:
        return self._cancel.is_set() or (self._stop is not None and self._stop.is_set())

    # -- vocabulary -----------------------------------------------------------------------------------------
    def check_vocabulary(self, tokenizer) -> None:
        """Refuse a server whose tokenizer splits the probe strings into other ids than ours."""
        if self.api == "sglang":        # no tokenize endpoint: ask for the text of known ids instead
            return self._check_by_text(tokenizer)
        for text in PROBES:
            mine = tokenizer.encode(text, add_special_tokens=False)
            if self.api == "llama-server":
                theirs = self._call("POST", "/tokenize", {"content": text, "parse_special": True})["tokens"]
            else:
                theirs = self._call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                          "add_special_tokens": False})["tokens"]
            theirs = [t["id"] if isinstance(t, dict) else int(t) for t in theirs]
            if theirs != mine:
                raise RemoteExpertError(f"the expert server at {self.url} tokenizes {text[:30]!r}… into other ids "
                                        f"than the base's tokenizer ({theirs[:8]} vs {mine[:8]}): not the same "
                                        "vocabulary, so its tokens cannot be handed over")

    def _check_by_text(self, tokenizer) -> None:
        ids = tokenizer.encode(PROBES[0] + PROBES[1], add_special_tokens=False)
        path, body = _sglang_request(ids, 1, self.top_k)
        body["return_text_in_logprobs"] = True
        js = self._call("POST", path, body)
        for entry in (js[0] if isinstance(js, list) else js)["meta_info"]["output_top_logprobs"][0]:
            if len(entry) > 2 and entry[2] is not None and tokenizer.decode([int(entry[1])]) != entry[2]:
                raise RemoteExpertError(f"the expert server at {self.url} names token {entry[1]} {entry[2]!r}, the "
                                        f"base's tokenizer {tokenizer.decode([int(entry[1])])!r}: not the same "
                                        "vocabulary")

    # -- rows -----------------------------------------------------------------------------------------------
    def open(self, n: int) -> RemoteRows:
        return RemoteRows([[] for _ in range(n)])

    def close(self, rows: RemoteRows) -> None:
        rows.seqs = []

    def crop(self, rows: RemoteRows, lengths) -> None:
        check_crop(rows, lengths)
        for b, n in enumerate(lengths):
            del rows.seqs[b][n:]

    # -- compute --------------------------------------------------------------------------------------------
    def _ask(self, ids: list[int], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (probs [keep, k], ids [keep, k]) after each of the last keep positions of ``ids``."""
        path, body = (_vllm_request(ids, keep, self.top_k, self.model) if self.api == "vllm"
                      else self._request(ids, keep, self.top_k))
        try:
            rows = self._reply(self._call("POST", path, body), keep)
            if len(rows) != keep or not all(r[0] and len(r[0]) == len(r[1]) for r in rows):
                raise ValueError(f"{len(rows)} distributions for {keep} positions")
            k = min(len(r[0]) for r in rows)
            probs = torch.tensor([[math.exp(lp) for lp in r[1][:k]] for r in rows], dtype=torch.float32)
            top = torch.tensor([r[0][:k] for r in rows], dtype=torch.long)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RemoteExpertError(f"the expert server at {self.url} sent a reply colm cannot read "
                                    f"({type(e).__name__}: {e})") from None
        if not bool(((top >= 0) & (top < self.n_vocab)).all()):
            raise RemoteExpertError(f"the expert server at {self.url} named a token outside the vocabulary")
        self.requests += 1
        return probs, top

    def feed(self, rows: RemoteRows, tokens, keep=1, hidden: bool = False) -> Out:
        """tokens: B lists (ragged) -> Out(topk=[(probs [keep_b, k], ids [keep_b, k]) or None per row])."""
        if hidden:
            raise ColmError("the remote engine serves the expert only (the base's hidden state stays local)")
        keep = check_feed(self, rows, tokens, keep)     # the engines' one feed check (rows, keep, ids, context)
        self._cancel.clear()
        jobs = {b: self._pool.submit(self._ask, rows.seqs[b] + [int(x) for x in t], k)
                for b, (t, k) in enumerate(zip(tokens, keep)) if t}
        pending = set(jobs.values())
        while pending:       # wake up to see a Stop even when the server is slow
            _, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            if self._stopped():
                raise Interrupted("stopped while waiting for the expert server")
        got = {b: f.result() for b, f in jobs.items()}   # raises the first failure: the rows stay as they were
        for b, t in enumerate(tokens):
            rows.seqs[b].extend(int(x) for x in t)
        return Out([None] * len(tokens), None, [got.get(b) for b in range(len(tokens))])

    def score(self, seqs, at, hidden: bool, reduce, chunk: int = 64):
        """Teacher forcing for head training (gold-disagreement labels need the expert's argmax along a text).
        vLLM and SGLang return every position's top-k (and the text's own token) in one request per sequence;
        llama-server answers one position a request (its cache makes each evaluate one new token).  The top-k is
        spread into a [n, V] logits stand-in for ``reduce``: known log-probs where returned, the remaining mass
        shared evenly by the other tokens, so argmax and log P(a returned token) are exact; log P(gold) of a gold
        token outside the returned ones is that even share, a floor."""
        if hidden:
            raise ColmError("the remote engine serves the expert only (no hidden states)")
        parts, start = [], 0
        for seq, want in zip(seqs, at):
            want = sorted(int(j) for j in want)
            if any(not 0 <= j < len(seq) for j in want):
                raise ColmError("score: a wanted position lies outside its sequence")
            if self.cheap_logits and want:          # one request: the distributions after positions want[0]..end
                first = want[0]
                probs, ids = self._ask(list(seq[:want[-1] + 1]), want[-1] + 1 - first)   # rows: first..want[-1]
                rows = {j: (probs[j - first], ids[j - first]) for j in want}
            else:
                rows = {}
                for j in want:
                    probs, ids = self._ask(list(seq[:j + 1]), 1)
                    rows[j] = (probs[0], ids[0])
            for c in range(0, len(want), chunk):
                part = want[c:c + chunk]
                parts.append(reduce(self._logits_standin([rows[j] for j in part]), start))
                start += len(part)
        out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
        return out, None

    def _logits_standin(self, rows) -> torch.Tensor:
        """[(probs [m], ids [m])] -> [n, V]: log p at the returned ids, the rest of the mass spread evenly."""
        out = torch.empty(len(rows), self.n_vocab)
        for r, (probs, ids) in enumerate(rows):
            keep = ids < self.n_vocab
            probs, ids = probs[keep], ids[keep]
            rest = max(1e-12, 1.0 - float(probs.sum()))
            out[r].fill_(math.log(rest / max(1, self.n_vocab - len(ids))))
            out[r, ids] = probs.clamp_min(1e-30).log()
        return out

    def wait_ready(self, seconds: float = 60.0) -> None:
        """Block until the server answers its health check (llama-server loads the model after it listens)."""
        t0 = time.monotonic()
        path = "/health"
        while True:
            try:
                r = self.http.get(path)
                if r.status_code == 200:
                    return
            except Exception:
                pass
            if time.monotonic() - t0 > seconds:
                raise RemoteExpertError(f"the expert server at {self.url} was not ready within {seconds:.0f} s")
            time.sleep(0.25)
