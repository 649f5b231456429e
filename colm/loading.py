"""Loading the models a command names: the shared ``--base/--expert/--device/--dtype`` options and the loader behind
them.  Every command (``colm generate | rollouts | train | evaluate``) uses these, so they live here, below the
command line, and the modules that run those commands never reach up into it."""
from __future__ import annotations

import argparse
import sys
import warnings

from .head import UntrainedHeadWarning, load_head
from .models import ColmError
from .engines import ENGINES, load_pair


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options that name the models and where they run: --base, --expert, --engine, --threads, --device,
    --dtype."""
    p.add_argument("--base", default="default", help="base model: 'default', a directory, a .gguf or a hub id")
    p.add_argument("--expert", default="default", help="expert model, same forms as --base")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="auto: llama.cpp on a CPU for GGUF models (the default pair), torch on a GPU or for model "
                        "directories; torch: transformers (the reference, needed by --joint); llamacpp")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto (bf16 where the CPU has it)")
    add_expert_server_arguments(p)


def add_expert_server_arguments(p: argparse.ArgumentParser) -> None:
    """--expert-url and its companions: the expert on a server (colm.engines.remote) instead of --expert."""
    import os
    p.add_argument("--expert-url", default=None,
                   help="the expert on a server, e.g. http://127.0.0.1:8080 (then --expert is not loaded)")
    p.add_argument("--expert-api", default="llama-server", choices=["llama-server", "vllm", "sglang"],
                   help="what serves --expert-url (default llama-server)")
    p.add_argument("--expert-api-key", default=os.environ.get("COLM_EXPERT_API_KEY"),
                   help="sent as a bearer token (default: $COLM_EXPERT_API_KEY)")
    p.add_argument("--expert-timeout", type=float, default=60.0,
                   help="seconds to wait for one expert answer before retrying (default 60)")


def expert_server_kwargs(args) -> dict:
    """The load_pair keywords for an expert server named on the command line (none without --expert-url)."""
    if not getattr(args, "expert_url", None):
        return {}
    return {"expert_url": args.expert_url, "expert_api": args.expert_api, "expert_api_key": args.expert_api_key,
            "expert_timeout": args.expert_timeout}


def load_from_args(args, need_head: bool = True, **engine_kwargs):
    """Load the pair and the head named by ``args`` (``args.head``, else the shipped head where it fits); returns
    ``(pair, head)``.  Progress goes to stderr.  When ``need_head`` and no trained head could be used, a one-line
    warning says so (the head returned is then untrained)."""
    if args.threads is not None and args.threads < 1:
        raise ColmError("--threads must be at least 1")
    batch, max_new = getattr(args, "batch_size", None), getattr(args, "max_new_tokens", None)
    if batch and max_new and "n_seq" not in engine_kwargs:
        # llama.cpp's rows are slots fixed when the context is made: room for a whole batch of answers
        # (prompts here are GSM8K problems, well under 1,024 tokens)
        engine_kwargs.update(n_seq=max(8, batch), n_ctx=max(8192, batch * (max_new + 1024)))
    pair = load_pair(args.base, args.expert, engine=args.engine, dtype=args.dtype, device=args.device,
                     threads=args.threads, progress=lambda m: print(m, file=sys.stderr),
                     **expert_server_kwargs(args), **engine_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntrainedHeadWarning)
        head = load_head(pair, getattr(args, "head", None))
    if need_head and any(issubclass(w.category, UntrainedHeadWarning) for w in caught):
        print(f"warning: {caught[0].message}", file=sys.stderr)
    return pair, head
