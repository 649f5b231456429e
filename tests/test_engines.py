"""The engine seam: choosing an engine, and bad input on the llama.cpp engine ending in a clear ColmError (never a
process abort: llama.cpp aborts on some misuse, so sizes are checked before it is called)."""
import threading

import pytest
import torch

from colm.decode import CoLLM
from colm.engines import Pair, resolve
from colm.models import ColmError
from colm.policy import Policy

from conftest import default_pair_installed, make_test_head

needs_default = pytest.mark.skipif(not default_pair_installed(),
                                   reason="embedded default pair or llama-cpp-python not installed")


@pytest.mark.parametrize("name,sources,want", [
    ("torch", ("default", "default"), "torch"),
    ("auto", ("some/dir", "default"), "torch"),           # a model directory runs on torch
])
def test_resolve(name, sources, want):
    assert resolve(name, "cpu", sources) == want


def test_resolve_auto_prefers_llamacpp_for_gguf_on_cpu():
    from colm.engines import llamacpp_available
    assert resolve("auto", "cpu", ("default", "x.gguf")) == ("llamacpp" if llamacpp_available() else "torch")
    assert resolve("auto", "cuda", ("default", "default")) == "torch"


def test_resolve_refuses_unknown_engine():
    with pytest.raises(ColmError, match="unknown engine"):
        resolve("vllm")


def test_torch_engine_refuses_bad_feeds(pair):
    rows = pair.base.open(2)
    with pytest.raises(ColmError, match="token lists"):
        pair.base.feed(rows, [[1, 2]])
    with pytest.raises(ColmError, match="vocabulary"):
        pair.base.feed(rows, [[1, 10 ** 6], [3]])
    with pytest.raises(ColmError, match="keep"):
        pair.base.feed(rows, [[1], [3]], keep=2)
    with pytest.raises(ColmError, match="crop"):
        pair.base.crop(rows, [5, 0])


# ----------------------------------------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="module")
def small_base():
    """The real base GGUF in a small context with two slots (its own instance: the shared fixture stays clean)."""
    if not default_pair_installed():
        pytest.skip("embedded default pair or llama-cpp-python not installed")
    from colm import cache as models
    from colm.engines.llamacpp import LlamaCppEngine
    return LlamaCppEngine(models.ensure_default_gguf(models.DEFAULT_BASE), 151936, 2, role="base", n_ctx=256, n_seq=2)


@pytest.mark.parametrize("info, amx", [
    (b"CPU : AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | REPACK = 1 | ", True),     # an older build
    (b"CPU : AVX512 = 1 | AVX512_BF16 = 1 | REPACK = 1 | ", False),                   # requirements.txt's
])
def test_the_amx_kernels_are_read_off_the_build(info, amx):
    from types import SimpleNamespace
    from colm.engines import llamacpp
    assert llamacpp.amx_built(SimpleNamespace(llama_print_system_info=lambda: info)) is amx


@needs_default
def test_a_build_with_amx_kernels_runs_without_them(small_base, monkeypatch, recwarn):
    """An older build (AMX in; it died with SIGILL on a Xeon VM) is named by a warning and loads its models without
    the extra buffer types the AMX kernels run on; it answers as the normal load does, within the engine's
    crop-and-continue tolerance (other kernels, same model)."""
    import llama_cpp as L
    from colm import cache as models
    from colm.engines import llamacpp
    monkeypatch.setattr(llamacpp, "_backend_ready", False)
    monkeypatch.setattr(llamacpp, "amx_built", lambda lib: True)
    loads, real = [], L.llama_model_load_from_file
    monkeypatch.setattr(L, "llama_model_load_from_file", lambda path, mp: loads.append(mp.use_extra_bufts) or real(path, mp))
    safe = llamacpp.LlamaCppEngine(models.ensure_default_gguf(models.DEFAULT_BASE), 151936, 1, role="base",
                                   n_ctx=64, n_seq=1)
    assert loads == [False]
    assert [str(w.message) for w in recwarn if w.category is RuntimeWarning] == [llamacpp.AMX_WARNING]
    logits = []
    for eng in (small_base, safe):
        rows = eng.open(1)
        try:
            logits.append(eng.feed(rows, [[100, 101, 102, 103]], keep=1).logits[0][-1].float())
        finally:
            eng.close(rows)
    assert logits[0].argmax() == logits[1].argmax() and (logits[0] - logits[1]).abs().max() < 0.5


@needs_default
def test_llamacpp_refuses_a_file_that_is_not_gguf(tmp_path):
    from colm.engines.llamacpp import LlamaCppEngine
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    with pytest.raises(ColmError, match="not a GGUF"):
        LlamaCppEngine(bad, 100, 1)


