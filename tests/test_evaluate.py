import json

import pytest
import torch

from colm.cli import main
from colm.evaluate import choose
from colm.models import ColmError
from colm.head import DeferralHead


def test_evaluate_end_to_end_on_tiny_pair(pair_dirs, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 1} more. How many?",
                                        "answer": f"{i}+{i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}"}) + "\n"
                            for i in range(6)))
    head = DeferralHead(32, {"trained": True, "threshold": 0.5, "base_model": "tiny"})
    torch.manual_seed(0)
    torch.nn.init.normal_(head.linear.weight)
    head.save(tmp_path / "h.safetensors")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
               "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
               "--fractions", "0,0.3,0.6", "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "fp32",
               "--write-threshold"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["base"]["n"] == res["expert"]["n"] == res["chosen"]["n"] == 4
    assert res["base"]["deferral"] == 0.0 and res["expert"]["deferral"] == 1.0
    assert [p["threshold"] for p in res["colm"]][0] == 1.0 and len(res["colm"]) == 3
    defs = [p["deferral"] for p in res["colm"]]
    assert defs[0] == 0.0 and defs[-1] > 0.0
    assert res["chosen"]["threshold"] in [p["threshold"] for p in res["colm"]]
    assert res["random"][0]["rate"] == round(res["chosen"]["deferral"], 3) and res["confidence"]
    assert {"auc", "recall_at_30pct", "disagreement_rate"} <= set(res["proxy"])
    assert (out / "curve.html").stat().st_size > 10_000
    stored = DeferralHead.load(tmp_path / "h.safetensors")
    assert stored.threshold == res["chosen"]["threshold"] and stored.meta["metrics"]["dev"]["chosen"]
    assert {"confidence", "proxy", "random"} <= set(stored.meta["metrics"]["dev"])
    # Re-running reuses every decode (resumable JSONL runs): same results, no new lines.
    lines = {p.name: p.read_text() for p in (out / "runs").iterdir()}
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", ",".join(str(p["threshold"]) for p in res["colm"]), "--max-new-tokens", "6",
                 "--batch-size", "2", "--dtype", "fp32"]) == 0
    assert {p.name: p.read_text() for p in (out / "runs").iterdir() if p.name in lines} == lines
    # A fixed baseline rate names (and decodes) the random run at that rate instead of the chosen frequency.
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", str(res["chosen"]["threshold"]), "--max-new-tokens", "6", "--batch-size", "2",
                 "--dtype", "fp32", "--baseline-rate", "0.5"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["random"][0]["rate"] == 0.5 and (out / "runs" / "random-0.500.jsonl").exists()
    # A budget keeps the choice within it (0 % allows only the never-defer point); extra random rates make a curve.
    thr = ",".join(str(p["threshold"]) for p in res["colm"])
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", thr, "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "fp32",
                 "--max-deferral", "0", "--random-rates", "0.25,0.5"]) == 0
    res3 = json.loads((out / "results.json").read_text())
    assert res3["chosen"]["threshold"] == 1.0 and res3["chosen"]["deferral"] == 0.0 and res3["max_deferral"] == 0.0
    assert [r["rate"] for r in res3["random"]] == [0.0, 0.25, 0.5]
    assert len(json.loads((out / "runs" / "random-0.250.jsonl").read_text().splitlines()[0])["ids"]) > 0


@pytest.mark.parametrize("thresholds, baselines, passes", [(None, False, 1), ([0.5], True, 1), ([0.5], False, 0)],
                         ids=["sweep", "baselines", "fixed-no-baselines"])
def test_teacher_forced_pass_only_when_a_sweep_or_baseline_needs_it(pair, tmp_path, monkeypatch, thresholds,
                                                                      baselines, passes):
    """Fixed thresholds without baselines (re-summarising finished decodes) must not pay the teacher-forced pass."""
    import colm.evaluate as ev
    from colm.data import Example
    from colm.decode import CoLLM
    calls = []
    real = ev.teacher_forced_scores
    monkeypatch.setattr(ev, "teacher_forced_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    head = DeferralHead(32, {"trained": True, "threshold": 0.5})
    ex = [Example(i, f"Tom has {i} apples.", "", str(i)) for i in range(2)]
    res = ev.evaluate(CoLLM(pair, head), ex, tmp_path, fractions=[0.0, 0.5], thresholds=thresholds, batch_size=2,
                      max_new_tokens=3, baselines=baselines)
    assert len(calls) == passes and res["chosen"]["n"] == 2


@pytest.mark.parametrize("budget, want", [(None, 0.5), (0.35, 0.2), (0.25, 0.2), (0.15, 0.1), (0.0, 0.0)])
def test_choose_best_accuracy_within_the_deferral_budget(budget, want):
    points = [{"threshold": t, "deferral": d, "accuracy": a}
              for t, d, a in ((1.0, 0.0, 0.2), (0.6, 0.1, 0.3), (0.4, 0.2, 0.35), (0.3, 0.3, 0.35), (0.2, 0.5, 0.4))]
    # Without a budget the most accurate point wins; the tie at 35 % goes to the cheaper 20 % point.
    assert choose(points, budget)["deferral"] == want


def test_choose_refuses_a_budget_no_point_meets():
    with pytest.raises(ColmError, match="defers at most 5%"):
        choose([{"threshold": 0.3, "deferral": 0.3, "accuracy": 0.4}], 0.05)



def test_rollouts_never_pick_the_expert_s_padded_vocabulary_rows(pair, tmp_path):
    """The tiny expert has 8 embedding rows past the tokenizer; even when they score highest, a rollout (like the
    decoder) must choose among real tokens."""
    from colm.data import Example
    from colm.decode import CoLLM
    from colm.rollouts import rollout
    n = len(pair.tokenizer)
    assert pair.expert.config.vocab_size > n

    def boost(_mod, _inp, out):
        out[..., n:] += 1e4
        return out
    hook = pair.expert.lm_head.register_forward_hook(boost)
    try:
        ex = [Example(i, f"Tom has {i} apples. How many?", "#### 1", "1") for i in range(3)]
        recs = rollout(pair.expert, pair.tokenizer, ex, tmp_path / "r.jsonl", batch_size=2, max_new_tokens=5,
                       encode=CoLLM(pair).encode, progress=False)
    finally:
        hook.remove()
    ids = [t for r in recs.values() for t in r["ids"]]
    assert ids and max(ids) < n
