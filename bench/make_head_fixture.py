"""Regenerate tests/data/shipped_head_fixture.safetensors: real base features and the shipped head's p_defer on them.

    python bench/make_head_fixture.py            # ~1 min on a 2-core CPU

The fixture holds, for every target token of two GSM8K problems (prompt = the training chat prompt, target = the
gold solution + <|im_end|>, as ``colm train`` extracts them): the default base's final hidden state ``h``
[N, 896] (bfloat16, exactly as training caches it) and its confidence features ``conf`` [N, 3], produced by
``colm.train.features.features_for_batch`` on the **llama.cpp engine** with the embedded default GGUF base
(Qwen2.5-Coder-0.5B-Instruct, Q4_K_M); plus the shipped head's ``p_defer`` [N] computed once from those stored
(bf16-rounded) inputs, and its threshold η (tensor ``threshold`` and metadata).  tests/test_shipped_head.py
recomputes p_defer from h/conf with assets/head-gsm8k.safetensors and the current head code: it guards the head
file and the head code, not the engine (re-running this script on another CPU may give slightly other features).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = ROOT / "tests" / "data" / "shipped_head_fixture.safetensors"

# GSM8K train problems 0 and 1 (their gold solutions without the <<...>> calculator annotations).
PROBLEMS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends in May. "
     "How many clips did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72", "72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10", "10"),
]


def main() -> None:
    from colm.data import Example
    from colm.decode import CoLLM
    from colm.engines import load_pair
    from colm.head import SHIPPED_HEAD, DeferralHead
    from colm.train.features import features_for_batch, sequences

    pair = load_pair(engine="llamacpp")
    dec = CoLLM(pair)
    tok = pair.tokenizer
    examples = [Example(i, q, s, a) for i, (q, s, a) in enumerate(PROBLEMS)]
    batch = sequences(examples, dec.encode, tok, None, tok.convert_tokens_to_ids("<|im_end|>"))
    f = features_for_batch(pair, batch, with_expert=False)
    head = DeferralHead.load(SHIPPED_HEAD, pair.base, pair.base_id)
    h, conf = f["h"].contiguous(), f["conf"].float().contiguous()
    with torch.inference_mode():
        p = head.p_defer(h, conf=conf).float().contiguous()
    eta = head.threshold
    tensors = {"h": h, "conf": conf, "p_defer": p, "threshold": torch.tensor([eta], dtype=torch.float64),
               "target": f["target"].contiguous(), "example": f["example"].contiguous()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"engine": pair.engine, "base_model": pair.base_id, "head": SHIPPED_HEAD.name, "threshold": repr(eta),
            "n": str(len(p)), "deferred": str(int((p > eta).sum())), "script": "bench/make_head_fixture.py"}
    save_file(tensors, str(OUT), metadata={"colm-fixture": json.dumps(meta)})
    print(f"{OUT.relative_to(ROOT)}: N={len(p)} positions, {int((p > eta).sum())} above η={eta:.4f}, "
          f"p in [{float(p.min()):.3f}, {float(p.max()):.3f}], {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
