"""transformers + DynamicCache: the reference engine, and the one joint training needs (gradients).

All rows of a handle share one batched DynamicCache of C columns.  A row's tokens need not fill its columns: a
ragged feed is left-padded inside the chunk and a crop masks a row's columns out, so the attention mask [B, C]
marks which columns are real for which row, and position ids count real tokens only (``_positions``).  Masked
columns cost compute, not correctness: attention gives them weight exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import Out, check_crop, check_feed


@dataclass
class TorchRows:
    cache: DynamicCache
    mask: torch.Tensor                          # [B, C] 1 where the column holds a real token of that row
    lengths: list[int] = field(default_factory=list)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, C] -> position ids [B, C]: a row's k-th real token sits at position k, whatever the padding."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


class TorchEngine:
    name = "torch"
    shared_cache = True     # one batched DynamicCache for all rows of a handle
    cheap_logits = True     # bf16 matmuls on a CPU are memory-bound: extra LM-head rows are nearly free

    def __init__(self, model, n_vocab: int, threads: int | None = None):
        self.model, self.n_vocab, self.threads = model, n_vocab, threads
        self.hidden_size = model.config.hidden_size
        self.n_ctx = getattr(model.config, "max_position_embeddings", 1 << 30)
        self.pad_id = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def open(self, n: int) -> TorchRows:
        return TorchRows(DynamicCache(config=self.model.config),
                         torch.zeros(n, 0, dtype=torch.long, device=self.device), [0] * n)

    def close(self, rows: TorchRows) -> None:
        rows.cache, rows.mask, rows.lengths = None, None, []

    @torch.inference_mode()
    def feed(self, rows: TorchRows, tokens, keep=1, hidden: bool = False) -> Out:
        """tokens: B lists (ragged) -> Out(logits [keep_b, V] per fed row, hidden [B, H] if asked)."""
        keep = check_feed(self, rows, tokens, keep)
        B, k = len(tokens), max(map(len, tokens))
        if k == 0:
            return Out([None] * B, torch.zeros(B, self.hidden_size) if hidden else None)
        dev = self.device
        ids = torch.full((B, k), self.pad_id, dtype=torch.long, device=dev)
        new = torch.zeros(B, k, dtype=torch.long, device=dev)
        for b, t in enumerate(tokens):
            if t:
                ids[b, k - len(t):] = torch.tensor(list(t), device=dev)
                new[b, k - len(t):] = 1
        rows.mask = torch.cat([rows.mask, new], 1)
        pos = _positions(rows.mask)[:, -k:]
        out = self.model.base_model(input_ids=ids, attention_mask=rows.mask, position_ids=pos, cache=rows.cache,
                                    use_cache=True)
        for b, t in enumerate(tokens):
            rows.lengths[b] += len(t)
        hs = out.last_hidden_state                                  # [B, k, H]
        # The LM head runs on the kept positions only, gathered into a contiguous tensor: a strided slice makes
        # torch.matmul broadcast the head per row (~1.4 s and 0.47 GB a row for the 1.5B expert on a 2-core CPU).
        K = max(kk for t, kk in zip(tokens, keep) if t)
        logits = self.model.lm_head(hs.index_select(1, torch.arange(k - K, k, device=dev)))[..., :self.n_vocab]
        per_row = [logits[b, K - kk:].float() if t else None for b, (t, kk) in enumerate(zip(tokens, keep))]
        hid = None
        if hidden:
            hid = hs[:, -1].float()
            hid[[b for b, t in enumerate(tokens) if not t]] = 0      # a row not fed has no new state
        return Out(per_row, hid)

    @torch.inference_mode()
    def crop(self, rows: TorchRows, lengths) -> None:
        """Row b keeps its first lengths[b] tokens: columns past them are masked, the cache cut to the widest."""
        check_crop(rows, lengths)
        real = rows.mask.cumsum(-1)                                   # [B, C] real tokens up to each column
        # the column after row b's n-th real token: (real < n).sum() is the index of that token's column
        ends = [int((real[b] < n).sum()) + 1 if n else 0 for b, n in enumerate(lengths)]
        C = rows.mask.shape[1]
        width = max(ends) if ends else 0
        if width < C:
            rows.cache.crop(width - C)        # a negative count: columns to drop from the end
            rows.mask = rows.mask[:, :width].clone()
        for b, e in enumerate(ends):
            rows.mask[b, e:] = 0
        rows.lengths = list(lengths)

    @torch.inference_mode()
    def score(self, seqs, at, hidden: bool, reduce, chunk: int = 512):
        """Teacher forcing.  seqs: B token lists; at: per row the positions j whose next-token logits are wanted.
        -> (reduce's outputs over all N = Σ len(at[b]) positions, concatenated; hidden [N, H] fp32 if asked).
        ``reduce(logits [n, V] fp32, start)`` maps a chunk of positions (flat index ``start``..) to tensors."""
        dev = self.device
        ids = torch.full((len(seqs), max(map(len, seqs))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(list(s)), 1
        r = torch.cat([torch.full((len(a),), i) for i, a in enumerate(at)]).to(dev)
        c = torch.cat([torch.as_tensor(list(a), dtype=torch.long) for a in at]).to(dev)
        h = self.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state[r, c]
        parts = [reduce(self.model.lm_head(h[s:s + chunk])[:, :self.n_vocab].float(), s)
                 for s in range(0, h.shape[0], chunk)]
        out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
        return out, (h if hidden else None)
