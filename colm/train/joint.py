"""Joint training: the head together with the base (LoRA adapters or every weight), on the marginal likelihood."""
from __future__ import annotations

import torch

from ..head import DeferralHead
from ..models import ColmError
from .features import gold_logprobs, right_pad, target_index
from .objectives import marginal_nll


def joint_train(pair, head: DeferralHead, seqs: list, mode: str = "lora", steps: int = 200, lr: float = 1e-4,
                head_lr: float = 1e-2, batch_size: int = 4, rank: int = 8, seed: int = 0, log=None):
    """Train the head together with the base (paper, Sec. 3.2): LoRA adapters (``mode='lora'``, via peft) or every
    base weight (``'full'``), on the marginal likelihood; the expert stays frozen.  Meant for a GPU.

    Returns (base model with LoRA merged in, head, per-step losses).
    """
    torch.manual_seed(seed)
    if pair.engine != "torch":
        raise ColmError("joint training needs gradients through the base: use --engine torch (on a GPU)")
    dev, n_vocab = pair.device, len(pair.tokenizer)
    base = pair.base.model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        base = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        backbone, lm = base.get_base_model().model, base.get_base_model()
    elif mode == "full":
        base.requires_grad_(True)
        backbone, lm = base.model, base
    else:
        raise ColmError(f"unknown joint mode {mode!r}; use lora or full")
    base.train()
    head.to(dev).train().requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in base.parameters() if p.requires_grad], "lr": lr},
                             {"params": head.parameters(), "lr": head_lr}])
    losses = []
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = [seqs[int(i)] for i in torch.randint(len(seqs), (min(batch_size, len(seqs)),), generator=g)]
        ids, mask = right_pad([p + t for _, p, t in batch], pair.tokenizer.pad_token_id)
        r_idx, c_idx = (t.to(dev) for t in target_index(batch))
        ids, mask = ids.to(dev), mask.to(dev)
        gold = ids[r_idx, c_idx + 1]
        with torch.no_grad():
            he = pair.expert.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[r_idx, c_idx]
            lp_e, _, _ = gold_logprobs(pair.expert.model, he, gold, n_vocab, conf=False)
        hb = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[r_idx, c_idx]
        lp_b, _, conf = gold_logprobs(lm, hb, gold, n_vocab)
        loss = marginal_nll(head(hb, conf=conf), lp_b, lp_e)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log:
            log(step, losses[-1])
    base.eval()
    head.eval()
    merged = base.merge_and_unload() if mode == "lora" else base
    merged.requires_grad_(False)
    head.requires_grad_(False)
    head.meta.update({"trained": True, "objective": f"marginal+joint-{mode}"})
    return merged, head, losses
