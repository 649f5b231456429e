"""Learning the deferral head.

  1. ``extract``: teacher-forced features for every target token — the base's final hidden state and its
     confidence there (``colm.head.confidence_features``), log P(gold) under base and expert, and both argmaxes —
     computed batched and cached as safetensors shards.
  2. ``weak_labels``: Z = 1 where the expert's argmax is the gold token and the base's is not (paper, Sec. 3.2).
  3. ``fit``: either objective, with a held-out split and early stopping:
       marginal      -log[(1 - σ(d)) P_base(x) + σ(d) P_expert(x)]        (the paper's latent-variable objective)
       disagreement  BCE(σ(d), [argmax P_base != x])  on the expert's own greedy answers (on-policy labels)
     ``gold-disagreement`` is the free variant: the same labels on the gold solution, base vs expert argmax.
     Along the base's or Co-LLM's own answers (a second round: the states its policy visits) the label is the same
     base-vs-expert argmax rule.

The base stays frozen here (CPU default); ``joint_lora`` trains LoRA adapters on the base with the head (GPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .data import Example, messages
from .head import DeferralHead, confidence_features
from .models import ColmError


@dataclass
class TrainConfig:
    objective: str = "disagreement"    # marginal | disagreement | gold-disagreement
    init: str = "weak"                 # marginal only: start from the weak-supervision fit ("weak") or zeros ("none")
    val_fraction: float = 0.1          # examples held out for early stopping
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 4096             # tokens per optimiser step
    max_epochs: int = 60
    patience: int = 5                  # epochs without validation improvement before stopping
    seed: int = 0
    confidence: bool = True            # the head also reads the base's top prob / entropy / margin (colm.head)


# ----------------------------------------------------------------------------------------------- features
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


@torch.inference_mode()
def features_for_batch(pair, batch: list[tuple[int, list[int], list[int]]], with_expert: bool = True) -> dict:
    """Right-padded teacher forcing on prompt + target; returns per-target-token feature tensors."""
    dev, n_vocab = pair.device, len(pair.tokenizer)
    ids, mask = right_pad([p + t for _, p, t in batch], pair.tokenizer.pad_token_id)
    rows_t, cols_t = target_index(batch)
    lengths = torch.tensor([len(t) for _, _, t in batch])
    ex = torch.tensor([idx for idx, _, _ in batch]).repeat_interleave(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
    gold = ids[rows_t, cols_t + 1].to(dev)
    ids, mask = ids.to(dev), mask.to(dev)
    hb = pair.base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[rows_t, cols_t]
    lp_b, arg_b, conf = gold_logprobs(pair.base, hb, gold, n_vocab)
    out = {"h": hb.to(torch.bfloat16).cpu(), "conf": conf.cpu(), "lp_base": lp_b.cpu(), "arg_base": arg_b.cpu(),
           "target": gold.cpu(), "example": ex, "pos": pos}
    if with_expert:
        he = pair.expert.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[rows_t, cols_t]
        lp_e, arg_e, _ = gold_logprobs(pair.expert, he, gold, n_vocab, conf=False)
        out["lp_expert"], out["arg_expert"] = lp_e.cpu(), arg_e.cpu()
    else:
        out["lp_expert"] = torch.full_like(lp_b.cpu(), float("nan"))
        out["arg_expert"] = torch.full_like(arg_b.cpu(), -1)
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
        _, _, t["conf"] = gold_logprobs(pair.base, t["h"].to(pair.device, pair.base.dtype),
                                        t["target"].to(pair.device), len(pair.tokenizer))
    t["conf"] = t["conf"].cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(t, str(tmp))
    os.replace(tmp, path)


def load_features(paths: list[Path]) -> dict:
    if not paths:
        raise ColmError("no feature shards")
    parts = [load_file(str(p)) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in FEATURE_KEYS}


# ----------------------------------------------------------------------------------------------- labels & losses
def weak_labels(f: dict) -> torch.Tensor:
    """Z = 1 where the expert's argmax is the gold token and the base's is not."""
    return ((f["arg_expert"] == f["target"]) & (f["arg_base"] != f["target"])).float()


def disagreement_labels(f: dict) -> torch.Tensor:
    """Z = 1 where the two models' next-token argmaxes differ: deferring exactly there reproduces the expert's greedy
    choice.  Along the expert's own greedy answer its argmax *is* the target, so those features skip the expert
    (arg_expert = -1) and compare with the target; gold prefixes and base answers carry both argmaxes."""
    has_expert = f["arg_expert"] >= 0
    return torch.where(has_expert, f["arg_base"] != f["arg_expert"], f["arg_base"] != f["target"]).float()


def marginal_nll(d: torch.Tensor, lp_base: torch.Tensor, lp_expert: torch.Tensor) -> torch.Tensor:
    """-log[(1 - σ(d)) P_base + σ(d) P_expert], stably in log space; mean over tokens."""
    return -torch.logaddexp(F.logsigmoid(-d) + lp_base, F.logsigmoid(d) + lp_expert).mean()


def weighted_bce(d: torch.Tensor, z: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(d, z, pos_weight=torch.tensor(pos_weight))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank statistic (ties averaged)."""
    pos, neg = labels.bool(), ~labels.bool()
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inv = torch.unique(scores, return_inverse=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
        cnt = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
        ranks = (sums / cnt)[inv]
    n_pos, n_neg = pos.sum().item(), neg.sum().item()
    return float((ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ----------------------------------------------------------------------------------------------- fitting
def split_by_example(f: dict, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token masks (train, val) with whole examples held out, so validation sees unseen problems."""
    ex = f["example"].unique()
    g = torch.Generator().manual_seed(seed)
    val_ex = ex[torch.randperm(len(ex), generator=g)[:max(1, int(len(ex) * val_fraction))]]
    val = torch.isin(f["example"], val_ex)
    return ~val, val


def head_inputs(f: dict, confidence: bool) -> torch.Tensor:
    """The head's input rows [N, H (+3)] from cached features, in the order ``DeferralHead.forward`` concatenates."""
    return torch.cat([f["h"].float(), f["conf"]], 1) if confidence else f["h"].float()


def _standardise(h: torch.Tensor, train: torch.Tensor):
    x = h.float()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-4)
    return (x - mu) / sd, mu, sd


def _loop(x, train, val, loss_fn, cfg: TrainConfig, w0=None):
    """Adam on a linear logit d = x·w + b with early stopping on the validation loss; returns the best (w, b)."""
    torch.manual_seed(cfg.seed)
    lin = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        if w0 is not None:
            lin.weight.copy_(w0[0]), lin.bias.copy_(w0[1])
        else:
            lin.weight.zero_(), lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr_idx, va_idx = train.nonzero().squeeze(1), val.nonzero().squeeze(1)
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(cfg.max_epochs):
        perm = tr_idx[torch.randperm(len(tr_idx))]
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s:s + cfg.batch_size]
            loss = loss_fn(lin(x[b]).squeeze(1), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = loss_fn(lin(x[va_idx]).squeeze(1), va_idx).item()
            t = loss_fn(lin(x[tr_idx]).squeeze(1), tr_idx).item()
        history.append({"epoch": epoch, "train": t, "val": v})
        if v < best - 1e-5:
            best, bad = v, 0
            best_state = (lin.weight.detach().clone(), lin.bias.detach().clone())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    return best_state, history


def fit(f: dict, cfg: TrainConfig, hidden_size: int, meta: dict | None = None) -> tuple[DeferralHead, dict]:
    """Fit a head to cached features under ``cfg.objective``; returns the head and its metrics."""
    if cfg.objective not in ("marginal", "disagreement", "gold-disagreement"):
        raise ColmError(f"unknown objective {cfg.objective!r}")
    if cfg.objective == "marginal" and torch.isnan(f["lp_expert"]).any():
        raise ColmError("objective marginal needs expert features; extract them with the expert")
    train, val = split_by_example(f, cfg.val_fraction, cfg.seed)
    x, mu, sd = _standardise(head_inputs(f, cfg.confidence), train)
    metrics: dict = {"tokens": int(len(x)), "examples": int(f["example"].unique().numel()),
                     "train_tokens": int(train.sum()), "val_tokens": int(val.sum())}

    def bce_fit(z):
        pw = float((1 - z[train]).sum() / z[train].sum().clamp_min(1))
        return _loop(x, train, val, lambda d, i: weighted_bce(d, z[i], pw), cfg), pw

    if cfg.objective == "marginal":
        lb, le = f["lp_base"], f["lp_expert"]
        w0 = None
        if cfg.init == "weak":
            z = weak_labels(f)
            (w0, hist0), _ = bce_fit(z)
            metrics["weak_label_rate"] = float(z.mean())
            metrics["weak_history"] = hist0[-1:]
        state, hist = _loop(x, train, val, lambda d, i: marginal_nll(d, lb[i], le[i]), cfg, w0)
        with torch.no_grad():
            d = (x @ state[0].T).squeeze(1) + state[1]
        for name, m in (("train", train), ("val", val)):
            metrics[f"{name}_nll"] = float(marginal_nll(d[m], lb[m], le[m]))
            metrics[f"{name}_nll_base"] = float(-lb[m].mean())
            metrics[f"{name}_nll_expert"] = float(-le[m].mean())
            metrics[f"{name}_nll_oracle"] = float(-torch.maximum(lb[m], le[m]).mean())
        z = weak_labels(f)
    else:
        z = disagreement_labels(f)
        (state, hist), pw = bce_fit(z)
        metrics["pos_weight"] = pw
        with torch.no_grad():
            d = (x @ state[0].T).squeeze(1) + state[1]
    metrics["label_rate"] = float(z.mean())
    metrics["val_auc"] = auc(d[val], z[val])
    metrics.update(recall_at(d[val], z[val], 0.3))
    metrics["epochs"] = len(hist)
    metrics["history"] = hist
    # Fold the standardisation into the linear map so the shipped head reads raw hidden states.
    w = state[0] / sd
    b = state[1] - (w * mu).sum()
    head = DeferralHead(hidden_size, {**(meta or {}), "trained": True, "objective": cfg.objective,
                                      "train_config": asdict(cfg),
                                      "metrics": {k: v for k, v in metrics.items() if k != "history"}},
                        confidence=cfg.confidence)
    with torch.no_grad():
        head.linear.weight.copy_(w), head.linear.bias.copy_(b)
    return head, metrics


def recall_at(d: torch.Tensor, z: torch.Tensor, frac: float) -> dict:
    """Share of label-1 tokens caught when deferring the top ``frac`` of tokens by score."""
    k = max(1, int(len(d) * frac))
    top = d.topk(k).indices
    return {f"recall_at_{int(frac * 100)}pct": float(z[top].sum() / z.sum().clamp_min(1))}


# ----------------------------------------------------------------------------------------------- joint training
def joint_train(pair, head: DeferralHead, seqs: list, mode: str = "lora", steps: int = 200, lr: float = 1e-4,
                head_lr: float = 1e-2, batch_size: int = 4, rank: int = 8, seed: int = 0, log=None):
    """Train the head together with the base (paper, Sec. 3.2): LoRA adapters (``mode='lora'``, via peft) or every
    base weight (``'full'``), on the marginal likelihood; the expert stays frozen.  Meant for a GPU.

    Returns (base model with LoRA merged in, head, per-step losses).
    """
    torch.manual_seed(seed)
    dev, n_vocab = pair.device, len(pair.tokenizer)
    base = pair.base
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        base = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        backbone, lm = base.get_base_model().model, base.get_base_model()
    elif mode == "full":
        base.requires_grad_(True)
        backbone, lm = base.model, base
    else:
        raise ColmError(f"unknown joint mode {mode!r}; use lora or full")
    base.train()
    head.to(dev).train().requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in base.parameters() if p.requires_grad], "lr": lr},
                             {"params": head.parameters(), "lr": head_lr}])
    losses = []
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = [seqs[int(i)] for i in torch.randint(len(seqs), (min(batch_size, len(seqs)),), generator=g)]
        ids, mask = right_pad([p + t for _, p, t in batch], pair.tokenizer.pad_token_id)
        r_idx, c_idx = (t.to(dev) for t in target_index(batch))
        ids, mask = ids.to(dev), mask.to(dev)
        gold = ids[r_idx, c_idx + 1]
        with torch.no_grad():
            he = pair.expert.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[r_idx, c_idx]
            lp_e, _, _ = gold_logprobs(pair.expert, he, gold, n_vocab, conf=False)
        hb = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[r_idx, c_idx]
        lp_b, _, conf = gold_logprobs(lm, hb, gold, n_vocab)
        loss = marginal_nll(head(hb, conf=conf), lp_b, lp_e)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log:
            log(step, losses[-1])
    base.eval()
    head.eval()
    merged = base.merge_and_unload() if mode == "lora" else base
    merged.requires_grad_(False)
    head.requires_grad_(False)
    head.meta.update({"trained": True, "objective": f"marginal+joint-{mode}"})
    return merged, head, losses


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="GSM8K-format JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--objective", default="disagreement", choices=["marginal", "disagreement", "gold-disagreement"])
    p.add_argument("--rollouts", action="append", default=[],
                   help="JSONL of answers from `colm rollouts` (the expert's, the base's or Co-LLM's; repeatable), the "
                        "on-policy data of --objective disagreement")
    p.add_argument("--rollout-limit", type=int, default=None,
                   help="use the rollouts of the first N training problems only (gold keeps --limit)")
    p.add_argument("--with-gold", action="store_true",
                   help="--objective disagreement: also label the gold solutions (as gold-disagreement does)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training problems")
    p.add_argument("--dev-size", type=int, default=300, help="problems carved from the data as the dev split (never trained on)")
    p.add_argument("--features", default="runs/features",
                   help="feature cache root: gold solutions in DIR/gold, each rollouts file in DIR/rollouts-<name>")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init", default="weak", choices=["weak", "none"])
    p.add_argument("--inputs", default="hidden+confidence", choices=["hidden", "hidden+confidence"],
                   help="what the head reads: the base's hidden state (the paper) and optionally its top probability, "
                        "entropy and top-2 margin at the same position")
    p.add_argument("--threshold", type=float, default=0.5, help="threshold stored until `colm evaluate` picks one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint", default="none", choices=["none", "lora", "full"],
                   help="also fine-tune the base with the head on the marginal likelihood (GPU; paper Sec. 3.2)")
    p.add_argument("--joint-steps", type=int, default=500)
    p.add_argument("--joint-lr", type=float, default=1e-4)
    p.add_argument("--out-base", default=None, help="with --joint: directory for the fine-tuned base model")