@needs_default
def test_llamacpp_refuses_a_damaged_gguf(tmp_path):
    from colm.engines.llamacpp import LlamaCppEngine
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ColmError, match="could not load"):
        LlamaCppEngine(bad, 100, 1)


@needs_default
def test_llamacpp_refuses_another_vocabulary():
    from colm import cache as models
    from colm.engines.llamacpp import LlamaCppEngine
    with pytest.raises(ColmError, match="another vocabulary"):
        LlamaCppEngine(models.ensure_default_gguf(models.DEFAULT_BASE), 200_000, 1)


@needs_default
def test_llamacpp_refuses_non_gguf_sources():
    from colm.engines import load_pair
    with pytest.raises(ColmError, match="GGUF"):
        load_pair("some/model-dir", "default", engine="llamacpp")


@needs_default
def test_llamacpp_checks_sizes_before_calling(small_base):
    rows = small_base.open(1)
    try:
        with pytest.raises(ColmError, match="vocabulary"):
            small_base.feed(rows, [[151936]])
        with pytest.raises(ColmError, match="context"):
            small_base.feed(rows, [[100] * 300])
        assert rows.lengths == [0]                 # nothing was fed
        with pytest.raises(ColmError, match="vocabulary"):
            small_base.score([[100, 151936]], [[0]], hidden=False, reduce=lambda lg, s: {"x": lg})
        out = small_base.feed(rows, [[100, 101, 102]], keep=2, hidden=True)
        assert out.logits[0].shape == (2, 151936) and out.hidden.shape == (1, 896)
    finally:
        small_base.close(rows)


@needs_default
def test_llamacpp_slots_exhausted_is_a_clear_error(small_base):
    from colm.engines.llamacpp import SlotsExhausted
    a = small_base.open(2)
    try:
        with pytest.raises(SlotsExhausted, match="slots"):
            small_base.open(1)
    finally:
        small_base.close(a)
    assert small_base.free_slots == 2


@needs_default
def test_more_sessions_than_slots(llama_pair):
    """Each kept trace holds a row; a new decode frees the least recently used idle one, whose trace can then no
    longer be re-decoded (a clear message), while the newest traces still can."""
    from colm.engines.llamacpp import LlamaCppEngine
    small = [LlamaCppEngine(e.path, e.n_vocab, 2, role=e.role, n_ctx=512, n_seq=2)
             for e in (llama_pair.base, llama_pair.expert)]
    dec = CoLLM(Pair(*small, llama_pair.tokenizer, "b", "e"), make_test_head(896, std=0.05))
    traces = [dec.generate(f"Say {w}.", threshold=0.5, max_new_tokens=4) for w in ("one", "two", "three")]
    assert traces[0].state is None or traces[0].state.closed
    with pytest.raises(ColmError, match="cannot be re-decoded"):
        dec.redecode(traces[0], 0.1, max_new_tokens=4)
    assert dec.redecode(traces[2], 0.1, max_new_tokens=4).steps
    with pytest.raises(ColmError, match="slots"):
        dec.generate_batch(["a", "b", "c"], Policy("base"), max_new_tokens=2)   # a batch larger than the slots
    for tr in traces:
        tr.release()


@needs_default
def test_stop_mid_answer_frees_nothing_early_and_release_frees(llama_pair, llama_head):
    dec = CoLLM(llama_pair, llama_head)
    free = llama_pair.base.free_slots
    stop = threading.Event()
    for n, tr in enumerate(dec.stream("Count to twenty.", Policy("colm", threshold=0.5), 40, stop=stop)):
        if n == 3:
            stop.set()
    assert tr.stop_reason == "cancelled" and len(tr.steps) == 4
    assert llama_pair.base.free_slots == free - 1       # kept for a re-decode
    tr.release()
    assert llama_pair.base.free_slots == free


@needs_default
def test_llamacpp_score_matches_feed(llama_pair):
    """Teacher forcing (score) reads the same logits and hidden states as feeding the sequence."""
    eng = llama_pair.base
    seq = llama_pair.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    got, hid = eng.score([seq], [[len(seq) - 1]], hidden=True, reduce=lambda lg, s: {"lg": lg})
    rows = eng.open(1)
    try:
        out = eng.feed(rows, [seq], keep=1, hidden=True)
    finally:
        eng.close(rows)
    assert torch.allclose(got["lg"][0], out.logits[0][-1], atol=1e-3)
    assert torch.allclose(hid[0], out.hidden[0], atol=1e-3)


