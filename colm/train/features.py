"""Teacher-forced features for the deferral head, computed batched and cached as safetensors shards.

For every target token: the base's final hidden state and its confidence there (``colm.head.confidence_features``),
log P(gold) under base and expert, and both argmaxes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data import Example, messages
from ..head import confidence_features
from ..models import ColmError

FEATURE_KEYS = ("h", "conf", "lp_base", "lp_expert", "arg_base", "arg_expert", "target", "example", "pos")


def sequences(examples: list[Example], encode, tokenizer, rollouts: dict[int, dict] | None = None,
              eos_id: int | None = None) -> list[tuple[int, list[int], list[int]]]:
    """(example index, prompt ids, target ids): the gold solution, or the rollout's tokens when given."""
    out = []
    for e in examples:
        prompt = encode(messages(e.question))
        if rollouts is not None:
            if e.index not in rollouts:
                continue
            target = list(rollouts[e.index]["ids"])
        else:
            target = tokenizer(e.solution, add_special_tokens=False)["input_ids"] + ([eos_id] if eos_id is not None else [])
        if target:
            out.append((e.index, prompt, target))
    return out


def gold_logprobs(model, hidden: torch.Tensor, gold: torch.Tensor, n_vocab: int, chunk: int = 512,
                  conf: bool = True):
    """hidden [N, H] (post-norm), gold [N] -> (log P(gold) [N], argmax [N], confidence_features [N, 3] or None).

    log P(gold) = logit[gold] - logsumexp(logits), in chunks: never a full-vocabulary log-softmax kept around.
    Feature extraction calls it under inference mode; joint training backpropagates through log P(gold) alone:
    argmax and confidence are detached, as the head reads the confidence as an input and the base is not trained
    through it. Only the base's confidence is a head input, so the expert's call passes ``conf=False``.
    """
    lps, args, confs = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = model.lm_head(hidden[s:s + chunk])[:, :n_vocab].float()
        lps.append(logits.gather(1, gold[s:s + chunk, None]).squeeze(1) - logits.logsumexp(-1))
        with torch.no_grad():
            args.append(logits.argmax(-1))
            if conf:
                confs.append(confidence_features(logits))
    return torch.cat(lps), torch.cat(args), torch.cat(confs) if conf else None


