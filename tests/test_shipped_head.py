"""The head in assets/ is a product artefact: it must say what it is and carry the evidence it was chosen on."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from colm.head import SHIPPED_HEAD, DeferralHead

FIXTURE = Path(__file__).parent / "data" / "shipped_head_fixture.safetensors"


@pytest.fixture(scope="module")
def shipped():
    return DeferralHead.load(SHIPPED_HEAD)


def test_shipped_head_fits_the_default_base_and_learned_something(shipped):
    assert shipped.trained and shipped.meta["hidden_size"] == 896
    assert shipped.meta["base_model"] == "Qwen2.5-Coder-0.5B-Instruct"
    assert shipped.meta["expert_model"] == "Qwen2.5-Coder-1.5B-Instruct"
    assert float(shipped.linear.weight.norm()) > 0.1   # an all-zero head would defer everywhere or nowhere


def test_shipped_head_metadata_records_its_training_and_dev_evidence(shipped):
    meta = shipped.meta
    assert meta["objective"] in ("marginal", "disagreement", "gold-disagreement")
    assert meta["data"]["problems"] >= 2000 and meta["data"]["dev_size"] == 300
    dev = meta["metrics"]["dev"]
    assert dev["n_examples"] >= 200
    assert dev["chosen"]["threshold"] == pytest.approx(shipped.threshold)
    for key in ("base", "expert", "chosen"):
        assert dev[key]["n"] == dev["n_examples"] and 0.0 <= dev[key]["accuracy"] <= 1.0
    assert 0.0 < dev["chosen"]["deferral"] < 1.0
    assert dev["random"] and dev["random"][0]["n"] == dev["n_examples"]
    # A head that learned nothing must not ship as if it had: on its own dev evidence it beats random deferral at
    # (about) the same frequency.
    rnd = min(dev["random"], key=lambda r: abs(r["deferral"] - dev["chosen"]["deferral"]))   # one of a curve
    assert abs(rnd["deferral"] - dev["chosen"]["deferral"]) < 0.05
    assert dev["chosen"]["accuracy"] > rnd["accuracy"]


def test_shipped_head_reproduces_its_stored_p_defer_on_real_base_features(shipped):
    """Real base features (hidden states and confidence of the default base on two GSM8K solutions, made on the
    llama.cpp engine by bench/make_head_fixture.py) with the shipped head's p_defer on them, computed once and
    stored: the head file and the head code must still give them.  (Guards the head, not the engine.)"""
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = json.loads(f.metadata()["colm-fixture"])
        fx = {k: f.get_tensor(k) for k in f.keys()}
    h, conf, want, eta = fx["h"], fx["conf"], fx["p_defer"], float(fx["threshold"][0])
    assert h.shape[1] == 896 and conf.shape == (len(h), 3) and want.shape == (len(h),) and len(h) >= 64
    assert meta["head"] == SHIPPED_HEAD.name and eta == pytest.approx(shipped.threshold, abs=0)
    with torch.inference_mode():
        p = shipped.p_defer(h, conf=conf)
    assert torch.allclose(p, want, rtol=0, atol=1e-4), float((p - want).abs().max())
    assert torch.equal(p > shipped.threshold, want > eta)
    # The stored decisions mean something: some positions on either side of η.
    assert 0 < int((want > eta).sum()) < len(want)


def test_shipped_head_records_eta_per_engine_and_the_protocol_it_was_chosen_under(shipped):
    """Issue 18: training set size, objective, η per engine and the protocol, in the file itself."""
    meta = shipped.meta
    assert meta["data"]["problems"] > 0 and meta["objective"]
    assert set(meta["thresholds"]) >= {"torch", "llamacpp"}
    for engine, eta in meta["thresholds"].items():
        proto = meta["protocols"][engine]
        assert proto["engine"] == engine and proto["chosen_on"] == "dev-a"   # never on half B
        assert 0.0 < eta < 1.0 and proto["max_deferral"] is not None
    evidence = meta["metrics"]["dev-a/llamacpp/512"]
    assert evidence["chosen"]["threshold"] == meta["thresholds"]["llamacpp"]
    assert evidence["chosen"]["deferral"] <= meta["protocols"]["llamacpp"]["max_deferral"]


def test_shipped_head_records_the_confidence_rule_at_its_own_deferral_share(shipped):
    """The page's and CLI's default cut-off for the confidence rule: per engine, from the half-A run that chose η,
    deferring about as often as the head did there (so the two compare at equal expert cost)."""
    meta = shipped.meta
    assert set(meta["min_probs"]) == set(meta["thresholds"])
    for engine, cut in meta["min_probs"].items():
        assert 0.5 < cut < 1.0
    key = {"torch": "dev", "llamacpp": "dev-a/llamacpp/512"}
    for engine, metrics in key.items():
        ev = meta["metrics"][metrics]
        rule = ev["confidence"][0]
        assert rule["min_prob"] == meta["min_probs"][engine]
        assert abs(rule["deferral"] - ev["chosen"]["deferral"]) < 0.03
