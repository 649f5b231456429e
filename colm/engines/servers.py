"""What each stock server takes and returns (colm.engines.remote asks them): one request body per question
"the expert's top-k after each of the last ``keep`` positions of these ids", and the reply turned into ``keep``
rows of (ids, log-probs), best first.  Sampling is pinned on every API so the answer is the expert's greedy choice
and the log-probs are its unmodified distribution."""
from __future__ import annotations

from ..errors import ColmError

APIS = ("llama-server", "vllm", "sglang")
TEXT_ONLY = ("tgi", "openai", "chat")


class RemoteExpertError(ColmError):
    """The expert server could not be reached, refused the request, or answered something unusable."""


# Each adapter turns (ids, keep, k) into one request body and a reply into keep rows of (ids, logprobs), top first:
# the last row is the distribution after the whole sequence, earlier rows those at the keep-1 positions before.
def _llama_request(ids: list[int], keep: int, k: int) -> tuple[str, dict]:
    if keep > 1:
        raise RemoteExpertError("llama-server returns no log-probabilities for prompt positions: the expert's view "
                                "covers deferred tokens only (expert_view='deferred')")
    # temperature < 0: greedy, and n_probs a plain softmax of the logits.  (An empty "samplers" list would not mean
    # "none": the server then samples from the full distribution.)
    return "/completion", {"prompt": ids, "n_predict": 1, "n_probs": k, "temperature": -1.0,
                           "post_sampling_probs": False, "cache_prompt": True, "return_tokens": True,
                           "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                           "dry_multiplier": 0.0, "stream": False}


def _llama_reply(js: dict, keep: int) -> list[tuple[list[int], list[float]]]:
    top = js["completion_probabilities"][0]["top_logprobs"]
    ids, lps = [int(t["id"]) for t in top], [float(t["logprob"]) for t in top]
    if js.get("tokens") and int(js["tokens"][0]) != ids[0]:
        raise RemoteExpertError(f"llama-server's greedy token {js['tokens'][0]} is not its own top-1 {ids[0]}: "
                                "a sampler is still applied on the server")
    return [(ids, lps)]


def _vllm_request(ids: list[int], keep: int, k: int, model: str = "") -> tuple[str, dict]:
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": k,
            "return_tokens_as_token_ids": True, "skip_special_tokens": False}
    if keep > 1:
        body["prompt_logprobs"] = k
    return "/v1/completions", body


def _vllm_id(key: str) -> int:
    return int(str(key).split("token_id:")[-1])


def _vllm_reply(js: dict, keep: int) -> list[tuple[list[int], list[float]]]:
    ch = js["choices"][0]
    rows = []
    if keep > 1:
        for entry in ch["prompt_logprobs"][-(keep - 1):]:
            # {token_id: {"logprob": .., "rank": ..}}: the prompt token itself plus the top k; rank orders them
            items = sorted(((int(t), v["logprob"], v.get("rank") or 1) for t, v in entry.items()),
                           key=lambda x: (-x[1], x[2]))
            rows.append(([i for i, _, _ in items], [float(lp) for _, lp, _ in items]))
    top = ch["logprobs"]["top_logprobs"][0]
    items = sorted(((_vllm_id(t), lp) for t, lp in top.items()), key=lambda x: -x[1])
    rows.append(([i for i, _ in items], [float(lp) for _, lp in items]))
    return rows


def _sglang_request(ids: list[int], keep: int, k: int) -> tuple[str, dict]:
    return "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0,
                                                                "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0},
                         "return_logprob": True, "top_logprobs_num": k,
                         "logprob_start_len": len(ids) - (keep - 1) if keep > 1 else -1}


def _sglang_reply(js: dict, keep: int) -> list[tuple[list[int], list[float]]]:
    meta = (js[0] if isinstance(js, list) else js)["meta_info"]
    rows = []
    if keep > 1:
        # input_top_logprobs[0] belongs to the first prompt token asked for (no context before it): skip it
        for entry in meta["input_top_logprobs"][-(keep - 1):]:
            rows.append(([int(t[1]) for t in entry], [float(t[0]) for t in entry]))
    out = meta["output_top_logprobs"][0]
    rows.append(([int(t[1]) for t in out], [float(t[0]) for t in out]))
    return rows


ADAPTERS = {"llama-server": (_llama_request, _llama_reply, False),
            "vllm": (_vllm_request, _vllm_reply, True),
            "sglang": (_sglang_request, _sglang_reply, True)}


