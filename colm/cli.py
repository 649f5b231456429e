"""Command line: ``colm generate | rollouts | train | evaluate | app`` (or ``python -m colm ...``).  Each subcommand is
one small function whose docstring is its help; user errors print one line to stderr and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .evaluate import add_arguments as eval_args
from .loading import add_model_arguments, load_from_args
from .models import ColmError
from .train import add_arguments as train_args

EXPERT_ON, EXPERT_OFF = "\x1b[1;38;5;208m", "\x1b[0m"   # how a terminal shows expert-written text
JSON_KEYS = ("text", "deferral_rate", "expert_calls", "decode_seconds", "tokens_per_second", "base_model",
             "expert_model", "head", "head_trained", "engine", "policy", "stop_reason", "steps")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``colm generate: error: ...`` on stderr, exit 2 (no usage block)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _policy(args, head):
    from .decode import Policy
    threshold = args.threshold if args.threshold is not None else head.threshold
    min_prob = args.min_prob if args.min_prob is not None else head.min_prob
    return Policy(args.policy, threshold=threshold, rate=args.rate, min_prob=min_prob, seed=args.seed)


def render_marked(trace, color: bool) -> str:
    """The answer with expert-sourced runs marked: ANSI colour on a terminal, [[...]] otherwise."""
    out, run = [], []
    open_, close = (EXPERT_ON, EXPERT_OFF) if color else ("[[", "]]")
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


def stream_marked(traces, color: bool, out=None):
    """Write each new step's text to ``out`` (stdout) as ``traces`` (``CoLLM.stream``) yields it, expert runs marked as
    ``render_marked`` marks them, flushing after every token; returns the last trace.  A run left open by an error or
    Ctrl-C is closed, so the terminal is not left coloured."""
    out = out or sys.stdout
    open_, close = (EXPERT_ON, EXPERT_OFF) if color else ("[[", "]]")
    trace, shown, in_run = None, 0, False
    try:
        for trace in traces:
            for s in trace.steps[shown:]:
                expert = s.source == "expert"
                if expert != in_run:
                    out.write(open_ if expert else close)
                    in_run = expert
                out.write(s.text)
            shown = len(trace.steps)
            out.flush()
    finally:
        out.write((close if in_run else "") + "\n")
        out.flush()
    return trace


def _summary(trace) -> str:
    n_exp = sum(s.source == "expert" for s in trace.steps)
    return (f"\ndeferral rate: {trace.deferral_rate:.1%} ({n_exp}/{len(trace.steps)} tokens from the expert, "
            f"{trace.expert_calls} expert calls, {trace.tokens_per_second:.1f} tokens/s)")


def _forces(values: list[str]) -> list[tuple[int, str]]:
    """``--force POS=expert|base`` values -> [(position, source)] by position."""
    out = {}
    for v in values:
        pos, _, src = v.partition("=")
        if not pos.strip().isdigit() or src not in ("base", "expert") or int(pos) in out:
            raise ColmError(f"--force takes POS=expert or POS=base, one per position (POS: a generated position, "
                            f"0-based), got {v!r}")
        out[int(pos)] = src
    return sorted(out.items())


def generate_forced(dec, args, policy):
    """Decode up to the first forced position, then branch there and at each later one (``CoLLM.branch``, the
    page's "use the other model here"); each decode stops just past the next forced position, so nothing is thrown
    away."""
    forces = _forces(args.force)
    ends = [pos + 1 for pos, _ in forces[1:]] + [args.max_new_tokens]
    trace = dec.generate(args.prompt, policy=policy, max_new_tokens=min(forces[0][0] + 1, args.max_new_tokens),
                         chat=not args.raw)
    for (pos, src), end in zip(forces, ends):
        trace = dec.branch(trace, pos, src, max_new_tokens=min(end, args.max_new_tokens))
    trace.release()
    return trace


def _show_forced(trace, as_json: bool) -> int:
    if as_json:
        d = trace.to_dict(full=False)
        print(json.dumps({k: d[k] for k in JSON_KEYS + ("forced_positions",)}, ensure_ascii=False))
        return 0
    print(render_marked(trace, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    print(_summary(trace) + f"; forced: {', '.join(map(str, trace.forced_positions))}")
    return 0


def _show_backtracked(trace, as_json: bool) -> int:
    if as_json:
        d = trace.to_dict(full=False)
        print(json.dumps({k: d[k] for k in JSON_KEYS + ("forced_positions", "rollbacks", "expert_fed")},
                         ensure_ascii=False))
        return 0
    print(render_marked(trace, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    print(_summary(trace))
    for r in trace.rollbacks:
        print(f"rolled back at token {r['position']} ({r['detector']}: {r['reason']}): dropped {r['discarded']!r}, "
              f"the expert wrote {r['replacement']!r}")
    if not trace.rollbacks:
        print("no rollback: no completed line was found wrong")
    return 0


def cmd_generate(args) -> int:
    """Decode one prompt with Co-LLM (or a baseline policy) and show which tokens came from the expert (streamed, in
    colour, on a terminal).  --force has a given model write a given token and the policy continue from there;
    --backtrack has the expert rewrite a line the arithmetic checker finds wrong."""
    if args.force:
        _forces(args.force)         # a malformed --force fails before the models load
    if args.force and args.backtrack:
        raise ColmError("--force and --backtrack do not combine: a rollback may rewrite a forced token")
    if args.backtrack:
        from .backtrack import Backtrack
        cfg = Backtrack(max_retries=args.max_retries)
    pair, head = load_from_args(args, need_head=args.policy == "colm")
    from .decode import CoLLM
    dec = CoLLM(pair, head)
    if args.force:
        return _show_forced(generate_forced(dec, args, _policy(args, head)), args.json)
    if args.backtrack:
        from .backtrack import generate_backtracking
        trace = generate_backtracking(dec, args.prompt, _policy(args, head), args.max_new_tokens, cfg,
                                      chat=not args.raw)
        return _show_backtracked(trace, args.json)
    if args.json:
        trace = dec.generate(args.prompt, policy=_policy(args, head), max_new_tokens=args.max_new_tokens,
                             chat=not args.raw)
        d = trace.to_dict(full=False)
        print(json.dumps({k: d[k] for k in JSON_KEYS}, ensure_ascii=False))
        return 0
    if sys.stdout.isatty():
        traces = dec.stream(args.prompt, _policy(args, head), args.max_new_tokens, chat=not args.raw)
        trace = stream_marked(traces, color=not os.environ.get("NO_COLOR"))
    else:
        trace = dec.generate(args.prompt, policy=_policy(args, head), max_new_tokens=args.max_new_tokens,
                             chat=not args.raw)
        print(render_marked(trace, color=False))
    print(_summary(trace))
    return 0


def cmd_rollouts(args) -> int:
    """Greedy answers of one model (or of Co-LLM with a head) to GSM8K problems, appended to a JSONL file
    (resumable: reruns skip what is done; a manifest beside the file must match the rerun's settings)."""
    from .data import DEFAULT_DATA, read_jsonl, select
    from .decode import CoLLM, Policy
    from .runs import data_fingerprint, run_policy
    if args.start < 0 or args.limit < 1:
        raise ColmError("--start must be ≥ 0 and --limit ≥ 1")
    if args.model != "colm" and (args.head or args.threshold is not None):
        raise ColmError("--head and --threshold are for --model colm")
    data = Path(args.data) if args.data else DEFAULT_DATA
    rows = read_jsonl(data)
    examples = select(rows, args.split, args.dev_size)[args.start:args.start + args.limit]
    pair, head = load_from_args(args, need_head=args.model == "colm")
    dec = CoLLM(pair, head if args.model == "colm" else None)
    if args.model == "colm":
        # Co-LLM's own trajectories: the states its deferral policy visits (the second labelling round).
        thr = args.threshold if args.threshold is not None else head.threshold
        policy, tag = Policy("colm", threshold=thr), {"model": "colm", "head": head.identity, "threshold": thr}
    else:
        # The base's or the expert's greedy answers: the same Co-LLM loop under a pure policy (any engine; it stops
        # where every decode stops).
        policy, tag = Policy(args.model), {"model": args.model}
    done = run_policy(dec, examples, policy, Path(args.out), args.batch_size, args.max_new_tokens, window=8, tag=tag,
                      data=data_fingerprint(rows), restart=args.restart, data_file=data.name)
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


def cmd_app(args) -> int:
    """Run the Gradio demo (app.py).  Every option after `app` goes to the demo: `colm app --help` lists them."""
    try:
        import app
    except ModuleNotFoundError as e:
        if e.name == "app":
            raise ColmError("the demo (app.py) is not importable: run from a checkout, or install it with "
                            "`pip install -e .`") from None
        raise ColmError(f"the demo needs {e.name}: pip install -r requirements.txt") from None
    prog, sys.argv[0] = sys.argv[0], "colm app"   # the demo's own parser names itself after argv[0]
    try:
        return app.main(args.app_args)
    finally:
        sys.argv[0] = prog


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="colm", description="Co-LLM: a base model that learns when to defer to an expert.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, **kw):
        s = sub.add_parser(name, help=func.__doc__, description=func.__doc__, **kw)
        s.set_defaults(func=func)
        return s

    g = command("generate", cmd_generate)
    g.add_argument("prompt")
    g.add_argument("--threshold", type=float, default=None, help="defer when p_defer > this (default: the head's)")
    g.add_argument("--policy", default="colm", choices=["colm", "base", "expert", "random", "confidence"])
    g.add_argument("--rate", type=float, default=0.2, help="deferral rate for --policy random")
    g.add_argument("--min-prob", type=float, default=None,
                   help="confidence policy: defer below this top probability (default: the cut-off recorded with the "
                        "head, deferring as often as the head at its η; else 0.5)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--head", default=None, help="deferral head .safetensors (default: the shipped head)")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of marked text")
    g.add_argument("--force", action="append", default=[], metavar="POS=expert|base",
                   help="have that model write generated token POS (0-based), then let the policy continue "
                        "(repeatable; shown in --json as forced_positions)")
    g.add_argument("--backtrack", action="store_true",
                   help="check each completed line's arithmetic; roll a wrong line back and have the expert rewrite "
                        "it (shown in --json as rollbacks)")
    g.add_argument("--max-retries", type=int, default=2, help="--backtrack: rollbacks an answer at most")
    add_model_arguments(g)

    r = command("rollouts", cmd_rollouts)
    r.add_argument("--model", default="expert", choices=["expert", "base", "colm"],
                   help="colm: Co-LLM's answers with --head at its threshold (labels along its own trajectories)")
    r.add_argument("--head", default=None, help="--model colm: deferral head .safetensors (default: the shipped head)")
    r.add_argument("--threshold", type=float, default=None, help="--model colm: defer when p_defer > this "
                                                                  "(default: the head's)")
    r.add_argument("--split", default="train", choices=["train", "dev-a", "dev-b", "dev"],
                   help="train: neither dev half (colm.data.halves); dev (= dev-a) or dev-b")
    r.add_argument("--data", default=None, help="GSM8K-format JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    r.add_argument("--dev-size", type=int, default=300)
    r.add_argument("--limit", type=int, default=2000)
    r.add_argument("--start", type=int, default=0,
                   help="skip the split's first N problems (to share a run between processes or machines)")
    r.add_argument("--out", required=True)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--restart", action="store_true",
                   help="if --out was written with other settings (or has no manifest), move it aside "
                        "(OUT.replaced-TIME) and start again instead of stopping with an error")
    add_model_arguments(r)

    t = command("train", cmd_train)
    train_args(t)
    add_model_arguments(t)

    e = command("evaluate", cmd_evaluate)
    eval_args(e)
    add_model_arguments(e)

    # The demo parses its own options (app.main): everything after `app`, --help included, goes to it.
    command("app", cmd_app, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is cmd_app:
        args.app_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ColmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
