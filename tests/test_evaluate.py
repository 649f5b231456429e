import json

import pytest
import torch

from colm.cli import main
from colm.decode import Policy
from colm.evaluate import choose
from colm.models import ColmError
from colm.head import DeferralHead


def test_evaluate_end_to_end_on_tiny_pair(pair_dirs, tmp_path, capsys):
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
    # Random deferral: seeds 0, 1, 2, one run file each, reported as mean ± sd with the per-seed points.
    rnd = res["random"][0]
    assert rnd["seeds"] == [0, 1, 2] and [p["seed"] for p in rnd["per_seed"]] == [0, 1, 2]
    accs = [p["accuracy"] for p in rnd["per_seed"]]
    assert rnd["accuracy"] == pytest.approx(sum(accs) / 3) and rnd["accuracy_sd"] >= 0
    assert rnd["accuracy_min"] == min(accs) and rnd["accuracy_max"] == max(accs)
    assert all((out / "runs" / f"random-{rnd['rate']:.3f}-seed{s}.jsonl").exists() for s in (0, 1, 2))
    # Every run file has its manifest beside it.
    files = sorted(p.name for p in (out / "runs").iterdir())
    assert [f for f in files if f.endswith(".jsonl")] and all(
        f.replace(".jsonl", ".manifest.json") in files for f in files if f.endswith(".jsonl"))
    assert {"auc", "recall_at_30pct", "disagreement_rate"} <= set(res["proxy"])
    assert (out / "curve.html").stat().st_size > 10_000
    stored = DeferralHead.load(tmp_path / "h.safetensors")
    assert stored.threshold == res["chosen"]["threshold"] and stored.meta["metrics"]["dev"]["chosen"]
    assert {"confidence", "proxy", "random", "paired"} <= set(stored.meta["metrics"]["dev"])
    assert stored.meta["thresholds"] == {"torch": res["chosen"]["threshold"]} and stored.meta["protocol"]["chosen_on"]
    # The confidence rule's cut-off at the chosen point's share, recorded beside η for the page and CLI.
    assert stored.meta["min_probs"] == {"torch": res["confidence"][0]["min_prob"]}
    assert stored.min_prob == res["confidence"][0]["min_prob"]
    # Intervals and budget counts on every point; Co-LLM paired with each baseline on the same problems.
    for point in (res["base"], res["expert"], res["chosen"], *res["random"][0]["per_seed"]):
        lo, hi = point["accuracy_ci"]
        assert 0 <= lo <= point["accuracy"] <= hi <= 1 and 0 <= point["capped"] <= point["n"] and point["capped_known"]
    assert {"colm_vs_expert", "colm_vs_base", "colm_vs_confidence", "colm_vs_random_seed0"} <= set(res["paired"])
    cmp = res["paired"]["colm_vs_expert"]
    assert cmp["n"] == 4 and cmp["accuracy_a"] == res["chosen"]["accuracy"] and cmp["accuracy_b"] == res["expert"]["accuracy"]
    # Re-running reuses every decode (resumable JSONL runs) and both teacher-forced passes: no file changes.
    lines = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", ",".join(str(p["threshold"]) for p in res["colm"]), "--max-new-tokens", "6",
                 "--batch-size", "2", "--dtype", "fp32"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "runs").iterdir() if p.name in lines} == lines
    # A fixed baseline rate names (and decodes) the random run at that rate instead of the chosen frequency.
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", str(res["chosen"]["threshold"]), "--max-new-tokens", "6", "--batch-size", "2",
                 "--dtype", "fp32", "--baseline-rate", "0.5"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["random"][0]["rate"] == 0.5 and (out / "runs" / "random-0.500-seed2.jsonl").exists()
    # A budget keeps the choice within it (0 % allows only the never-defer point); extra random rates make a curve.
    thr = ",".join(str(p["threshold"]) for p in res["colm"])
    assert main(["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", thr, "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "fp32",
                 "--max-deferral", "0", "--random-rates", "0.25,0.5"]) == 0
    res3 = json.loads((out / "results.json").read_text())
    assert res3["chosen"]["threshold"] == 1.0 and res3["chosen"]["deferral"] == 0.0 and res3["max_deferral"] == 0.0
    assert [r["rate"] for r in res3["random"]] == [0.0, 0.25, 0.5]
    assert len(json.loads((out / "runs" / "random-0.250-seed0.jsonl").read_text().splitlines()[0])["ids"]) > 0
    # Other settings never resume these files: a different --max-new-tokens stops with the field named, and
    # --restart moves the old files aside and decodes again.
    again = ["evaluate", "--data", str(data), "--split", "file", "--limit", "4", "--head", str(tmp_path / "h.safetensors"),
             "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
             "--thresholds", thr, "--max-new-tokens", "4", "--batch-size", "2", "--dtype", "fp32", "--no-baselines"]
    capsys.readouterr()
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "base.jsonl" in err and "max_new_tokens: 6 in the file, 4 now" in err and "--restart" in err
    assert main(again + ["--restart", "--write-threshold"]) == 0
    assert [p.name for p in (out / "runs").glob("base.jsonl.replaced-*")]
    # Without baselines, storing η keeps the full "dev" evidence and files this run beside it, by engine and budget.
    kept = DeferralHead.load(tmp_path / "h.safetensors").meta
    assert kept["metrics"]["dev"] == stored.meta["metrics"]["dev"]
    assert kept["metrics"]["file/torch/4"]["n_examples"] == 4 and not kept["metrics"]["file/torch/4"]["random"]
    assert kept["protocols"]["torch"]["max_new_tokens"] == 4 and kept["protocol"]["engine"] == "torch"
    assert all(len(r["ids"]) <= 4 for r in map(json.loads, (out / "runs" / "base.jsonl").read_text().splitlines()))


