"""Learning test on hand-built bigram models: the expert is right and the base wrong on one known class of
tokens, so a head that learned anything must defer exactly there."""

import pytest
import torch

from colm.decode import CoLLM, Policy
from colm.evaluate import quantile_thresholds, summarize
from colm.models import ColmError, Pair
from colm.train import TrainConfig, auc, extract, fit, marginal_nll, split_by_example, weak_labels

SPECIALS = 3  # ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|> in the conftest tokenizer


def bigram_model(tok, table: dict[int, int], hidden: int, scale: float = 1.0):
    """A Qwen2 whose blocks are silenced (zero output projections), so the final hidden state is the current
    token's one-hot embedding and the LM head is a lookup table current -> next."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    V = len(tok)
    cfg = Qwen2Config(vocab_size=V, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.model.norm.weight.fill_(1.0)
        m.model.layers[0].input_layernorm.weight.fill_(1.0)
        m.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        m.model.embed_tokens.weight[torch.arange(V), torch.arange(V)] = 1.0
        for cur, nxt in table.items():
            m.lm_head.weight[nxt, cur] = scale
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def bigram(tok):
    V = len(tok)
    span = V - SPECIALS
    gold = {i: SPECIALS + (i * 7 + 3) % span for i in range(V)}
    hard = {i for i in range(SPECIALS, V) if i % 5 == 0}            # the class the base gets wrong
    base = {i: (SPECIALS + (gold[i] - SPECIALS + 1) % span) if i in hard else gold[i] for i in range(V)}
    hidden = ((V + 3) // 4) * 4
    # The expert is right everywhere but unsure (P(gold) ~ 0.1); the base is sure and right except on ``hard``.
    # So the marginal likelihood prefers the expert exactly on ``hard`` and the base elsewhere.
    pair = Pair(bigram_model(tok, base, hidden), bigram_model(tok, gold, hidden, scale=0.2), tok,
                "bigram-base", "bigram-expert")
    seqs = []
    for n in range(60):
        start = SPECIALS + (n * 13) % span
        prompt = [start]
        target = [gold[start]]
        for _ in range(40):
            target.append(gold[target[-1]])
        seqs.append((n, prompt, target))
    return pair, seqs, hard


@pytest.mark.parametrize("objective", ["marginal", "gold-disagreement"])
def test_head_learns_to_defer_on_the_hard_class(bigram, tmp_path, objective):
    pair, seqs, hard = bigram
    f = extract(pair, seqs, tmp_path / "feats", {"base": "b", "expert": "e"}, batch_size=8, progress=False)
    current = torch.tensor([([p[-1]] + t[:-1])[k] for _, p, t in seqs for k in range(len(t))])
    # Sanity: the synthetic pair behaves as designed on the gold text.
    z = weak_labels(f)
    assert torch.equal(z.bool(), torch.isin(current, torch.tensor(sorted(hard))))
    head, metrics = fit(f, TrainConfig(objective=objective, max_epochs=40, lr=5e-2), pair.base.config.hidden_size,
                        {"base_model": "bigram-base"})
    p = head.p_defer(f["h"].float())
    # One-hot hidden states cannot generalise to a token never seen in training: judge the tokens it saw.
    train_mask, _ = split_by_example(f, 0.1, 0)
    seen = torch.isin(current, current[train_mask])
    assert seen.float().mean() > 0.9
    on = torch.isin(current, torch.tensor(sorted(hard)))[seen]
    p = p[seen]
    assert on.any() and (~on).any()
    assert (p[on] > 0.5).all(), "the head must defer on the class the base gets wrong"
    assert (p[~on] < 0.5).all(), "... and nowhere else"
    assert metrics["val_auc"] > 0.99
    if objective == "marginal":
        assert metrics["val_nll"] < metrics["val_nll_base"]
        assert metrics["val_nll_oracle"] <= metrics["val_nll"] + 1e-3
    # Decoding with the learned head reproduces the expert's (gold) continuation.
    dec = CoLLM(pair, head)
    _, prompt, target = seqs[3]
    tr = dec.generate(pair.tokenizer.decode(prompt), policy=Policy("colm", threshold=0.5),
                      max_new_tokens=20, chat=False)
    exp = dec.generate(pair.tokenizer.decode(prompt), policy=Policy("expert"), max_new_tokens=20, chat=False)
    assert tr.token_ids == exp.token_ids
    assert 0 < tr.deferral_rate < 0.5


def test_untrained_fit_is_not_trained_head(pair):
    from colm.head import untrained_head
    assert not untrained_head(pair.base).trained


def test_feature_cache_resumes_and_refuses_other_data(bigram, tmp_path):
    pair, seqs, _ = bigram
    d = tmp_path / "feats"
    a = extract(pair, seqs, d, {"base": "b"}, shard_examples=16, progress=False)
    shards = sorted(d.glob("shard-*.safetensors"))
    assert len(shards) == 4
    # Simulate a kill mid-write: a torn temporary shard and a missing final shard.
    shards[-1].unlink()
    (d / "shard-00002.safetensors.tmp").write_bytes(b"garbage")
    b = extract(pair, seqs, d, {"base": "b"}, shard_examples=16, progress=False)
    assert not list(d.glob("*.tmp"))
    for k in a:
        assert torch.equal(a[k], b[k])
    # A smaller --limit reuses the matching prefix shards; changed data in a shard is recomputed, not reused.
    c = extract(pair, seqs[:20], d, {"base": "b"}, shard_examples=16, progress=False)
    assert len(c["target"]) == sum(len(t) for _, _, t in seqs[:20])
    changed = [(i, p, t[:-1]) for i, p, t in seqs[:16]]
    e = extract(pair, changed, d, {"base": "b"}, shard_examples=16, progress=False)
    assert len(e["target"]) == sum(len(t) for _, _, t in changed)
    with pytest.raises(ColmError, match="other models"):
        extract(pair, seqs, d, {"base": "another-model"}, shard_examples=16, progress=False)


def test_marginal_nll_limits():
    lb, le = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.2, 0.8]))
    big = torch.tensor([-30.0, 30.0])
    assert marginal_nll(big, lb, le).item() == pytest.approx(-(torch.log(torch.tensor(0.9)) + torch.log(torch.tensor(0.8))).item() / 2, abs=1e-4)


def test_auc():
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5


@pytest.mark.parametrize("fractions", [(0.0, 0.1, 0.3, 0.5, 0.9), (0.2,)])
def test_sweep_quantiles(fractions):
    p = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    thr = quantile_thresholds(p, fractions)
    for f, t in zip(fractions, thr):
        assert (p > t).float().mean().item() == pytest.approx(f, abs=2e-3)
    assert thr == sorted(thr, reverse=True)
    if fractions[0] == 0.0:
        assert thr[0] == 1.0


def test_summarize_deferral_is_mean_of_per_example_fractions():
    recs = {0: {"ids": [1] * 10, "correct": True, "deferral": 0.5, "expert_calls": 5, "batch_seconds": 1.0, "batch_tokens": 20},
            1: {"ids": [1] * 10, "correct": False, "deferral": 0.1, "expert_calls": 1, "batch_seconds": 1.0, "batch_tokens": 20}}
    s = summarize(recs)
    assert s["accuracy"] == 0.5 and s["deferral"] == pytest.approx(0.3) and s["tokens_per_second"] == 20.0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_joint_training_lowers_the_marginal_nll(tok, mode):
    pytest.importorskip("peft")
    from conftest import make_model
    from colm.head import DeferralHead
    from colm.train import joint_train
    base, expert = make_model(tok, 10), make_model(tok, 11)
    pair = Pair(base, expert, tok, "b", "e")
    seqs = [(i, tok("question %d" % i)["input_ids"], tok(" the answer is %d" % (i * 7))["input_ids"]) for i in range(8)]
    head = DeferralHead(base.config.hidden_size)
    before = [p.detach().clone() for p in base.parameters()]
    _, head, losses = joint_train(pair, head, seqs, mode=mode, steps=30, lr=3e-3, batch_size=8)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert head.trained and head.meta["objective"] == f"marginal+joint-{mode}"
    assert any(not torch.equal(a, b) for a, b in zip(before, pair.base.parameters())), "base weights must change"


def test_disagreement_proxy_scores_a_learned_head(bigram, tmp_path):
    from colm.data import Example, messages
    from colm.evaluate import disagreement_proxy
    pair, seqs, hard = bigram
    f = extract(pair, seqs, tmp_path / "feats", {"base": "b"}, progress=False)
    head, _ = fit(f, TrainConfig(objective="gold-disagreement", max_epochs=40, lr=5e-2), pair.base.config.hidden_size)
    dec = CoLLM(pair, head)
    examples = [Example(i, pair.tokenizer.decode([SPECIALS + 11 * i]), "", "0") for i in range(6)]
    answers = {e.index: {"ids": dec.generate(messages(e.question), policy=Policy("expert"), max_new_tokens=24).token_ids}
               for e in examples}
    good = disagreement_proxy(dec, examples, answers)
    assert good["auc"] > 0.95 and good["recall_at_30pct"] > 0.9
    torch.nn.init.normal_(head.linear.weight)  # a head that learned nothing scores near chance
    bad = disagreement_proxy(CoLLM(pair, head), examples, answers)
    assert bad["auc"] < 0.8


def test_rollouts_resume_and_return_only_requested(pair, tmp_path):
    import json as _json
    from colm.data import Example
    from colm.rollouts import read_done, rollout
    dec = CoLLM(pair)
    ex = [Example(i, f"question number {i}", "", "0") for i in range(5)]
    out = tmp_path / "r.jsonl"
    first = rollout(pair.base, pair.tokenizer, ex[:3], out, batch_size=2, max_new_tokens=6, encode=dec.encode,
                    progress=False)
    assert sorted(first) == [0, 1, 2]
    with open(out, "a") as f:
        f.write('{"index": 3, "ids": [1, 2')  # a line torn by a kill
    again = rollout(pair.base, pair.tokenizer, ex, out, batch_size=2, max_new_tokens=6, encode=dec.encode,
                    progress=False)
    assert sorted(again) == [0, 1, 2, 3, 4] and again[0] == first[0]
    assert sorted(read_done(out)) == [0, 1, 2, 3, 4]
    assert all(_json.loads(line) for line in out.read_text().splitlines())
    assert sorted(rollout(pair.base, pair.tokenizer, ex[:2], out, encode=dec.encode, progress=False)) == [0, 1]
    # Same tokens as the Co-LLM loop under the pure base policy.
    tr = dec.generate([{"role": "user", "content": ex[4].question + "\n\n" + __import__("colm").data.INSTRUCTION}],
                      policy=Policy("base"), max_new_tokens=6)
    assert again[4]["ids"] == tr.token_ids[:len(again[4]["ids"])]
