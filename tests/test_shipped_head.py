"""The head in assets/ is a product artefact: it must say what it is and carry the evidence it was chosen on."""
import pytest
import torch

from colm.head import SHIPPED_HEAD, DeferralHead


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


def test_shipped_head_scores_are_probabilities(shipped):
    p = shipped.p_defer(torch.randn(64, 896), torch.randn(64, 151665) * 3)
    assert p.shape == (64,) and bool(((p >= 0) & (p <= 1)).all()) and float(p.std()) > 0