@pytest.mark.parametrize("thresholds, baselines, min_prob, passes",
                         [(None, False, None, 1), ([0.5], True, None, 1), ([0.5], False, None, 0),
                          ([0.5], True, 0.9, 0)],
                         ids=["sweep", "baselines", "fixed-no-baselines", "baselines-cut-off-fixed"])
def test_teacher_forced_pass_only_when_a_sweep_or_baseline_needs_it(pair, tmp_path, monkeypatch, thresholds,
                                                                      baselines, min_prob, passes):
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
                      max_new_tokens=3, baselines=baselines, min_prob=min_prob)
    assert len(calls) == passes and res["chosen"]["n"] == 2


def test_without_baselines_a_finished_expert_run_is_reported_and_nothing_is_decoded_for_it(pair, tmp_path):
    import colm.evaluate as ev
    from colm.data import Example
    from colm.decode import CoLLM
    ex = [Example(i, f"Tom has {i} apples.", "", str(i)) for i in range(3)]
    dec = CoLLM(pair, DeferralHead(32, {"trained": True, "threshold": 0.5}))
    kw = dict(thresholds=[0.5], batch_size=2, max_new_tokens=3, baselines=False, data=ev.data_fingerprint(ex))
    path = tmp_path / "runs" / "expert.jsonl"
    ev.run_policy(dec, ex[:2], Policy("expert"), path, 2, 3, tag={"model": "expert"}, data=kw["data"])
    before = path.read_bytes()
    assert "expert" not in ev.evaluate(dec, ex, tmp_path, **kw)              # 2 of 3 done: not decoded, not shown
    assert path.read_bytes() == before
    res = ev.evaluate(dec, ex[:2], tmp_path, **kw)                             # all done: reported as it stands
    assert res["expert"]["n"] == 2 and res["expert"]["deferral"] == 1.0 and path.read_bytes() == before
    import shutil
    shutil.copytree(tmp_path / "runs", tmp_path / "o" / "runs", ignore=shutil.ignore_patterns("base*", "colm*"))
    other = ev.evaluate(dec, ex[:2], tmp_path / "o", **{**kw, "max_new_tokens": 2})   # other settings: left alone
    assert "expert" not in other and (tmp_path / "o" / "runs" / "expert.jsonl").read_bytes() == before


