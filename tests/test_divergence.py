"""bench/divergence.py's pure parts: where two answers part, and what the token there is."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from divergence import first_difference, kind  # noqa: E402


@pytest.mark.parametrize("a, b, want", [([1, 2, 3], [1, 2, 4], 2), ([5], [6], 0), ([1, 2, 3], [1, 2, 3], None),
                                        ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1, 2], 2), ([], [7], 0)])
def test_first_difference(a, b, want):
    assert first_difference(a, b) == want


@pytest.mark.parametrize("token, want", [(" 12", "number"), ("3", "number"), (" \\times", "operator / punctuation"),
                                         (" =", "operator / punctuation"), (" +", "operator / punctuation"),
                                         (" total", "words / layout"), ("\n\n", "words / layout")])
def test_kind(token, want):
    assert kind(token) == want
