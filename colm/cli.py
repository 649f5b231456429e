"""Command line: ``python -m colm generate | rollouts | train | evaluate``.  Each subcommand is one small function whose
docstring is its help; user errors print one line to stderr and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .models import ColmError

from .head import SHIPPED_HEAD  # noqa: F401  (the app and docs refer to it from here too)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="default", help="base model: 'default', a directory, a .gguf or a hub id")
    p.add_argument("--expert", default="default", help="expert model, same forms as --base")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto (bf16 where the CPU has it)")


def _load(args, need_head: bool = True):
    """Load the pair and the head named by ``args`` (the shipped head by default)."""
    import warnings
    from .head import UntrainedHeadWarning, load_head
    from .models import load_pair
    pair = load_pair(args.base, args.expert, dtype=args.dtype, device=args.device,
                     progress=lambda m: print(m, file=sys.stderr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntrainedHeadWarning)
        head = load_head(pair, getattr(args, "head", None))
    if need_head and any(issubclass(w.category, UntrainedHeadWarning) for w in caught):
        print(f"warning: {caught[0].message}", file=sys.stderr)
    return pair, head


def _policy(args, head):
    from .decode import Policy
    threshold = args.threshold if args.threshold is not None else head.threshold
    return Policy(args.policy, threshold=threshold, rate=args.rate, min_prob=args.min_prob, seed=args.seed)


def render_marked(trace, color: bool) -> str:
    """The answer with expert-sourced runs marked: ANSI colour on a terminal, [[...]] otherwise."""
    out, run = [], []
    open_, close = ("\x1b[1;38;5;208m", "\x1b[0m") if color else ("[[", "]]")
    for s in trace.steps:
        if s.source == "expert":
            run.append(s.text)
            continue
        if run:
            out.append(open_ + "".join(run) + close)
            run = []
        out.append(s.text)
    if run:
        out.append(open_ + "".join(run) + close)
    return "".join(out)


def cmd_generate(args) -> int:
    """Decode one prompt with Co-LLM (or a baseline policy) and show which tokens came from the expert."""
    pair, head = _load(args, need_head=args.policy == "colm")
    from .decode import CoLLM
    dec = CoLLM(pair, head)
    trace = dec.generate(args.prompt, policy=_policy(args, head), max_new_tokens=args.max_new_tokens,
                         chat=not args.raw)
    if args.json:
        d = trace.to_dict(full=False)
        keys = ("text", "deferral_rate", "expert_calls", "decode_seconds", "tokens_per_second", "base_model",
                "expert_model", "head", "head_trained", "policy", "stop_reason", "steps")
        print(json.dumps({k: d[k] for k in keys}, ensure_ascii=False))
        return 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(render_marked(trace, color))
    n_exp = sum(s.source == "expert" for s in trace.steps)
    print(f"\ndeferral rate: {trace.deferral_rate:.1%} ({n_exp}/{len(trace.steps)} tokens from the expert, "
          f"{trace.expert_calls} expert calls, {trace.tokens_per_second:.1f} tokens/s)")
    return 0


def cmd_rollouts(args) -> int:
    """Greedy answers of one model (or of Co-LLM with a head) to GSM8K problems, appended to a JSONL file
    (resumable: reruns skip what is done)."""
    from .data import DEFAULT_DATA, read_jsonl, split
    from .decode import CoLLM, Policy
    from .rollouts import rollout
    if args.start < 0 or args.limit < 1:
        raise ColmError("--start must be ≥ 0 and --limit ≥ 1")
    if args.model != "colm" and (args.head or args.threshold is not None):
        raise ColmError("--head and --threshold are for --model colm")
    train, dev = split(read_jsonl(Path(args.data) if args.data else DEFAULT_DATA), args.dev_size)
    examples = (train if args.split == "train" else dev)[args.start:args.start + args.limit]
    pair, head = _load(args, need_head=args.model == "colm")
    if args.model == "colm":
        # Co-LLM's own trajectories: the states its deferral policy visits (the second labelling round).
        from .evaluate import run_policy
        thr = args.threshold if args.threshold is not None else head.threshold
        tag = {"model": "colm", "head": head.identity, "threshold": thr}
        done = run_policy(CoLLM(pair, head), examples, Policy("colm", threshold=thr), Path(args.out), args.batch_size,
                          args.max_new_tokens, window=8, tag=tag)
    else:
        model = pair.expert if args.model == "expert" else pair.base
        done = rollout(model, pair.tokenizer, examples, args.out, args.batch_size, args.max_new_tokens,
                       CoLLM(pair).encode, role=args.model)
    ok = sum(done[e.index]["correct"] for e in examples)
    print(f"{len(examples)} answers in {args.out}; {ok / len(examples):.1%} correct")
    return 0


def cmd_train(args) -> int:
    """Train a deferral head on GSM8K-format data (teacher-forced features, then the chosen objective)."""
    from .train import main as train_main
    return train_main(args)


def cmd_evaluate(args) -> int:
    """Sweep thresholds on the dev split, compare with baselines and write results JSON + a Plotly figure."""
    from .evaluate import main as eval_main
    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colm", description="Co-LLM: a base model that learns when to defer to an expert.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    g.add_argument("prompt")
    g.add_argument("--threshold", type=float, default=None, help="defer when p_defer > this (default: the head's)")
    g.add_argument("--policy", default="colm", choices=["colm", "base", "expert", "random", "confidence"])
    g.add_argument("--rate", type=float, default=0.2, help="deferral rate for --policy random")
    g.add_argument("--min-prob", type=float, default=0.5, help="confidence policy: defer below this top probability")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--head", default=None, help="deferral head .safetensors (default: the shipped head)")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of marked text")
    _common_model_args(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("rollouts", help=cmd_rollouts.__doc__, description=cmd_rollouts.__doc__)
    r.add_argument("--model", default="expert", choices=["expert", "base", "colm"],
                   help="colm: Co-LLM's answers with --head at its threshold (labels along its own trajectories)")
    r.add_argument("--head", default=None, help="--model colm: deferral head .safetensors (default: the shipped head)")
    r.add_argument("--threshold", type=float, default=None, help="--model colm: defer when p_defer > this "
                                                                  "(default: the head's)")
    r.add_argument("--split", default="train", choices=["train", "dev"])
    r.add_argument("--data", default=None, help="GSM8K-format JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    r.add_argument("--dev-size", type=int, default=300)
    r.add_argument("--limit", type=int, default=2000)
    r.add_argument("--start", type=int, default=0,
                   help="skip the split's first N problems (to share a run between processes or machines)")
    r.add_argument("--out", required=True)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=256)
    _common_model_args(r)
    r.set_defaults(func=cmd_rollouts)

    from .train import add_arguments as train_args
    t = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    train_args(t)
    _common_model_args(t)
    t.set_defaults(func=cmd_train)

    from .evaluate import add_arguments as eval_args
    e = sub.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    eval_args(e)
    _common_model_args(e)
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ColmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