def test_a_resumed_evaluation_reuses_its_teacher_forced_passes(pair, tmp_path, monkeypatch):
    """The two passes are minutes each on a real pair: a rerun over the same run files must not repeat them, and
    must repeat them for a head with other weights (same name) or other answers."""
    import colm.evaluate as ev
    import colm.train as train
    from colm.data import Example
    from colm.decode import CoLLM
    calls = []
    real = train.features_for_batch
    monkeypatch.setattr(train, "features_for_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = [Example(i, f"Tom has {i} apples.", "", str(i)) for i in range(3)]

    def run(head, n=3):
        calls.clear()
        res = ev.evaluate(CoLLM(pair, head), ex[:n], tmp_path, fractions=[0.0, 0.5], batch_size=2,
                          max_new_tokens=3, data=ev.data_fingerprint(ex))     # one data file, any subset of it
        return res, len(calls)

    torch.manual_seed(0)
    head = DeferralHead(32, {"trained": True, "threshold": 0.5, "name": "h"})
    first, n_first = run(head)
    again, n_again = run(head)
    assert n_first > 0 and n_again == 0
    assert json.dumps(again["proxy"]) == json.dumps(first["proxy"]) and again["colm"] == first["colm"]   # NaN AUC
    assert again["confidence"][0]["min_prob"] == first["confidence"][0]["min_prob"]
    assert {p.name for p in (tmp_path / "runs").glob("*.safetensors")} == {"teacher-forced-base.safetensors",
                                                                          "proxy-expert.safetensors"}
    with torch.no_grad():
        head.linear.weight.add_(0.5)                    # same name, other weights: the cache must not answer
    _, n_other = run(head)
    assert n_other == n_first
    _, n_fewer = run(head, n=2)                          # other answers (a shorter run): recomputed too
    assert n_fewer > 0


@pytest.mark.parametrize("budget, want", [(None, 0.5), (0.35, 0.2), (0.25, 0.2), (0.15, 0.1), (0.0, 0.0)])
def test_choose_best_accuracy_within_the_deferral_budget(budget, want):
    points = [{"threshold": t, "deferral": d, "accuracy": a}
              for t, d, a in ((1.0, 0.0, 0.2), (0.6, 0.1, 0.3), (0.4, 0.2, 0.35), (0.3, 0.3, 0.35), (0.2, 0.5, 0.4))]
    # Without a budget the most accurate point wins; the tie at 35 % goes to the cheaper 20 % point.
    assert choose(points, budget)["deferral"] == want


def test_choose_refuses_a_budget_no_point_meets():
    with pytest.raises(ColmError, match="defers at most 5%"):
        choose([{"threshold": 0.3, "deferral": 0.3, "accuracy": 0.4}], 0.05)



def examples(n, words=None):
    from colm.data import Example
    return [Example(i, f"Tom has {i} apples and buys {i + 1} more. How many?" if words is None else words(i),
                    "", str(2 * i + 1)) for i in range(n)]


# What depends on the batch by nature: its time, and the expert's catch-up work (on torch every active row of the
# shared cache is caught up when any row defers).
TIMING = ("batch_seconds", "batch_tokens", "expert_fed")


def strip_timing(recs):
    return {i: {k: v for k, v in r.items() if k not in TIMING} for i, r in recs.items()}


def test_rollouts_never_pick_the_expert_s_padded_vocabulary_rows(pair, tmp_path):
    """The tiny expert has 8 embedding rows past the tokenizer; even when they score highest, a rollout (like the
    decoder) must choose among real tokens."""
    from colm.decode import CoLLM
    from colm.rollouts import rollout
    n = len(pair.tokenizer)
    assert pair.expert.model.config.vocab_size > n

    def boost(_mod, _inp, out):
        out[..., n:] += 1e4
        return out
    hook = pair.expert.model.lm_head.register_forward_hook(boost)
    try:
        recs = rollout(CoLLM(pair), "expert", examples(3), tmp_path / "r.jsonl", batch_size=2, max_new_tokens=5,
                       progress=False)
    finally:
        hook.remove()
    ids = [t for r in recs.values() for t in r["ids"]]
    assert ids and max(ids) < n and {r["model"] for r in recs.values()} == {"expert"}


def test_base_rollouts_stop_where_the_decoder_stops(pair, tok, tmp_path):
    """A base rollout file and CoLLM.generate under the base policy agree token for token, answers and accuracy,
    also when the base ends with <|endoftext|>: an end token of CoLLM.eos_ids that is not in the model's own
    generation_config (the old model.generate rollouts ran on past it)."""
    from colm.data import is_correct, messages
    from colm.decode import CoLLM
    from colm.rollouts import rollout
    dec = CoLLM(pair)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    gen_eos = pair.base.model.generation_config.eos_token_id
    assert eot in dec.eos_ids and eot not in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    ex = examples(6)
    m = pair.base.model
    with torch.no_grad():
        old = m.lm_head.weight[eot].clone()
        m.lm_head.weight[eot] += 5 * m.model.norm.weight.sign()   # the base now ends some answers with it
        try:
            recs = rollout(dec, "base", ex, tmp_path / "base.jsonl", batch_size=4, max_new_tokens=12, progress=False)
            want = {e.index: dec.generate(messages(e.question), policy=Policy("base"), max_new_tokens=12) for e in ex}
        finally:
            m.lm_head.weight[eot] = old
    ended = [i for i, tr in want.items() if tr.stop_reason == "eos" and tr.token_ids[-1] == eot]
    assert ended and any(len(want[i].token_ids) > 1 for i in ended)   # the case this test is about happened
    for e in ex:
        assert recs[e.index]["ids"] == want[e.index].token_ids and recs[e.index]["text"] == want[e.index].text
        assert recs[e.index]["correct"] == is_correct(want[e.index].text, e.answer)
        assert recs[e.index]["model"] == "base" and recs[e.index]["stop_reason"] == want[e.index].stop_reason


def test_rollouts_resume_skip_torn_lines_and_return_only_requested(pair, tmp_path):
    from colm.decode import CoLLM
    from colm.rollouts import read_done, rollout
    from colm.runs import data_fingerprint
    dec = CoLLM(pair)
    ex = examples(5)
    data = data_fingerprint(ex)   # the whole problem set, so that a run over part of it can be extended
    out = tmp_path / "r.jsonl"
    first = rollout(dec, "base", ex[:3], out, batch_size=2, max_new_tokens=6, progress=False, data=data)
    assert sorted(first) == [0, 1, 2]
    with open(out, "a") as f:
        f.write('{"index": 3, "ids": [1, 2')  # a line torn by a kill
    again = rollout(dec, "base", ex, out, batch_size=2, max_new_tokens=6, progress=False, data=data)
    assert sorted(again) == [0, 1, 2, 3, 4] and again[0] == first[0]
    assert sorted(read_done(out)) == [0, 1, 2, 3, 4]
    assert all(json.loads(line) for line in out.read_text().splitlines())
    assert sorted(rollout(dec, "base", ex[:2], out, max_new_tokens=6, progress=False, data=data)) == [0, 1]


@pytest.mark.parametrize("window, first_batch", [(1, {0, 1}), (3, {4, 5})])
def test_rollouts_sort_by_length_only_within_a_window(pair, tmp_path, window, first_batch):
    """Prompts get shorter down the list; a stopped run must have answered the first problems, not the shortest."""
    from colm.decode import CoLLM
    from colm.rollouts import rollout
    out = tmp_path / "r.jsonl"
    rollout(CoLLM(pair), "base", examples(6, lambda i: "word " * (12 - 2 * i)), out, batch_size=2, max_new_tokens=2,
            progress=False, window=window)
    order = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert set(order[:2]) == first_batch and sorted(order) == list(range(6))


def test_random_runs_do_not_depend_on_the_batch_size(decoder, tmp_path):
    """Each problem's random draws come from (seed, its index): batch 1 and batch 3 write the same records."""
    from colm.runs import run_policy
    ex = examples(5)
    pol = Policy("random", rate=0.5, seed=7)
    one = run_policy(decoder, ex, pol, tmp_path / "b1.jsonl", batch_size=1, max_new_tokens=8, progress=False)
    three = run_policy(decoder, ex, pol, tmp_path / "b3.jsonl", batch_size=3, max_new_tokens=8, progress=False)
    assert strip_timing(one) == strip_timing(three)
    assert any(0 < r["deferral"] < 1 for r in one.values())          # the draws really mix base and expert
    other = run_policy(decoder, ex, Policy("random", rate=0.5, seed=8), tmp_path / "s8.jsonl", batch_size=3,
                       max_new_tokens=8, progress=False)
    assert strip_timing(other) != strip_timing(three)                 # and the seed matters


def test_a_run_resumes_only_under_the_settings_that_wrote_it(pair, head, tmp_path, capsys):
    from colm.decode import CoLLM
    from colm.runs import data_fingerprint, manifest_path, run_policy
    ex = examples(3)
    data = data_fingerprint(ex)
    dec = CoLLM(pair, head)
    colm = Policy("colm", threshold=0.5)
    path = tmp_path / "colm-0.500000.jsonl"
    run_policy(dec, ex[:2], colm, path, batch_size=2, max_new_tokens=4, progress=False, data=data)
    man = json.loads(manifest_path(path).read_text())
    assert man["match"]["max_new_tokens"] == 4 and man["match"]["engine"] == "torch"
    assert man["match"]["models"] == {"base": "tiny-base", "expert": "tiny-expert"}
    assert man["match"]["policy"] == {"name": "colm", "threshold": 0.5} and len(man["match"]["head"]["sha256"]) == 64
    assert man["info"]["head"] == head.identity and man["info"]["colm_version"]
    # The same settings resume (and extend) it.
    more = run_policy(dec, ex, colm, path, batch_size=2, max_new_tokens=4, progress=False, data=data)
    assert sorted(more) == [0, 1, 2]
    lines = path.read_text()
    other = make_head_like(head)
    for kw, field in ((dict(max_new_tokens=5), "max_new_tokens"), (dict(dec=CoLLM(pair, other)), "head.sha256"),
                      (dict(data=data_fingerprint(examples(4))), "data.questions_sha256")):
        args = dict(dec=dec, max_new_tokens=4, data=data) | kw
        with pytest.raises(ColmError, match=f"cannot be resumed: .*{field}"):
            run_policy(args.pop("dec"), ex, colm, path, batch_size=2, progress=False, **args)
    assert path.read_text() == lines
    # Runs that do not read the head may be reused with another one.
    base = run_policy(dec, ex, Policy("base"), tmp_path / "base.jsonl", max_new_tokens=4, progress=False)
    assert run_policy(CoLLM(pair, other), ex, Policy("base"), tmp_path / "base.jsonl", max_new_tokens=4,
                      progress=False) == base
    # restart moves the old file and manifest aside and decodes again.
    again = run_policy(dec, ex, colm, path, batch_size=2, max_new_tokens=5, progress=False, data=data, restart=True)
    assert sorted(again) == [0, 1, 2] and json.loads(manifest_path(path).read_text())["match"]["max_new_tokens"] == 5
    moved = sorted(p.name for p in tmp_path.glob("colm-0.500000.*.replaced-*"))
    assert len(moved) == 2 and "moved colm-0.500000.jsonl aside" in capsys.readouterr().err


def make_head_like(head):
    import copy
    other = copy.deepcopy(head)
    with torch.no_grad():
        other.linear.weight.mul_(-1)
    return other


def test_a_run_file_without_a_manifest_is_not_trusted(pair, tmp_path):
    """A run file from before manifests (or copied without its manifest) says nothing about how it was made."""
    from colm.decode import CoLLM
    from colm.rollouts import rollout
    path = tmp_path / "expert.jsonl"
    path.write_text(json.dumps({"index": 0, "ids": [5], "text": "x", "correct": False, "model": "expert"}) + "\n")
    with pytest.raises(ColmError, match="no manifest"):
        rollout(CoLLM(pair), "expert", examples(2), path, max_new_tokens=3, progress=False)
    recs = rollout(CoLLM(pair), "expert", examples(2), path, max_new_tokens=3, progress=False, restart=True)
    assert sorted(recs) == [0, 1] and recs[0]["ids"] != [5]
    assert len(list(tmp_path.glob("expert.jsonl.replaced-*"))) == 1


def test_rollouts_cli_refuses_other_settings_and_restarts(pair_dirs, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples. How many?", "answer": f"#### {i}"}) + "\n"
                            for i in range(10)))        # two dev halves of 2, six to train on
    out = tmp_path / "base-train.jsonl"

    def rollouts(limit, max_new, *more):
        return main(["rollouts", "--model", "base", "--data", str(data), "--dev-size", "2", "--limit", str(limit),
                     "--out", str(out), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                     "--dtype", "fp32", "--batch-size", "2", "--max-new-tokens", str(max_new), *more])
    assert rollouts(3, 3) == 0
    # Same settings, more problems: resumed (the first lines stay as they were).
    first = out.read_text()
    assert rollouts(5, 3) == 0
    assert out.read_text().startswith(first) and len(out.read_text().splitlines()) == 5
    capsys.readouterr()
    assert rollouts(3, 4) == 2
    assert "max_new_tokens: 3 in the file, 4 now" in capsys.readouterr().err
    assert rollouts(3, 4, "--restart") == 0
    assert len(out.read_text().splitlines()) == 3 and len(list(tmp_path.glob("base-train.jsonl.replaced-*"))) == 1


