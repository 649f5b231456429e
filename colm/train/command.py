"""``colm train``: its arguments and the command body (features for each source, the fit, optional joint training)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..models import ColmError
from .features import FEATURE_KEYS, extract, select_examples, sequences
from .fitting import TrainConfig, fit
from .joint import joint_train
from .labels import rollout_model

SHARD_EXAMPLES = 64   # problems per feature shard: the unit a cache is reused and resumed in


def add_arguments(p) -> None:
    """The ``colm train`` options (the model options come from ``colm.loading.add_model_arguments``)."""
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
    p.add_argument("--dev-size", type=int, default=300,
                   help="problems in each dev half carved from the data (never trained on; colm.data.halves)")
    p.add_argument("--features", default="runs/features",
                   help="feature cache root: gold solutions in DIR/gold, each rollouts file in DIR/rollouts-<name>")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init", default="weak", choices=["weak", "disagreement", "none"],
                   help="--objective marginal: start from the weak-supervision fit (the paper), the base-vs-expert "
                        "disagreement fit, or zeros")
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


def main(args) -> int:
    """The ``colm train`` command: features for the gold solutions and/or rollouts, the fit, optional joint training;
    writes the head to ``args.out`` and prints its metrics as JSON."""
    from ..data import DEFAULT_DATA, halves, read_jsonl
    from ..decode import CoLLM
    from ..loading import load_from_args
    from ..rollouts import read_done
    data_path = Path(args.data) if args.data else DEFAULT_DATA
    pool = halves(read_jsonl(data_path), args.dev_size)[0]   # neither dev half
    train_ex = pool[:args.limit] if args.limit else pool
    # The gold cache is extracted in whole shards of the pool's file order, so a smaller --limit reads the shards a
    # larger run made (a learning curve from one cache) instead of rewriting the last one for its partial size;
    # the problems past --limit in that shard are dropped from the features before the fit.
    gold_ex = pool[:math.ceil(len(train_ex) / SHARD_EXAMPLES) * SHARD_EXAMPLES]
    pair, _ = load_from_args(args, need_head=False)
    enc = CoLLM(pair).encode
    tok = pair.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    root = Path(args.features)
    sources = []  # (name, sequences, cache directory, run the expert too)
    if args.objective != "disagreement" or args.with_gold:
        sources.append(("gold", sequences(gold_ex, enc, tok, None, eos), root / "gold", True))
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
        # The engine is part of what a feature is: llama.cpp's quantised weights and torch's bf16 give different
        # hidden states, and a cache must never mix them.
        ident = {"base": pair.base_id, "expert": pair.expert_id if with_expert else None, "data": str(data_path),
                 "source": name, "engine": pair.engine}
        feats.append(extract(pair, seqs, cache, ident, batch_size=args.batch_size, shard_examples=SHARD_EXAMPLES,
                             with_expert=with_expert))
    keep = {e.index for e in train_ex}
    f = select_examples({k: torch.cat([x[k] for x in feats]) for k in FEATURE_KEYS}, keep)
    sources = [(name, [s for s in src if s[0] in keep], cache, w) for name, src, cache, w in sources]
    seqs = [s for _, src, _, _ in sources for s in src]
    cfg = TrainConfig(objective=args.objective, init=args.init, seed=args.seed, confidence=args.inputs != "hidden")
    meta = {"base_model": pair.base_id, "expert_model": pair.expert_id, "threshold": args.threshold,
            "data": {"file": data_path.name, "problems": len({i for i, _, _ in seqs}), "dev_size": args.dev_size,
                     "sources": {name: len(src) for name, src, _, _ in sources}},
            "name": Path(args.out).name}
    head, metrics = fit(f, cfg, pair.base.hidden_size, meta)
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
