import pytest

from colm.data import DEFAULT_DATA, INSTRUCTION, extract_answer, is_correct, messages, read_jsonl, split, strip_annotations


@pytest.mark.parametrize("text,want", [
    ("so 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The answer is $18.", "18"),
    ("She has 3 apples and 4.5 pears, total 7.50", "7.5"),
    ("#### 5\nwait, actually #### 6", "6"),
    ("#### -3", "-3"),
    ("It costs $1,000.00 in total.", "1000"),
    ("answer: 0.25", "0.25"),
    ("no numbers here", None),
    ("#### $ 42", "42"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_is_correct():
    assert is_correct("... so the total is 72.", "72")
    assert not is_correct("... so the total is 71.", "72")
    assert not is_correct("nothing", "72")


def test_strip_annotations():
    assert strip_annotations("48/2 = <<48/2=24>>24 clips\n#### 24") == "48/2 = 24 clips\n#### 24"


def test_messages_use_the_shared_instruction():
    m = messages("  How many?  ")
    assert m == [{"role": "user", "content": f"How many?\n\n{INSTRUCTION}"}]


@pytest.mark.skipif(not DEFAULT_DATA.exists(), reason="shared GSM8K data not present")
def test_dev_split_is_deterministic_and_disjoint():
    rows = read_jsonl(DEFAULT_DATA)
    tr1, dev1 = split(rows)
    tr2, dev2 = split(list(reversed(rows)))
    assert {e.index for e in dev1} == {e.index for e in dev2}
    assert len(dev1) == 300 and not ({e.index for e in tr1} & {e.index for e in dev1})
    assert len(tr1) + len(dev1) == len(rows)
    assert all(e.answer is not None and "<<" not in e.solution for e in rows[:100])


def _fake(n: int) -> list:
    from colm.data import Example
    return [Example(i, f"question {i}?", f"so #### {i}", str(i)) for i in range(n)]


@pytest.mark.parametrize("n, size, skip", [(1000, 100, 300), (700, 50, 0)])
def test_the_two_dev_halves_are_disjoint_fixed_and_never_seen_by_the_shipped_head(n, size, skip):
    from colm.data import halves
    rows = _fake(n)
    train, a, b = halves(rows, size, skip_first=skip)
    ids = lambda xs: {e.index for e in xs}
    assert len(a) == len(b) == size and len(train) + 2 * size == n
    assert not (ids(a) & ids(b)) and not (ids(train) & (ids(a) | ids(b)))
    old_train = split(rows, size)[0]
    assert train[:skip] == old_train[:skip]                   # what the shipped head was trained on is unchanged
    assert not (ids(b) & ids(old_train[:skip]))               # ... and half B holds none of it
    assert a == split(rows, size)[1]                          # half A is the dev split η was chosen on
    again = halves(rows, size, skip_first=skip)
    assert (ids(again[1]), ids(again[2])) == (ids(a), ids(b))


def test_half_b_in_a_small_file_and_a_file_too_small_for_it():
    from colm.data import halves
    from colm.models import ColmError
    train, a, b = halves(_fake(450), 100, skip_first=300)     # 350 on the training side: B from the last 250 on
    assert len(b) == 100 and min(e.index for e in b) >= split(_fake(450), 100)[0][250].index
    with pytest.raises(ColmError, match="half B needs 100"):
        halves(_fake(150), 100)


@pytest.mark.parametrize("which, n", [("dev", 300), ("dev-a", 300), ("dev-b", 300), ("file", None)])
@pytest.mark.skipif(not DEFAULT_DATA.exists(), reason="shared GSM8K data not present")
def test_select_names_the_parts_of_the_protocol(which, n):
    from colm.data import select
    rows = read_jsonl(DEFAULT_DATA)
    assert len(select(rows, which)) == (n or len(rows))
    assert len(select(rows, "train")) == len(rows) - 600


def test_an_endless_number_is_no_answer_not_a_crash():
    """A model stuck repeating a digit wrote '#### 999…' past 1e308: the evaluation crashed on float('inf')."""
    assert extract_answer("#### " + "9" * 400) is None
    assert is_correct("#### " + "9" * 400, "9") is False