def test_committed_runs_carry_manifests_that_name_their_settings():
    """Every run file committed under data/ has a manifest; the rollouts match what this version writes for the
    default pair on the default data under the rule they were made with (end tokens only: ``stop_at_answer=False``;
    with today's default rule a resume is refused, see test_a_run_made_under_another_end_rule_is_not_resumed)."""
    from types import SimpleNamespace
    from colm.data import DEFAULT_DATA, read_jsonl
    from colm.runs import data_fingerprint, differences, manifest_path, run_manifest
    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"
    runs = sorted(root.rglob("*.jsonl"))
    assert runs
    for path in runs:
        man = json.loads(manifest_path(path).read_text())
        assert man["format"] == "colm-run/1", path
        # the protocol's 512-token runs end at the answer line too; the older 256-token runs at end tokens only
        assert (man["match"]["max_new_tokens"], man["match"].get("stop")) in {(256, None), (512, "eos or '#### n' line")}, path
        if man["info"].get("reconstructed"):        # written afterwards for runs from before the engine seam
            assert man["info"]["reconstructed"] is True and man["match"]["engine"] == "torch", path
        else:                                       # written by the run itself
            assert man["match"]["engine"] in ("torch", "llamacpp") and man["info"]["created"], path
    if not DEFAULT_DATA.exists():
        pytest.skip("the default data file is not here")
    from colm.head import SHIPPED_HEAD
    head = DeferralHead.load(SHIPPED_HEAD)
    pair = SimpleNamespace(base_id="Qwen2.5-Coder-0.5B-Instruct", expert_id="Qwen2.5-Coder-1.5B-Instruct",
                           engine="torch", base=None, describe=lambda: {})
    dec = SimpleNamespace(pair=pair, head=head, eos_ids=[151643, 151645], stop_at_answer=False)   # made so
    data = data_fingerprint(read_jsonl(DEFAULT_DATA))
    for name, policy in (("expert-train", Policy("expert")), ("base-train", Policy("base")),
                         ("colm-train", Policy("colm", threshold=head.threshold))):
        man = json.loads(manifest_path(root / "rollouts" / f"{name}.jsonl").read_text())
        assert differences(man, run_manifest(dec, policy, 256, data)) == [], name


