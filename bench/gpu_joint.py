"""Device placement + joint training on a GPU with a small random Qwen2 pair (no weights can reach the GPU
machine, so this checks the mechanics, not the accuracy).  The torch engine always: joint training needs gradients
through the base, which only torch gives."""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_model, make_tokenizer  # noqa: E402

from colm.decode import CoLLM, Policy  # noqa: E402
from colm.head import DeferralHead  # noqa: E402
from colm.engines import load_pair  # noqa: E402
from colm.train import joint_train  # noqa: E402

tok = make_tokenizer()
root = Path(tempfile.mkdtemp())
for name, seed, hidden in (("base", 0, 64), ("expert", 1, 128)):
    make_model(tok, seed, hidden=hidden, layers=4).save_pretrained(root / name)
    tok.save_pretrained(root / name)
report = {}
pair = load_pair(str(root / "base"), str(root / "expert"), engine="torch", dtype="auto", device="auto")
report["placement"] = {"engine": pair.engine, "base": str(pair.base.device), "expert": str(pair.expert.device),
                       "dtype": str(pair.base.model.dtype),
                       "hf_device_map": getattr(pair.base.model, "hf_device_map", None)}
head = DeferralHead(pair.base.hidden_size, {"trained": True})
torch.nn.init.normal_(head.linear.weight)
dec = CoLLM(pair, head)
tr = dec.generate("What is a^3 * a^2 if a = 5?", threshold=0.5, max_new_tokens=32)
report["decode"] = {"tokens": len(tr.steps), "deferral": tr.deferral_rate, "expert_calls": tr.expert_calls,
                    "tokens_per_second": tr.tokens_per_second}
batch = dec.generate_batch(["What is 2+2?", "def add(a, b):", "Natalia sold 48 clips"], Policy("colm", threshold=0.5), 16)
report["batch_rows"] = [b.deferral_rate for b in batch]
# Joint LoRA on fp32 copies (bf16 LoRA on a random model is fine too, fp32 keeps the check about mechanics).
pair.base.model.float(), pair.expert.model.float()
seqs = [(i, tok(f"question {i}")["input_ids"], tok(f" the answer is {i * 7}")["input_ids"]) for i in range(32)]
t = time.time()
_, head2, losses = joint_train(pair, DeferralHead(pair.base.hidden_size), seqs, mode="lora", steps=200,
                               lr=3e-3, batch_size=16)
report["joint_lora"] = {"first10": sum(losses[:10]) / 10, "last10": sum(losses[-10:]) / 10,
                        "seconds": time.time() - t, "head_device": str(next(head2.parameters()).device)}
print(json.dumps(report, indent=1))
assert report["joint_lora"]["last10"] < report["joint_lora"]["first10"]
assert report["placement"]["base"].startswith("cuda")
print("GPU CHECK OK")
