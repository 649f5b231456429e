"""The arithmetic checker on lines the pair writes (plain, LaTeX, money, percentages, separators)."""
import pytest

from colm.checks import check_line, check_text, first_error, normalise

RIGHT = [
    "12 * 7 = 84",
    "So she has 48 + 24 = 72 clips.",
    "$36 / 4 = $9 per shirt",
    r"\( 3 \times 4 = 12 \)",
    r"\[ \frac{198}{9} = 22 \]",
    r"\(\frac{1}{2} \times 48 = 24\)",
    "1,250 + 750 = 2,000",
    "20% of 50 = 10",
    r"\( 5^3 = 125 \)",
    "The total is 3 x 4 = 12 apples.",
    "Each costs 10 / 3 = 3.33 dollars",             # rounded to the cent as written
    "He can fill 10 / 3 = 3 boxes",                 # a whole number for a non-whole value: not sure to be wrong
    r"\( 2 \cdot 3 + 4 = 10 \)",
    "a^3 * a^2 = a^5 = 5^5 = 3125",
]
WRONG = [
    ("12 * 7 = 82", 84),
    ("So she has 48 + 24 = 70 clips.", 72),
    (r"\[ \frac{198}{9} = 21 \]", 22),
    ("1,250 + 750 = 1,900", 2000),
    ("$36 / 4 = $8 per shirt", 9),
    ("Each costs 10 / 4 = 2.40 dollars", 2.5),
    (r"\( 2 \times 3.5 = 6 \)", 7),
]
LEFT_ALONE = [
    "x = 5",                                        # no computation
    "The answer is 42.",
    "Total ≈ 3.14 * 2 = 6",                          # an approximation
    r"\( \pi r^2 \approx 3.14 \times 4 = 12 \)",
    "Let n = number of apples = 5 + 3 = 8",         # the computation part is still checked (right)
    "if a == b: return a + b = c",                  # not arithmetic text
    "growth = 25%",
    r"\[ 60 - 10 = 2L \]",                           # an algebraic term on the right
]


@pytest.mark.parametrize("line", RIGHT)
def test_right_computations_pass(line):
    checks = check_line(line)
    assert checks and all(c.ok for c in checks), checks


@pytest.mark.parametrize("line, actual", WRONG)
def test_wrong_computations_are_caught_with_the_exact_value(line, actual):
    bad = [c for c in check_line(line) if not c.ok]
    assert len(bad) == 1 and bad[0].actual == pytest.approx(actual)


@pytest.mark.parametrize("line", LEFT_ALONE)
def test_prose_and_approximations_raise_nothing(line):
    assert all(c.ok for c in check_line(line))


def test_code_blocks_are_left_alone_and_offsets_name_the_faulty_line():
    text = ("First, 3 + 4 = 7.\n"
            "```python\nx = 2 + 2 = 5\n```\n"
            "Then 7 * 6 = 41.\n"
            "#### 41\n")
    checks = check_text(text)
    assert [c.ok for c in checks] == [True, False]
    err = first_error(text)
    assert text[err.line_start:err.line_end] == "Then 7 * 6 = 41."


def test_nothing_is_evaluated_but_arithmetic():
    assert check_line("__import__('os').system('echo hi') = 0") == []
    assert check_line("9**9**9 + 1 = 2") == []          # a power too large is not a word problem's arithmetic
    assert normalise(r"\frac{\frac{1}{2}}{4}") == "((((1)/(2)))/(4))"


@pytest.mark.parametrize("line", [r"\[ 20 + (0.30 \times 20) = 20 + 6 = 26 \]", "24 - 24 / 2 = 24 - 12 = 12",
                                  r"8 \text{ years} + 0.25 \times 8 \text{ years} = 8 \text{ years} + 2 = 10"])
def test_a_chain_of_expressions_is_checked_link_by_link(line):
    checks = check_line(line)
    assert checks and all(c.ok for c in checks), checks