def target_index(batch: list[tuple[int, list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) [N] of the hidden state that predicts each target token, N = all targets' lengths together.

    Position j's hidden state predicts token j + 1: target token k of row i sits at len(prompt) + k, so it is
    read at column len(prompt) + k - 1 of the prompt + target sequence.
    """
    rows = torch.cat([torch.full((len(t),), i) for i, (_, _, t) in enumerate(batch)])
    cols = torch.cat([torch.arange(len(t)) + len(p) - 1 for _, p, t in batch])
    return rows, cols


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T], attention mask [B, T]), padded on the right (teacher forcing needs no left pad)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def _gold_reduce(gold: torch.Tensor, conf: bool):
    """A reduce for ``engine.score``: logits [n, V] of positions start..start+n -> log P(gold), argmax (and the
    base's confidence features), never keeping a full-vocabulary log-softmax around."""
    def reduce(logits: torch.Tensor, start: int) -> dict:
        g = gold[start:start + len(logits)].to(logits.device)
        out = {"lp": logits.gather(1, g[:, None]).squeeze(1) - logits.logsumexp(-1), "arg": logits.argmax(-1)}
        if conf:
            out["conf"] = confidence_features(logits)
        return out
    return reduce


@torch.inference_mode()
def features_for_batch(pair, batch: list[tuple[int, list[int], list[int]]], with_expert: bool = True) -> dict:
    """Teacher forcing on prompt + target through the pair's engines; returns per-target-token feature tensors.

    Position j's hidden state predicts token j + 1: target token k of a row is read at len(prompt) + k - 1.
    """
    seqs = [p + t for _, p, t in batch]
    at = [range(len(p) - 1, len(p) + len(t) - 1) for _, p, t in batch]
    gold = torch.tensor([x for _, _, t in batch for x in t])
    lengths = torch.tensor([len(t) for _, _, t in batch])
    ex = torch.tensor([idx for idx, _, _ in batch]).repeat_interleave(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
    b, hb = pair.base.score(seqs, at, hidden=True, reduce=_gold_reduce(gold, conf=True))
    out = {"h": hb.to(torch.bfloat16).cpu(), "conf": b["conf"].cpu(), "lp_base": b["lp"].cpu(),
           "arg_base": b["arg"].cpu(), "target": gold, "example": ex, "pos": pos}
    if with_expert:
        e, _ = pair.expert.score(seqs, at, hidden=False, reduce=_gold_reduce(gold, conf=False))
        out["lp_expert"], out["arg_expert"] = e["lp"].cpu(), e["arg"].cpu()
    else:
        out["lp_expert"] = torch.full_like(out["lp_base"], float("nan"))
        out["arg_expert"] = torch.full_like(out["arg_base"], -1)
    return out


def extract(pair, seqs: list, out_dir: str | Path, identity: dict, batch_size: int = 8,
            shard_examples: int = 64, with_expert: bool = True, progress: bool = True) -> dict:
    """Compute features for ``seqs`` into ``out_dir``/shard-NNNNN.safetensors and return them concatenated.

    Shards are written to a temporary name and renamed when complete, so an interrupted run resumes from the
    last whole shard and never reads half-written data.  The manifest pins the models and records a hash of each
    shard's sequences: a shard is reused only for exactly the same data (so a larger ``--limit`` extends a cache),
    and a directory made for other models is refused instead of silently mixed in.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = {**identity, "with_expert": with_expert, "shard_examples": shard_examples}
    manifest_path = out_dir / "manifest.json"
    manifest = {"identity": ident, "shards": {}}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("identity") != ident:
            raise ColmError(f"{out_dir} holds features for other models or settings; pass a new --features "
                            "directory or delete it")
        manifest["shards"] = old.get("shards", {})
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()
    n_shards = math.ceil(len(seqs) / shard_examples)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(seqs), desc="features", file=sys.stderr)
    paths = []
    for s in range(n_shards):
        path = out_dir / f"shard-{s:05d}.safetensors"
        chunk = seqs[s * shard_examples:(s + 1) * shard_examples]
        digest = hashlib.sha256(json.dumps(chunk).encode()).hexdigest()
        if not (path.exists() and manifest["shards"].get(path.name) == digest):
            # Length-sorted batches waste less padding.
            order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][1]) + len(chunk[i][2]))
            parts = [features_for_batch(pair, [chunk[i] for i in order[b:b + batch_size]], with_expert)
                     for b in range(0, len(order), batch_size)]
            tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in FEATURE_KEYS}
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
            manifest["shards"][path.name] = digest
            tmp_manifest = manifest_path.with_name("manifest.json.tmp")
            tmp_manifest.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp_manifest, manifest_path)
        else:
            _add_confidence(pair, path)
        paths.append(path)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return load_features(paths)


def _add_confidence(pair, path: Path) -> None:
    """Give a shard cached before heads read the base's confidence its ``conf`` rows.  They follow from the stored
    hidden states alone (bf16, exactly what the base's LM head saw), so this costs one LM-head pass, not a re-run."""
    with safe_open(str(path), framework="pt") as fh:
        if "conf" in fh.keys():
            return
    t = load_file(str(path))
    with torch.inference_mode():
        base = pair.base.model      # the torch engine's model: only shards from before heads read confidence
        _, _, t["conf"] = gold_logprobs(base, t["h"].to(pair.device, base.dtype),
                                        t["target"].to(pair.device), len(pair.tokenizer))
    t["conf"] = t["conf"].cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(t, str(tmp))
    os.replace(tmp, path)


def select_examples(f: dict, indices) -> dict:
    """The rows of features ``f`` whose problem (``f["example"]``) is one of ``indices``."""
    mask = torch.isin(f["example"], torch.tensor(sorted(indices), dtype=f["example"].dtype))
    return {k: v[mask] for k, v in f.items()}


def load_features(paths: list[Path]) -> dict:
    if not paths:
        raise ColmError("no feature shards")
    parts = [load_file(str(p)) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in FEATURE_KEYS}
