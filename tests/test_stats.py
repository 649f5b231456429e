import pytest

from colm.stats import mcnemar_exact, paired, wilson


@pytest.mark.parametrize("k,n,lo,hi", [(77, 200, 0.3203, 0.4540), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0)])
def test_wilson_matches_published_values(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=2e-4) and b == pytest.approx(hi, abs=2e-4)


@pytest.mark.parametrize("b,c,p", [(0, 0, 1.0), (6, 11, 0.3323), (0, 8, 0.0078), (5, 5, 1.0)])
def test_mcnemar_exact(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-4)


def test_paired_counts_discordant_problems_and_brackets_the_difference():
    a = {i: i % 3 != 0 for i in range(90)}           # 60 right
    b = {i: i % 3 != 1 for i in range(90)}           # 60 right, on other problems
    b[1] = True                                      # problem 1: both right now
    r = paired(a, {**b, 999: True})                  # a problem only B answered is left out
    assert r["n"] == 90 and r["only_a"] == 29 and r["only_b"] == 30
    assert r["difference"] == pytest.approx(-1 / 90)
    lo, hi = r["difference_ci"]
    assert lo < r["difference"] < hi and hi - lo > 0.1
