"""Learning test on hand-built bigram models: the expert is right and the base wrong on one known class of
tokens, so a head that learned anything must defer exactly there."""

import json

import pytest
import torch

from colm.decode import CoLLM, Policy
from colm.evaluate import quantile_thresholds, summarize
from colm.models import ColmError


def Pair(base, expert, tok, base_id, expert_id):
    """Two transformers models behind torch engines (the tests build their own tiny pairs)."""
    from colm.engines import Pair as EnginePair
    from colm.engines.torch_engine import TorchEngine
    return EnginePair(TorchEngine(base, len(tok)), TorchEngine(expert, len(tok)), tok, base_id, expert_id)
from colm.train import TrainConfig, auc, extract, fit, marginal_nll, split_by_example, weak_labels

SPECIALS = 3  # ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|> in the conftest tokenizer


def bigram_model(tok, table: dict[int, int], hidden: int, scale: float | dict = 1.0):
    """A Qwen2 whose blocks are silenced (zero output projections), so the final hidden state is the current
    token's one-hot embedding and the LM head is a lookup table current -> next (``scale``: how sure, per token)."""
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
            m.lm_head.weight[nxt, cur] = scale[cur] if isinstance(scale, dict) else scale
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


def current_tokens(seqs) -> torch.Tensor:
    """The input token at every target position, in feature order."""
    return torch.tensor([([p[-1]] + t[:-1])[k] for _, p, t in seqs for k in range(len(t))])


@pytest.mark.parametrize("confidence", [False, True], ids=["hidden", "hidden+confidence"])
@pytest.mark.parametrize("objective,init", [("marginal", "weak"), ("marginal", "disagreement"),
                                            ("gold-disagreement", "weak")],
                         ids=["marginal", "marginal-from-disagreement", "gold-disagreement"])
def test_head_learns_to_defer_on_the_hard_class(bigram, tmp_path, objective, init, confidence):
    pair, seqs, hard = bigram
    f = extract(pair, seqs, tmp_path / "feats", {"base": "b", "expert": "e"}, batch_size=8, progress=False)
    current = current_tokens(seqs)
    # Sanity: the synthetic pair behaves as designed on the gold text.
    z = weak_labels(f)
    assert torch.equal(z.bool(), torch.isin(current, torch.tensor(sorted(hard))))
    head, metrics = fit(f, TrainConfig(objective=objective, init=init, max_epochs=40, lr=5e-2, confidence=confidence),
                        pair.base.hidden_size, {"base_model": "bigram-base"})
    assert head.uses_confidence == confidence
    p = head.p_defer(f["h"].float(), conf=f["conf"])
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