def rollout_model(recs: dict[int, dict], path: Path) -> str:
    """Which model wrote a rollouts file.  Every record must say: guessing would silently flip what the labels mean
    (along the base's answers the base's argmax is the text, so "disagreement" would be nearly always 0)."""
    models = {r.get("model") for r in recs.values()}
    if len(models) != 1 or not models <= {"base", "expert", "colm"}:
        raise ColmError(f"{path}: every rollout record must name its model, and one model, base, expert or colm (found "
                        f"{sorted(map(str, models))}); `python -m colm rollouts` writes that field")
    return models.pop()


def main(args) -> int:
    from .cli import _load
    from .data import DEFAULT_DATA, read_jsonl, split
    from .decode import CoLLM
    from .rollouts import read_done
    data_path = Path(args.data) if args.data else DEFAULT_DATA
    train_ex, _dev = split(read_jsonl(data_path), args.dev_size)
    if args.limit:
        train_ex = train_ex[:args.limit]
    pair, _ = _load(args, need_head=False)
    enc = CoLLM(pair).encode
    tok = pair.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    root = Path(args.features)
    sources = []  # (name, sequences, cache directory, run the expert too)
    if args.objective != "disagreement" or args.with_gold:
        sources.append(("gold", sequences(train_ex, enc, tok, None, eos), root / "gold", True))
    if args.objective == "disagreement" and not args.rollouts:
        raise ColmError("--objective disagreement needs --rollouts (greedy answers); make them with "
                        "`python -m colm rollouts` or use --objective gold-disagreement")
    if args.rollouts and args.objective != "disagreement":
        raise ColmError("--rollouts is for --objective disagreement (add --with-gold to also use the gold solutions)")
    for path in map(Path, args.rollouts):
        recs = read_done(path)
        if args.rollout_limit is not None:
            recs = {e.index: recs[e.index] for e in train_ex[:args.rollout_limit] if e.index in recs}
        model = rollout_model(recs, path)
        # Along the expert's own answers its argmax is the target, so only the base needs a pass; along the
        # base's or Co-LLM's (whose tokens come from either model), the expert's argmax is needed for the label.
        sources.append((path.name, sequences(train_ex, enc, tok, recs, eos), root / f"rollouts-{path.stem}",
                        model != "expert"))
    feats = []
    for name, seqs, cache, with_expert in sources:
        if not seqs:
            raise ColmError(f"no training sequences from {name} (are the rollouts for this data file?)")
        ident = {"base": pair.base_id, "expert": pair.expert_id if with_expert else None, "data": str(data_path),
                 "source": name}
        feats.append(extract(pair, seqs, cache, ident, batch_size=args.batch_size, with_expert=with_expert))
    f = {k: torch.cat([x[k] for x in feats]) for k in FEATURE_KEYS}
    seqs = [s for _, src, _, _ in sources for s in src]
    cfg = TrainConfig(objective=args.objective, init=args.init, seed=args.seed, confidence=args.inputs != "hidden")
    meta = {"base_model": pair.base_id, "expert_model": pair.expert_id, "threshold": args.threshold,
            "data": {"file": data_path.name, "problems": len({i for i, _, _ in seqs}), "dev_size": args.dev_size,
                     "sources": {name: len(src) for name, src, _, _ in sources}},
            "name": Path(args.out).name}
    head, metrics = fit(f, cfg, pair.base.config.hidden_size, meta)
    if args.joint != "none":
        if not args.out_base:
            raise ColmError("--joint needs --out-base DIR for the fine-tuned base model")
        log = lambda step, loss: step % 50 == 0 and print(f"joint step {step}: marginal NLL {loss:.4f}", file=sys.stderr)
        base, head, losses = joint_train(pair, head, seqs, args.joint, args.joint_steps, args.joint_lr, log=log)
        base.save_pretrained(args.out_base)
        pair.tokenizer.save_pretrained(args.out_base)
        head.meta["base_model"] = str(args.out_base)
        metrics["joint_final_loss"] = sum(losses[-20:]) / len(losses[-20:])
    head.save(args.out)
    report = {k: v for k, v in metrics.items() if k != "history"}
    print(json.dumps(report, indent=1))
    return 0