@needs_default
def test_llamacpp_score_reduces_long_sequences_in_blocks_without_mixing_positions(llama_pair):
    """score() reduces 32 positions at a time: every position's numbers still land at its own index, across
    blocks and sequences (checked against asking for that one position alone, the same llama.cpp calls)."""
    eng = llama_pair.base
    seqs = [[100 + i for i in range(80)], [300 + i for i in range(45)]]
    at = [range(0, 80), range(5, 45)]
    ident = lambda lg, s: {"lg": lg, "start": torch.full((len(lg),), s)}
    got, hid = eng.score(seqs, at, hidden=True, reduce=ident)
    assert got["lg"].shape[0] == hid.shape[0] == 80 + 40
    assert torch.equal(got["start"][[0, 31, 32, 79, 80, 119]], torch.tensor([0, 0, 32, 64, 80, 112]))
    for row, (seq_i, j) in {0: (0, 0), 33: (0, 33), 79: (0, 79), 80: (1, 5), 119: (1, 44)}.items():
        one, one_h = eng.score([seqs[seq_i]], [[j]], hidden=True, reduce=ident)
        assert torch.equal(one["lg"][0], got["lg"][row]) and torch.equal(one_h[0], hid[row])


@needs_default
def test_context_overflow_refused_by_the_decoder(llama_pair, llama_head):
    with pytest.raises(ColmError, match="context"):
        CoLLM(llama_pair, llama_head).generate("hello", threshold=0.5, max_new_tokens=llama_pair.base.n_ctx)


def test_closing_rows_after_the_engine_was_freed_is_harmless(small_base):
    """A garbage cycle can free an engine before the DecodeState holding its rows; closing them then must not
    touch the freed llama.cpp context (it segfaulted)."""
    from colm.engines.llamacpp import LlamaCppEngine
    eng = LlamaCppEngine(small_base.path, small_base.n_vocab, threads=1, role="base", n_ctx=256, n_seq=2)
    rows = eng.open(1)
    eng.feed(rows, [[100, 101]])
    eng.__del__()
    eng.close(rows)
    assert rows.slots == [] and eng.ctx is None


@pytest.mark.parametrize("other_cells", [496, 160, 16, 150, 200, 8])
def test_a_rows_numbers_do_not_depend_on_the_other_rows(other_cells):
    """Rows share one KV cache, so another row holding cells moves where this row's cells start.  Measured: when
    they start on a 16-cell boundary (16, 32, 64, 160, 256, 496 cells before them) the row's logits and hidden
    state are bit for bit its own; otherwise (8, 150, 200) the attention kernels sum the same products in another
    order and the quantised layers amplify it to up to 0.25 in a logit and 0.58 in the hidden state, with an f32
    KV cache as with f16.  That is a batch-composition difference, so it is held to the crop-and-continue
    tolerances of test_reference (LLAMA_LOGIT_TOL 0.5, LLAMA_HIDDEN_TOL 1.5; decisions there allow near-ties),
    with the same negative control: the prompt one token off must miss by more.  (Flash attention, off now, moved
    logits by up to 0.3 even at aligned starts.)"""
    from test_reference import LLAMA_HIDDEN_TOL, LLAMA_LOGIT_TOL

    from colm import cache
    from colm.engines.llamacpp import LlamaCppEngine
    if not default_pair_installed():
        pytest.skip("embedded default pair or llama-cpp-python not installed")
    eng = LlamaCppEngine(cache.ensure_default_gguf(cache.DEFAULT_BASE), 151936, 1, role="base", n_ctx=8192, n_seq=2)
    ids = [100 + i for i in range(40)]

    def alone(seq):
        r = eng.open(1)
        out = eng.feed(r, [seq], keep=1, hidden=True)
        eng.close(r)
        return out

    ref, off_by_one = alone(ids), alone(ids[:-1] + [99])
    other = eng.open(1)
    eng.feed(other, [[200 + i for i in range(other_cells)]])
    beside = alone(ids)
    eng.close(other)
    if other_cells % 16 == 0:
        assert torch.equal(beside.logits[0], ref.logits[0]) and torch.equal(beside.hidden, ref.hidden)
    dl = (beside.logits[0] - ref.logits[0]).abs().max().item()
    dh = (beside.hidden - ref.hidden).abs().max().item()
    assert dl <= LLAMA_LOGIT_TOL and dh <= LLAMA_HIDDEN_TOL, (dl, dh)
    miss_l = (off_by_one.logits[0] - ref.logits[0]).abs().max().item()
    miss_h = (off_by_one.hidden - ref.hidden).abs().max().item()
    assert miss_l > 2 * LLAMA_LOGIT_TOL or miss_h > 2 * LLAMA_HIDDEN_TOL, (miss_l, miss_h)