def test_confidence_head_defers_on_unseen_tokens_where_the_base_is_unsure(tok, tmp_path):
    """One-hot hidden states say nothing about a token never seen in training; the base's own uncertainty does.
    The base is right but unsure on the hard class and the expert is sure, so the head must learn "defer when the
    base is unsure" and apply it to hard tokens it never saw.  A hidden-state-only head cannot."""
    V, span = len(tok), len(tok) - SPECIALS
    gold = {i: SPECIALS + (i * 7 + 3) % span for i in range(V)}
    hard = {i for i in range(SPECIALS, V) if i % 3 == 0}
    # base: sure and right on easy tokens; on hard ones it has no preference at all (argmax is arbitrary)
    base_table = {i: gold[i] for i in range(V) if i not in hard}
    hidden = ((V + 3) // 4) * 4
    pair = Pair(bigram_model(tok, base_table, hidden, scale=8.0), bigram_model(tok, gold, hidden, scale=8.0), tok,
                "b", "e")
    tokens = list(range(SPECIALS, V))
    g = torch.Generator().manual_seed(0)
    tokens = [tokens[i] for i in torch.randperm(len(tokens), generator=g)]
    seen, unseen = set(tokens[: len(tokens) // 2]), set(tokens[len(tokens) // 2:])
    # Sequences of (current, gold next) pairs whose current tokens are all in ``seen``.
    seqs = [(n, [c], [gold[c]]) for n, c in enumerate(sorted(seen))]
    f_train = extract(pair, seqs, tmp_path / "train", {"base": "b"}, progress=False)
    heads = {c: fit(f_train, TrainConfig(objective="gold-disagreement", val_fraction=0.2, lr=5e-2, max_epochs=60,
                                         confidence=c), hidden)[0] for c in (False, True)}
    test = [(n, [c], [gold[c]]) for n, c in enumerate(sorted(unseen))]
    f_test = extract(pair, test, tmp_path / "test", {"base": "b"}, progress=False)
    on = torch.isin(current_tokens(test), torch.tensor(sorted(hard)))
    assert on.any() and (~on).any()
    p = heads[True].p_defer(f_test["h"].float(), conf=f_test["conf"])
    assert (p[on] > 0.5).all() and (p[~on] < 0.5).all()
    q = heads[False].p_defer(f_test["h"].float())
    assert auc(q, on.float()) < 0.8 < auc(p, on.float())


def test_decoder_and_training_see_the_same_confidence_features(pair, tmp_path):
    """The head reads the base's confidence from the decode loop's logits at run time and from cached teacher-
    forced features at training time: both paths must give the same p_defer for the same tokens."""
    from colm.head import DeferralHead
    from colm.train import features_for_batch
    torch.manual_seed(0)
    head = DeferralHead(pair.base.hidden_size, {"trained": True}, confidence=True)
    torch.nn.init.normal_(head.linear.weight)
    with torch.no_grad():
        head.linear.weight[0, -3:] = torch.tensor([4.0, -2.0, 3.0])
    dec = CoLLM(pair, head)
    tr = dec.generate("Natalia sold 48 clips", policy=Policy("colm", threshold=0.5), max_new_tokens=12, chat=False)
    prompt = dec.encode("Natalia sold 48 clips", chat=False)
    f = features_for_batch(pair, [(0, prompt, tr.token_ids)], with_expert=False)
    p = head.p_defer(f["h"].float(), conf=f["conf"])
    assert p.tolist() == pytest.approx([s.p_defer for s in tr.steps], abs=2e-3)


@pytest.mark.parametrize("lengths", [((3, 5), (6, 2)), ((1, 1),), ((4, 7), (2, 1), (5, 3))])
def test_target_index_reads_the_position_before_each_target(lengths):
    from colm.train import right_pad, target_index
    batch = [(10 + i, list(range(100 * i, 100 * i + p)), list(range(100 * i + 50, 100 * i + 50 + t)))
             for i, (p, t) in enumerate(lengths)]
    ids, _ = right_pad([p + t for _, p, t in batch], pad_id=-1)
    rows, cols = target_index(batch)
    assert ids[rows, cols + 1].tolist() == [tok for _, _, t in batch for tok in t]
    assert ids[rows, cols].tolist() == [([*p, *t])[k - 1] for _, p, t in batch for k in range(len(p), len(p) + len(t))]


def test_batched_features_match_one_row_at_a_time(pair, tok):
    """Right padding and the target index must not mix rows: a batch gives each row's single-row features."""
    from colm.train import features_for_batch
    batch = [(i, tok(q)["input_ids"], tok(a)["input_ids"])
             for i, (q, a) in enumerate([("What is 2+2?", " 4"), ("Natalia sold 48 clips", " then 24 more in May")])]
    together = features_for_batch(pair, batch)
    alone = [features_for_batch(pair, [b]) for b in batch]
    assert together["example"].tolist() == [i for i, _, t in batch for _ in t]
    assert together["pos"].tolist() == [k for _, _, t in batch for k in range(len(t))]
    for key in ("lp_base", "lp_expert"):
        assert together[key].tolist() == pytest.approx(torch.cat([a[key] for a in alone]).tolist(), abs=1e-3)
    assert together["target"].tolist() == torch.cat([a["target"] for a in alone]).tolist()


def test_fit_refuses_an_unknown_start():
    n = 40
    f = {"h": torch.randn(n, 4), "conf": torch.rand(n, 3), "lp_base": -torch.rand(n), "lp_expert": -torch.rand(n),
         "arg_base": torch.randint(0, 3, (n,)), "arg_expert": torch.randint(0, 3, (n,)),
         "target": torch.randint(0, 3, (n,)), "example": torch.arange(n) // 4, "pos": torch.arange(n) % 4}
    with pytest.raises(ColmError, match="unknown init"):
        fit(f, TrainConfig(objective="marginal", init="gold"), 4)


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
    assert any(not torch.equal(a, b) for a, b in zip(before, pair.base.model.parameters())), "base weights must change"


def test_disagreement_proxy_scores_a_learned_head(bigram, tmp_path):
    from colm.data import Example, messages
    from colm.evaluate import disagreement_proxy
    pair, seqs, hard = bigram
    f = extract(pair, seqs, tmp_path / "feats", {"base": "b"}, progress=False)
    head, _ = fit(f, TrainConfig(objective="gold-disagreement", max_epochs=40, lr=5e-2), pair.base.hidden_size)
    dec = CoLLM(pair, head)
    examples = [Example(i, pair.tokenizer.decode([SPECIALS + 11 * i]), "", "0") for i in range(6)]
    answers = {e.index: {"ids": dec.generate(messages(e.question), policy=Policy("expert"), max_new_tokens=24).token_ids}
               for e in examples}
    good = disagreement_proxy(dec, examples, answers)
    assert good["auc"] > 0.95 and good["recall_at_30pct"] > 0.9
    torch.nn.init.normal_(head.linear.weight)  # a head that learned nothing scores near chance
    bad = disagreement_proxy(CoLLM(pair, head), examples, answers)
    assert bad["auc"] < 0.8


def test_disagreement_labels_compare_argmaxes_and_fall_back_to_the_target():
    from colm.train import disagreement_labels
    f = {"arg_base": torch.tensor([5, 5, 7, 7]), "arg_expert": torch.tensor([5, 6, -1, -1]),
         "target": torch.tensor([9, 9, 7, 8])}
    # rows 0-1 carry the expert's argmax (gold / base answers); rows 2-3 are the expert's own answer (target).
    assert disagreement_labels(f).tolist() == [0.0, 1.0, 0.0, 1.0]


def gsm_file(path, n):
    path.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 1} more. How many?",
                                        "answer": f"{i}+{i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}"})
                            + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("model", ["base", "colm"])
def test_train_cli_on_rollouts_with_gold(pair_dirs, tmp_path, model):
    """`colm rollouts --model base|colm` then `colm train --objective disagreement --rollouts ... --with-gold`: both
    sources are cached separately, labelled by the argmax rule, and named in the head's metadata."""
    from colm.cli import main
    from colm.head import DeferralHead
    from colm.rollouts import read_done
    data = gsm_file(tmp_path / "gsm.jsonl", 18)     # two dev halves of 4, 10 to train on
    models = ["--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"), "--dtype", "fp32"]
    roll = tmp_path / f"{model}-train.jsonl"
    # An untrained head says p_defer = 0.5 everywhere: threshold 0.4 defers every token, so Co-LLM writes the
    # expert's greedy answer, a known trajectory to check against.
    colm_args = ["--threshold", "0.4"] if model == "colm" else []
    assert main(["rollouts", "--model", model, "--data", str(data), "--dev-size", "4", "--limit", "6",
                 "--max-new-tokens", "8", "--batch-size", "3", "--out", str(roll), *colm_args, *models]) == 0
    recs = read_done(roll)
    assert len(recs) == 6 and {r["model"] for r in recs.values()} == {model}
    out = tmp_path / "h.safetensors"
    feats = tmp_path / "feats"
    assert main(["train", "--data", str(data), "--dev-size", "4", "--objective", "disagreement", "--rollouts", str(roll),
                 "--with-gold", "--features", str(feats), "--out", str(out), *models]) == 0
    assert sorted(p.name for p in feats.iterdir()) == ["gold", f"rollouts-{model}-train"]
    head = DeferralHead.load(out)
    assert head.trained and head.uses_confidence and head.meta["objective"] == "disagreement"
    assert head.meta["data"]["sources"] == {"gold": 10, f"{model}-train.jsonl": 6}
    assert head.meta["data"]["problems"] == 10
    # The base's or Co-LLM's answers are labelled against the expert's argmax: those features ran the expert.
    from colm.train import disagreement_labels, load_features
    f = load_features(sorted((feats / f"rollouts-{model}-train").glob("shard-*.safetensors")))
    assert (f["arg_expert"] >= 0).all()
    writer = "arg_base" if model == "base" else "arg_expert"
    assert torch.equal(f[writer], f["target"])
    assert torch.equal(disagreement_labels(f), (f["arg_base"] != f["arg_expert"]).float())
    if model == "colm":
        assert all(r["deferral"] == 1.0 and r["threshold"] == 0.4 for r in recs.values())
        return
    # --start shares a run between processes: the second one answers the problems after the first one's.
    from colm.data import halves, read_jsonl
    more = tmp_path / "base-train-from6.jsonl"
    assert main(["rollouts", "--model", "base", "--data", str(data), "--dev-size", "4", "--start", "6", "--limit", "3",
                 "--max-new-tokens", "2", "--out", str(more), *models]) == 0
    assert sorted(read_done(more)) == sorted(e.index for e in halves(read_jsonl(data), 4)[0][6:9])