def test_a_run_made_under_another_end_rule_is_not_resumed(pair, tmp_path):
    """Answers that end at a '#### n' line are not the answers of an end-token-only run: a resume must refuse."""
    from colm.decode import CoLLM
    from colm.runs import differences, run_manifest
    old, new = CoLLM(pair, stop_at_answer=False), CoLLM(pair)
    data = {"questions_sha256": "x", "n": 1}
    diff = differences(run_manifest(old, Policy("base"), 8, data), run_manifest(new, Policy("base"), 8, data))
    assert len(diff) == 1 and diff[0].startswith("stop"), diff


def test_a_cut_off_fixed_on_half_a_is_the_confidence_baseline_it_reports(pair, tmp_path):
    """Half B reports the confidence rule with the cut-off chosen on half A (like η), in its own run file, instead of
    re-matching the share on half B."""
    import colm.evaluate as ev
    from colm.data import Example
    from colm.decode import CoLLM
    ex = [Example(i, f"Tom has {i} apples.", "", str(i)) for i in range(2)]
    dec = CoLLM(pair, DeferralHead(32, {"trained": True, "threshold": 0.5}))
    kw = dict(thresholds=[0.5], batch_size=2, max_new_tokens=3, random_seeds=[0])
    fixed = ev.evaluate(dec, ex, tmp_path / "b", min_prob=0.8125, **kw)
    assert fixed["confidence"][0]["min_prob"] == 0.8125 and fixed["confidence"][0]["chosen_on"] == "dev-a"
    assert (tmp_path / "b" / "runs" / "confidence-A0.8125.jsonl").exists()
    matched = ev.evaluate(dec, ex, tmp_path / "a", **kw)
    assert "chosen_on" not in matched["confidence"][0] and not list((tmp_path / "a" / "runs").glob("confidence-A*"))


