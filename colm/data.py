"""GSM8K-format data: reading, the one shared instruction, answer extraction and the dev halves."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .models import ColmError

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

# Used verbatim by training, evaluation and the app's examples, so the head sees the prompts it will be used on.
# Chosen for the default Qwen2.5-Coder pair, wording included: variants that forbid code ("in plain text. Do not
# write code.") stopped the expert's Python listings but made the 0.5B base open 194 of 200 dev answers with a
# '####' line and fall to 2.5 % accuracy (see docs/BENCHMARKS.md), so the instruction stays neutral about code.
INSTRUCTION = ("Solve the problem step by step, briefly. "
               "End with a final line of the form '#### <number>'.")


@dataclass(frozen=True)
class Example:
    index: int          # line number in the source file (0-based): a stable id across runs
    question: str
    solution: str       # gold worked solution without <<...>> annotations, ending in "#### n"
    answer: str         # normalised gold answer


def read_jsonl(path: str | Path) -> list[Example]:
    """Read GSM8K-format JSONL; a malformed line or a missing field stops with the line number."""
    path = Path(path)
    if not path.is_file():
        raise ColmError(f"data file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ColmError(f"{path}:{n + 1}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise ColmError(f"{path}:{n + 1}: each line needs string fields 'question' and 'answer' (GSM8K format)")
            solution = strip_annotations(row["answer"])
            gold = extract_answer(solution)
            if gold is None:
                raise ColmError(f"{path}:{n + 1}: the answer has no final number to score against")
            out.append(Example(n, row["question"].strip(), solution, gold))
    if not out:
        raise ColmError(f"{path}: no examples")
    return out


def strip_annotations(text: str) -> str:
    """'48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips' (GSM8K's calculator annotations)."""
    return re.sub(r"<<[^<>]*>>", "", text).strip()


_NUM = r"-?[\d,]*\.?\d+"


def normalize_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    if not math.isfinite(v):      # a run of digits past 1e308 (a model stuck repeating "9"): no answer
        return None
    return str(int(v)) if v == int(v) else repr(v)


def extract_answer(text: str) -> str | None:
    """The last '#### n' if there is one, otherwise the last number; commas, '$' and a trailing '.' ignored."""
    marked = re.findall(r"####\s*\$?\s*(" + _NUM + ")", text)
    if marked:
        return normalize_number(marked[-1])
    nums = re.findall(_NUM, text.replace("$", ""))
    for cand in reversed(nums):
        v = normalize_number(cand)
        if v is not None:
            return v
    return None


def is_correct(completion: str, gold: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == gold


def messages(question: str) -> list[dict]:
    """The chat prompt for one problem."""
    return [{"role": "user", "content": f"{question.strip()}\n\n{INSTRUCTION}"}]


def split(examples: list[Example], dev_size: int = 300, salt: str = "colm-dev-v1") -> tuple[list[Example], list[Example]]:
    """Deterministic (train, dev): an example is dev when its hash ranks among the ``dev_size`` smallest.

    Hash-based rather than positional so that the split does not depend on file order and never changes when
    ``--limit`` trims the training side.
    """
    key = lambda e: hashlib.sha256(f"{salt}:{e.question}".encode()).hexdigest()
    ranked = sorted(examples, key=key)
    dev_ids = {e.index for e in ranked[:dev_size]}
    return [e for e in examples if e.index not in dev_ids], [e for e in examples if e.index in dev_ids]


# The protocol (issue 18): choose on dev half A, report on dev half B once.  Half A is ``split``'s dev (the 300
# problems the shipped head's η was chosen on).  Half B must never have been trained on: the shipped head was trained
# on the first 2,000 problems of the training side in file order, so B is drawn (by hash, under its own salt) from
# the training side after those; everything else is the training pool.
SHIPPED_HEAD_PROBLEMS = 2000


def halves(examples: list[Example], size: int = 300, skip_first: int = SHIPPED_HEAD_PROBLEMS,
           salt: str = "colm-dev-b-v1") -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic (train, dev_a, dev_b): dev_a = ``split(examples, size)``'s dev; dev_b = the ``size`` problems of
    the training side after its first ``skip_first`` whose hash under ``salt`` ranks lowest; train = the rest, in file
    order (so ``train[:2000]`` is still what the shipped head saw).  In a file too small for that, B is drawn from
    the last ``len(train side) - size`` problems onwards instead."""
    train, dev_a = split(examples, size)
    if len(train) < size:
        raise ColmError(f"dev half B needs {size} problems besides half A; the data has {len(train)}")
    later = train[min(skip_first, len(train) - size):]   # a small file: B starts earlier (no shipped head saw it)
    key = lambda e: hashlib.sha256(f"{salt}:{e.question}".encode()).hexdigest()
    b_ids = {e.index for e in sorted(later, key=key)[:size]}
    return [e for e in train if e.index not in b_ids], dev_a, [e for e in train if e.index in b_ids]


def select(examples: list[Example], which: str, size: int = 300) -> list[Example]:
    """One part of the protocol by name: 'train', 'dev-a' (alias 'dev'), 'dev-b', or 'file' (every problem)."""
    if which == "file":
        return examples
    train, dev_a, dev_b = halves(examples, size)
    parts = {"train": train, "dev": dev_a, "dev-a": dev_a, "dev-b": dev_b}
    if which not in parts:
        raise ColmError(f"unknown split {which!r}: choose train, dev-a, dev-b or file")
    return parts[which]