def test_a_smaller_limit_reads_a_larger_runs_shards(pair_dirs, tmp_path, monkeypatch):
    """A learning curve from one cache: `train --limit 5` after `--limit 10` reuses the whole shards the larger run
    wrote (none rewritten for its partial size) and fits on exactly the first 5 training problems; the cache's
    identity names the engine, so features from another engine are never mixed in."""
    from colm.cli import main
    from colm.data import halves, read_jsonl
    from colm.head import DeferralHead
    from colm.train import command
    monkeypatch.setattr(command, "SHARD_EXAMPLES", 4)
    data = gsm_file(tmp_path / "gsm.jsonl", 18)     # two dev halves of 4, 10 to train on
    models = ["--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"), "--dtype", "fp32"]
    feats = tmp_path / "feats"
    common = ["train", "--data", str(data), "--dev-size", "4", "--objective", "gold-disagreement",
              "--features", str(feats), *models]
    assert main([*common, "--out", str(tmp_path / "all.safetensors")]) == 0
    manifest = lambda: json.loads((feats / "gold" / "manifest.json").read_text())
    before = manifest()
    assert before["identity"]["engine"] == "torch" and len(before["shards"]) == 3     # 4 + 4 + 2 problems
    stamps = {p.name: p.stat().st_mtime_ns for p in (feats / "gold").glob("shard-*")}
    assert main([*common, "--limit", "5", "--out", str(tmp_path / "five.safetensors")]) == 0
    assert manifest() == before
    assert {p.name: p.stat().st_mtime_ns for p in (feats / "gold").glob("shard-*")} == stamps
    head = DeferralHead.load(tmp_path / "five.safetensors")
    assert head.meta["data"]["problems"] == 5 and head.meta["metrics"]["examples"] == 5
    assert DeferralHead.load(tmp_path / "all.safetensors").meta["metrics"]["examples"] == 10
    first5 = halves(read_jsonl(data), 4)[0][:5]
    assert head.meta["data"]["sources"] == {"gold": len(first5)}


