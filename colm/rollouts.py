"""Resumable greedy rollouts of one model over GSM8K prompts (the on-policy data for disagreement labels).

Generation is the expensive part of training, so it appends one JSON line per answer and skips what is done:
a run can stop at any time and continue in a later session.  A line cut off by a kill is dropped on reading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import Example, is_correct, messages


def read_done(path: Path) -> dict[int, dict]:
    """index -> record for every complete line; a torn last line is truncated away."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            done[rec["index"]] = rec
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole JSON lines and fsync: a kill leaves at most one torn last line, which ``read_done`` drops."""
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sort_in_windows(items: list, key, size: int) -> list:
    """Sort by ``key`` within consecutive windows of ``size`` items.

    Similar lengths batch together, so left padding wastes little; but only within windows of a few batches, so a
    run stopped early has answered a prefix of the problems, not the shortest ones (a biased training set).
    """
    size = max(size, 1)
    return [x for s in range(0, len(items), size) for x in sorted(items[s:s + size], key=key)]


@torch.inference_mode()
def rollout(model, tokenizer, examples: list[Example], out: str | Path, batch_size: int = 16,
            max_new_tokens: int = 256, encode=None, progress: bool = True, role: str | None = None,
            window: int = 8) -> dict[int, dict]:
    """Greedy-decode every example not yet in ``out``; append {index, ids, text, correct[, model]} per answer
    (``role``, "base" or "expert", tells training which model's argmax the answer already is).
    Returns the records of ``examples`` only (the file may hold more, e.g. from a larger earlier run).

    ``encode(messages) -> ids`` must be the same prompt encoding the decoder uses (``CoLLM.encode``).
    ``window`` batches at a time are sorted by prompt length; work goes in the examples' order window by window.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [e for e in examples if e.index not in done]
    prompts = {e.index: encode(messages(e.question)) for e in todo}
    todo = sort_in_windows(todo, lambda e: len(prompts[e.index]), batch_size * window)
    pad = tokenizer.pad_token_id
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"rollouts -> {out.name}")
    dev = next(model.parameters()).device
    # Rows past the tokenizer are embedding padding, not tokens; the decoder never picks them (it slices the logits
    # to len(tokenizer)), so greedy rollouts must not either, or they would diverge from its expert-only answers.
    padded = list(range(len(tokenizer), model.config.vocab_size)) or None
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        rows = [prompts[e.index] for e in chunk]
        P = max(map(len, rows))
        ids = torch.full((len(rows), P), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r)
            mask[i, P - len(r):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, suppress_tokens=padded)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        recs = []
        for e, row in zip(chunk, gen[:, P:].tolist()):
            row = row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]
            text = tokenizer.decode(row, skip_special_tokens=True)
            recs.append({"index": e.index, "ids": row, "text": text, "correct": is_correct(text, e.answer),
                         **({"model": role} if role else {})})
        append_records(out, recs)
        done.update((r["index"], r) for r in recs)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return {e.index: done[e.index] for e in examples}
