"""An arithmetic checker for answers as the pair writes them (issue 21's first detector): find the completed
computations in a text — plain (``12 * 7 = 84``, ``$36 / 4 = $9``), LaTeX (``\\(3 \\times 4 = 12\\)``,
``\\frac{198}{9} = 22``), percentages and thousands separators — and check each exactly.

Nothing is evaluated with ``eval``: an expression is normalised to digits, ``+ - * / ( )`` and ``**``, parsed with
``ast`` and walked over a whitelist of number and operator nodes.  Code blocks, approximations (``≈``, ``\\approx``)
and anything that does not parse are left alone: the checker only says "wrong" when it is sure.  A result written
with d decimals passes when the exact value rounds to it (money is written to the cent).

    for c in check_text(text):          # every computation found, with its verdict
        if not c.ok: ...                # c.line_start / c.line_end: the characters of the faulty line
"""
from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
_NUMBER = r"-?\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Check:
    expression: str      # as normalised and evaluated, e.g. "198/9"
    claimed: float       # the number written after '='
    actual: float        # what the expression is
    ok: bool
    line_start: int      # character offsets of the line holding it in the checked text
    line_end: int


def _evaluate(expr: str) -> float | None:
    """A whitelisted arithmetic expression -> its value; None for anything else (names, calls, huge powers)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("power too large to be arithmetic in a word problem")
            return _OPS[type(node.op)](a, b)
        raise ValueError(f"not arithmetic: {type(node).__name__}")
    try:
        v = walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    return v if math.isfinite(v) else None


def _frac(s: str) -> str:
    """\\frac{a}{b} -> (a)/(b), innermost first (a numerator may hold another fraction)."""
    pat = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
    while True:
        s2 = pat.sub(r"((\1)/(\2))", s)
        if s2 == s:
            return s
        s = s2


def normalise(text: str) -> str:
    """LaTeX and prose arithmetic -> Python arithmetic (digits, + - * / ** and parentheses); other text kept."""
    s = text.replace("\u2212", "-").replace("\u00d7", "*").replace("\u00b7", "*").replace("\u00f7", "/")
    s = re.sub(r"\\text\s*\{[^{}]*\}", " ", s)                       # units and words inside maths
    s = re.sub(r"\\(?:left|right|,|!|;|:|quad|qquad)", " ", s)
    s = re.sub(r"\\[()\[\]]", " ", s)                                 # \( \) \[ \]
    s = _frac(s)
    s = re.sub(r"\\(?:times|cdot|ast)", "*", s)
    s = re.sub(r"\\div", "/", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)                     # thousands separators
    s = re.sub(r"(\d+(?:\.\d+)?)\s*\\?%", r"(\1/100)", s)             # 20% -> (20/100)
    s = re.sub(r"(?<=[\d)])\s*(?:x|X)\s*(?=[\d(])", "*", s)           # 3 x 4
    s = re.sub(r"\)\s*of\s*(?=[\d(])", ")*", s)                       # (20/100) of 50
    s = s.replace("^", "**").replace("{", "(").replace("}", ")").replace("$", " ")
    return s


_EXPR_CHARS = re.compile(r"[\d.\s+\-*/()]+$")
_CLAIM = re.compile(r"\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s*(\\?%)?")


def _lhs(before: str) -> str | None:
    """The longest arithmetic suffix of ``before`` holding an operator (the computation left of '=').  It may
    start after a word or an unbalanced parenthesis, never inside a number or after an operator (so "2 - 3 * 4" is
    read whole or not at all)."""
    m = re.search(r"[\d.\s+\-*/()]*$", before)
    base = len(before) - len(m.group(0)) if m else len(before)
    for start in range(base, len(before)):
        prev = before[:start].rstrip()
        if prev and prev[-1] in "+-*/.0123456789":
            continue
        c = before[start:].strip()
        if re.search(r"\d", c) and re.search(r"\d\s*(?:\*\*|[+\-*/])\s*[\d(]|\)\s*[+\-*/]", c):
            if c.count("(") == c.count(")") and _evaluate(c) is not None:
                return c
    return None


def _within(actual: float, claimed: float, written: str) -> bool:
    """Right as written: exact; to the decimals shown (money to the cent); or, for a whole number written where the
    exact value is not whole, any rounding to a neighbour (floor, ceiling: "10 / 3 = 3 boxes" is not sure to be
    wrong)."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    err = abs(actual - claimed)
    if err <= 1e-9 * max(1.0, abs(actual)):
        return True
    if decimals > 0:
        return err <= 0.5 * 10 ** -decimals + 1e-9
    return abs(actual - round(actual)) > 1e-9 and err < 1.0


def check_line(line: str, offset: int = 0) -> list[Check]:
    """Every 'expression = number' in one line (outside code), checked."""
    if re.search(r"≈|\\approx|~=", line):          # written as an approximation: not a claim of equality
        return []
    out = []
    norm = normalise(line)
    parts = re.split(r"(?<![<>!=])=(?!=)", norm)
    for left, right in zip(parts, parts[1:]):
        expr = _lhs(left)
        m = _CLAIM.match(right)
        if expr is None or m is None:
            continue
        if re.match(r"\s*(?:\*\*|[+\-*/])\s*[\d(]", right[m.end():]):
            continue        # "= 20 + 6 = 26": the right side is another expression; the next '=' checks it
        if re.match(r"[A-Za-z]", right[m.end(1):m.end(1) + 1]):
            continue        # "= 2L", "= 3x": an algebraic term, not a number
        written = m.group(1).replace(",", "")
        try:
            claimed = float(written)
        except ValueError:
            continue
        if m.group(2):                              # "... = 25%": read too many ways (a share, a rate); skip
            continue
        actual = _evaluate(expr)
        if actual is None or not re.search(r"[+\-*/]", expr.lstrip("-")):
            continue
        out.append(Check(expr, claimed, actual, _within(actual, claimed, written), offset, offset + len(line)))
    return out


def check_text(text: str) -> list[Check]:
    """Every checked computation in ``text``, line by line; fenced code blocks are skipped."""
    out, pos, in_code = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            out += check_line(line.rstrip("\n"), pos)
        pos += len(line)
    return out


def first_error(text: str) -> Check | None:
    """The first computation in ``text`` that is wrong, or None."""
    return next((c for c in check_text(text) if not c.ok), None)