@pytest.mark.parametrize("extra, stored, keeps", [([], 0.9, "new"), (["--baseline-rate", "0.5"], 0.9, "none"),
                                                  (["--no-baselines"], 0.9, "none"),
                                                  (["--no-baselines"], "same", "old")],
                         ids=["matched", "other-rate", "eta-moved", "eta-kept"])
def test_write_threshold_records_the_cut_off_only_when_it_matches_the_new_eta(pair_dirs, tmp_path, extra, stored,
                                                                              keeps):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples. How many?", "answer": f"#### {i}"}) + "\n"
                            for i in range(3)))
    thr = 0.4
    eta = thr if stored == "same" else 0.7
    DeferralHead(32, {"trained": True, "threshold": eta, "thresholds": {"torch": eta}, "base_model": "tiny",
                      "min_prob": 0.9, "min_probs": {"torch": 0.9, "llamacpp": 0.95}}).save(tmp_path / "h.safetensors")
    assert main(["evaluate", "--data", str(data), "--split", "file", "--head", str(tmp_path / "h.safetensors"),
                 "--out", str(tmp_path / "ev"), "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                 "--thresholds", str(thr), "--max-new-tokens", "3", "--batch-size", "3", "--dtype", "fp32",
                 "--random-seeds", "0", "--write-threshold", *extra]) == 0
    meta = DeferralHead.load(tmp_path / "h.safetensors").meta
    assert meta["thresholds"]["torch"] == thr and meta["min_probs"]["llamacpp"] == 0.95     # other engines untouched
    if keeps == "new":
        res = json.loads((tmp_path / "ev" / "results.json").read_text())
        assert meta["min_probs"]["torch"] == meta["min_prob"] == res["confidence"][0]["min_prob"]
    elif keeps == "old":
        assert meta["min_probs"]["torch"] == meta["min_prob"] == 0.9
    else:
        assert "torch" not in meta["min_probs"] and "min_prob" not in meta


@pytest.mark.parametrize("split, want", [("dev-b", 0.8125), ("dev-a", None)])
def test_half_b_takes_the_cut_off_the_head_recorded_on_half_a(pair_dirs, tmp_path, split, want):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"Ann has {i} pens. How many?", "answer": f"#### {i}"}) + "\n"
                            for i in range(6)))
    DeferralHead(32, {"trained": True, "threshold": 0.4, "base_model": "tiny", "min_probs": {"torch": 0.8125}}).save(
        tmp_path / "h.safetensors")
    assert main(["evaluate", "--data", str(data), "--split", split, "--dev-size", "2", "--head",
                 str(tmp_path / "h.safetensors"), "--out", str(tmp_path / "ev"), "--base", str(pair_dirs / "base"),
                 "--expert", str(pair_dirs / "expert"), "--thresholds", "0.4", "--max-new-tokens", "3",
                 "--batch-size", "2", "--dtype", "fp32", "--random-seeds", "0"]) == 0
    rule = json.loads((tmp_path / "ev" / "results.json").read_text())["confidence"][0]
    assert (rule["min_prob"] == want) if want else ("chosen_on" not in rule and rule["min_prob"] != 0.8125)