@pytest.mark.parametrize("models", [("base", None), (None, None), ("base", "expert"), ("gpt", "gpt")],
                         ids=["mixed", "unnamed", "two-models", "unknown"])
def test_train_cli_refuses_rollouts_without_one_named_model(pair_dirs, tmp_path, capsys, models):
    from colm.cli import main
    data = gsm_file(tmp_path / "gsm.jsonl", 8)
    roll = tmp_path / "r.jsonl"
    roll.write_text("".join(json.dumps({"index": i, "ids": [5, 6], "text": "x", "correct": False,
                                        **({"model": m} if m else {})}) + "\n" for i, m in enumerate(models)))
    assert main(["train", "--data", str(data), "--dev-size", "2", "--objective", "disagreement", "--rollouts", str(roll),
                 "--out", str(tmp_path / "h.safetensors"), "--base", str(pair_dirs / "base"),
                 "--expert", str(pair_dirs / "expert"), "--dtype", "fp32"]) == 2
    assert "one model" in capsys.readouterr().err


@pytest.mark.parametrize("engine, want", [("llamacpp", (0.3, 0.97)), ("torch", (0.2, 0.98)), ("other", (0.1, 0.9))])
def test_a_head_takes_the_threshold_and_cut_off_calibrated_on_its_engine(tmp_path, engine, want):
    """η and the confidence rule's matched cut-off are both per engine; an engine without its own keeps the single
    stored value."""
    from types import SimpleNamespace
    from colm.head import DeferralHead, load_head
    DeferralHead(8, {"trained": True, "threshold": 0.1, "thresholds": {"llamacpp": 0.3, "torch": 0.2},
                     "min_prob": 0.9, "min_probs": {"llamacpp": 0.97, "torch": 0.98}}).save(tmp_path / "h.safetensors")
    head = load_head(SimpleNamespace(engine=engine, base=None, base_id="tiny"), tmp_path / "h.safetensors")
    assert (head.threshold, head.min_prob) == want
    assert DeferralHead(8).min_prob == 0.5       # none recorded


@pytest.mark.parametrize("meta", [{"thresholds": {"llamacpp": 1.5}}, {"min_probs": {"torch": 1.5}}, {"min_prob": 1.5}])
def test_a_head_with_a_bad_stored_cut_off_is_refused(tmp_path, meta):
    from colm.head import DeferralHead
    from colm.models import ColmError
    DeferralHead(8, {"trained": True, **meta}).save(tmp_path / "h.safetensors")
    with pytest.raises(ColmError, match="1.5 is not a number in"):
        DeferralHead.load(tmp_path / "h.safetensors")
