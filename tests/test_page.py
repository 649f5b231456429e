"""colm.page without Gradio or a browser: hand-built traces in, HTML and words out."""
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from colm import page, viz
from colm.decode import Step, Trace


def step(pos, text, source, p, tid=None, expert=True):
    tid = 100 + pos if tid is None else tid
    base = [(tid, text, 0.6), (7, " the", 0.25), (8, "<b>", 0.1)]
    exp = [(tid, text, 0.9), (9, "\n", 0.05)] if expert else None
    return Step(pos, tid, text, source, p, base, exp)


def make_trace(policy=None, steps=None):
    steps = steps or [step(0, "Hello", "base", 0.1), step(1, " world", "expert", 0.8),
                      step(2, "\n", "expert", 0.7), step(3, "\tx = 1", "base", 0.45),
                      step(4, "  ", "base", 0.02, expert=False), step(5, "", "expert", 0.9, tid=2)]
    return Trace("Say hi", [1, 2, 3], policy or {"name": "colm", "threshold": 0.5}, steps, expert_calls=3,
                 decode_seconds=2.0, stop_reason="eos")


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text outside tags."""
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data

    def classed(self, cls):
        return [a for _, a in self.tags if cls in (a.get("class") or "").split()]


# ----------------------------------------------------------------------------------------------- the view
def test_view_has_one_token_and_one_column_per_step():
    tr = make_trace()
    html = page.view_html(tr)
    t = Tags(html)
    cols = t.classed("colm-col")
    assert [int(c["data-i"]) for c in cols] == [s.position for s in tr.steps]
    toks = page.tokens_of(html)
    assert [i for i, _, _ in toks] == [s.position for s in tr.steps]        # the end token too (empty text)
    assert "".join(text for _, text, _ in toks) == tr.text
    assert [kind for _, _, kind in toks] == [s.source for s in tr.steps]


def test_view_bars_are_p_defer_and_columns_carry_the_hover_text():
    tr = make_trace()
    tr.steps[0].p_defer = float("nan")
    t = Tags(page.view_html(tr))
    heights = [float(re.search(r"height:([\d.]+)%", b["style"]).group(1)) for b in t.classed("colm-bar")]
    assert heights == [0.0, 80.0, 70.0, 45.0, 2.0, 90.0]
    tips = [c["data-tip"] for c in t.classed("colm-col")]
    assert tips[1].splitlines()[0] == "#1 '·world' from the expert"
    assert "p_defer 0.800 > η 0.5" in tips[1] and "base: '·world' 60.0% · '·the' 25.0% · '<b>' 10.0%" in tips[1]
    assert "expert:" not in tips[4]                                   # the expert never read position 4
    assert "no deferral head ran" in tips[0]


@pytest.mark.parametrize("policy, line", [({"name": "colm", "threshold": 0.1446664}, True), ({"name": "base"}, False),
                                          ({"name": "expert"}, False), ({"name": "random", "rate": 0.3}, False),
                                          ({"name": "confidence", "min_prob": 0.5}, False)])
def test_threshold_line_and_its_legend_only_for_co_llm(policy, line):
    html = page.view_html(make_trace(policy))
    t = Tags(html)
    assert bool(t.classed("colm-eta")) == line
    assert ("η = 0.145" in t.text) == line and "0.1446" not in html
    assert "would change writer" not in t.text


def test_preview_marks_flips_draws_the_pending_line_and_names_it():
    tr = make_trace()
    plain = Tags(page.view_html(tr, pending=0.5))          # the applied threshold: nothing pending
    assert len(plain.classed("colm-eta")) == 1 and not plain.classed("colm-flip") and not plain.classed("colm-banner")
    t = Tags(page.view_html(tr, pending=0.4))
    assert [c["class"] for c in t.classed("colm-eta")] == ["colm-eta colm-applied", "colm-eta colm-pending"]
    assert [int(a["data-i"]) for a in t.classed("colm-tok") if "colm-flip" in a["class"]] == viz.flips(tr, 0.4) == [3]
    assert "Preview at η = 0.4: not decoded yet" in t.text and "pink: would change writer at η = 0.4" in t.text
    # A threshold that flips nothing: a preview, but no pink and no pink legend.
    t = Tags(page.view_html(tr, pending=0.6))
    assert "Preview at η = 0.6" in t.text and not t.classed("colm-sw colm-flip")
    assert "would change writer" not in t.text


def test_preview_is_ignored_for_policies_without_a_threshold():
    t = Tags(page.view_html(make_trace({"name": "random", "rate": 0.3}), pending=0.1))
    assert not t.classed("colm-eta") and not t.classed("colm-banner")


@pytest.mark.parametrize("text", ["<script>window.pwned=1</script>", "<img src=x onerror=\"window.pwned=1\">",
                                  "a\u202eb\u2066c", "x\ud800y", "\"quoted' & <b>bold</b>", "\x00\x07\x1b[31m"])
def test_model_text_is_data_not_markup(text):
    tr = make_trace(steps=[step(0, text, "expert", 0.7), step(1, "ok", "base", 0.2)])
    tr.steps[0].base_topk = [(5, text, 0.5)]
    for html in (page.view_html(tr), page.view_html(tr, pending=0.9), page.text_html(tr),
                 page.details_html(tr, 0), page.preview_html(tr, 0.9)):
        html.encode("utf-8")                                    # no lone surrogate survives
        t = Tags(html)
        assert {tag for tag, _ in t.tags} <= {"div", "span", "p", "b", "i", "code", "table", "caption", "tr", "td"}
        assert not any(k.startswith("on") for _, a in t.tags for k in a)
        assert not re.search("[\u202a-\u202e\u2066-\u2069\ud800-\udfff\x00-\x08\x1b]", html)
    shown = page.tokens_of(page.view_html(tr))[0][1]
    assert shown == viz.display_token(text)                       # what the reader sees is the escaped token


def test_special_token_is_an_empty_element_labelled_by_css():
    t = Tags(page.view_html(make_trace()))
    (special,) = t.classed("colm-special")
    assert special["data-i"] == "5" and special["data-label"] == "<token 2>"


def test_view_of_nothing_and_of_an_empty_trace():
    assert "Generate" in page.view_html(None)
    empty = Trace("x", [1], {"name": "colm", "threshold": 0.5})
    t = Tags(page.view_html(empty))
    assert not t.classed("colm-col") and t.classed("colm-eta")


def test_each_new_trace_gets_its_own_key():
    a, b = make_trace(), make_trace()
    key = lambda tr: Tags(page.view_html(tr)).classed("colm-view")[0]["data-key"]
    assert key(a) == key(a) != key(b)


# ----------------------------------------------------------------------------------------------- details
def test_details_say_who_wrote_it_why_and_both_top_k():
    tr = make_trace()
    t = Tags(page.details_html(tr, 1))
    assert "Token #1 of 6: '·world', written by the expert" in t.text
    assert "Why: p_defer 0.800 > η 0.5: the head deferred this token to the expert." in t.text
    assert "the base model's top candidates" in t.text and "the expert's top candidates" in t.text
    chosen = [a for tag, a in t.tags if tag == "tr" and a.get("class") == "colm-chosen"]
    assert len(chosen) == 2 and t.text.count("← written") == 2       # the token in both lists
    assert "top candidates are not known here" in Tags(page.details_html(tr, 4)).text


@pytest.mark.parametrize("pos", [None, -1, 6, 100])
def test_details_without_a_valid_position(pos):
    assert page.details_html(make_trace(), pos) == page.NO_SELECTION
    assert page.details_html(None, 0) == page.NO_SELECTION


@pytest.mark.parametrize("policy, source, words", [
    ({"name": "colm", "threshold": 0.5}, "base", "p_defer 0.300 ≤ η 0.5: the base model kept"),
    ({"name": "colm", "threshold": 0.25}, "expert", "p_defer 0.300 > η 0.25: the head deferred"),
    ({"name": "base"}, "base", "base only"),
    ({"name": "expert"}, "expert", "expert only"),
    ({"name": "random", "rate": 0.3}, "expert", "random: a draw at rate 30% gave it to the expert"),
    ({"name": "confidence", "min_prob": 0.7}, "expert", "top probability 60.0% < 0.7"),
])
def test_why_for_every_policy(policy, source, words):
    s = step(0, "x", source, 0.3)
    assert words in page.words.why(s, policy)
    if policy["name"] == "colm":                                # the rule and the record disagree: say so
        other = step(0, "x", "expert" if source == "base" else "base", 0.3)
        assert "not by this threshold's rule" in page.words.why(other, policy)
    s.forced = True                                             # a what-if choice outranks every rule
    assert page.words.why(s, policy).startswith("you chose")


# ----------------------------------------------------------------------------------------------- before / after
def test_preview_panel():
    tr = make_trace()
    assert page.preview_html(tr, 0.5) == "" and page.preview_html(make_trace({"name": "base"}), 0.2) == ""
    t = Tags(page.preview_html(tr, 0.05))
    assert "not decoded yet" in t.text and "2 decisions would change writer" in t.text
    assert "token #0 'Hello', which would go to the expert" in t.text and "keeps none of them" in t.text
    assert "keeps tokens 0–2" in Tags(page.preview_html(tr, 0.4)).text
    assert "no decision changes" in Tags(page.preview_html(tr, 0.6)).text


def texts(*pieces, sources):
    """Steps of the given texts; ``sources`` spells each writer with one letter (b / e); one id per text."""
    who = {"b": "base", "e": "expert"}
    return [step(i, t, who[s], 0.9 if s == "e" else 0.1, tid=1000 + sum(map(ord, t)))
            for i, (t, s) in enumerate(zip(pieces, sources))]


def test_changes_after_a_redecode():
    before = make_trace(steps=texts("A", " is", " 4", "\n#### 4", sources="bbbb"))
    after = make_trace({"name": "colm", "threshold": 0.2},
                       texts("A", " is", " 5", " because", "\n#### 5", sources="bebee"))
    after.steps[1].p_defer = 0.3
    after.reused_steps = 1
    t = Tags(page.changes_html(before, after))
    assert "Re-decoded at η = 0.2 (was 0.5), from token #1" in t.text
    assert "first differs at token #2: before ·4⏎####·4, after ·5·because⏎####·5." in t.text
    assert "1 token(s) moved to the expert and 0 back" in t.text        # ' is': same token, now the expert's
    assert "Expert tokens 0 → 3; deferral 0.0% → 60.0% (+60.0 points)" in t.text
    assert re.search(r"final answer\s*4\s*5", t.text) and re.search(r"tokens\s*4\s*5", t.text)


def test_changes_when_only_writers_changed():
    before = make_trace(steps=texts("A", " b", sources="bb"))
    after = make_trace({"name": "colm", "threshold": 0.05}, texts("A", " b", sources="ee"))
    t = Tags(page.changes_html(before, after))
    assert "Re-decoded at η = 0.05 (was 0.5), from the first token." in t.text
    assert "The text is the same; 2 token(s) moved to the expert" in t.text


@pytest.mark.parametrize("pos, source, words", [(None, None, "select a token first"), (9, None, "select a token"),
                                                  (1, "base", "What if the expert wrote token #1?"),
                                                  (2, "expert", "What if the base model wrote token #2?")])
def test_the_what_if_button_names_the_other_model(pos, source, words):
    tr = make_trace(steps=texts("A", " is", " 4", sources="bbb"))
    if source:
        tr.steps[pos].source = source
    assert words in page.branch_label(tr if pos is not None else None, pos)


def test_what_if_panel_says_what_was_forced_and_what_changed():
    before = make_trace(steps=texts("A", " is", " 4", "\n#### 4", sources="bbbb"))
    after = make_trace(steps=texts("A", " is", " 5", "\n#### 5", sources="bbeb"))
    after.steps[2].forced = True
    after.reused_steps = 2
    t = Tags(page.branch_html(before, after, 2))
    assert ("What-if at token #2: the expert wrote it ('·5'; the base model had written '·4'), then Co-LLM "
            "(η = 0.5) continued; tokens 0–1 were kept.") in t.text
    assert "Forced positions in this answer: #2." in t.text and "first differs at token #2" in t.text
    assert re.search(r"final answer\s*4\s*5", t.text) and "after the what-if" in t.text


# ----------------------------------------------------------------------------------------------- progress, compare
def test_progress_line():
    assert page.progress_line(None, 512) == "Reading the prompt…"
    tr = make_trace()
    line = page.progress_line(tr, 512)
    assert "6 tokens of at most 512" in line and "3.0 tokens/s" in line and "at most 169 s left" in line
    tr.decode_seconds = 0.0
    assert "time left not known yet" in page.progress_line(tr, 512)
    tr.reused_steps = 4
    assert "(4 kept)" in page.progress_line(tr, 8)


def test_compare_table_marks_known_answers():
    right = make_trace({"name": "expert"}, texts("x", "\n#### 19", sources="ee"))
    wrong = make_trace({"name": "base"}, texts("#### 12 + 7 = 19", sources="b"))
    other = make_trace({"name": "base"}, texts("def f():\n", "    return 1 | 2", sources="bb"))
    table = page.compare_table([("base only", wrong), ("expert only", right), ("odd", other)], "19")
    rows = [r for r in table.splitlines() if r.startswith("| ") and "policy" not in r]
    assert rows[0].startswith("| base only | `12` | ✗ no | 1 | 0.0% | 2.0 s |")
    assert rows[1].startswith("| expert only | `19` | ✓ yes | 2 | 100.0% |")
    assert "`return 1 \\| 2` | ✗ no" in rows[2]                       # a pipe cannot break the table
    assert "The known answer is **19**." in table
    assert "| — |" in page.compare_table([("base only", wrong)], None)


@pytest.mark.parametrize("text, answer", [("#### 19", "19"), ("so\n#### 1,234.", "1234"), ("#### 12 + 7 = 19", "12"),
                                          ("return x\n\n", "return x"), ("", ""), ("x" * 80, "x" * 57 + "…")])
def test_final_answer(text, answer):
    assert page.final_answer(text) == answer


# ----------------------------------------------------------------------------------------------- one palette
COLOUR_WORDS = {"purple", "pink", "orange", "blue", "red", "green", "yellow", "violet", "magenta", "brown",
                "vermillion", "grey", "gray", "sky blue"}


def words_of(html: str) -> str:
    return Tags(html).text.lower()


@pytest.mark.parametrize("name, text", [
    ("about", page.ABOUT_HTML), ("maths", page.ABOUT_MATHS),
    ("legend", page.view_html(make_trace(), pending=0.4)), ("preview", page.preview_html(make_trace(), 0.4))])
def test_every_colour_word_on_the_page_is_a_palette_name(name, text):
    said = {w for w in COLOUR_WORDS if re.search(rf"\b{w}\b", words_of(text))}
    names = {c.name for c in viz.PALETTE.values()}
    assert said <= names, f"{name} speaks of {said - names}, which the palette does not name"


def test_the_page_css_draws_with_the_palette_only():
    used = {h.upper() for h in re.findall(r"#[0-9A-Fa-f]{6}\b", page.CSS)}
    allowed = {c.hex.upper() for c in viz.PALETTE.values()} | {viz.INK.upper(), "#000000", "#FFFFFF"}
    assert used <= allowed, used - allowed
    for role in ("base", "expert", "flip"):      # the text, the bars and the legend swatches all say the role's hex
        hexcode = viz.PALETTE[role].hex
        assert re.search(rf"\.colm-tok\.colm-{role} \{{[^}}]*{hexcode}", page.CSS) or role == "base"
        assert re.search(rf"\.colm-bar\.colm-{role} \{{[^}}]*{hexcode}", page.CSS)
        assert re.search(rf"\.colm-sw\.colm-{role} \{{[^}}]*{hexcode}", page.CSS)
    assert "pattern" not in page.CSS and "hatch" not in page.CSS


def test_about_in_plain_words_with_the_paper():
    text = words_of(page.ABOUT_HTML)
    for words in ("base model", "deferral head", "the expert", "lower η sends more tokens to the expert",
                  "trades accuracy for expert calls"):
        assert words in text
    assert 'href="https://arxiv.org/abs/2403.03870"' in page.ABOUT_HTML


def test_page_does_not_import_gradio():
    out = subprocess.run([sys.executable, "-c", "import sys, colm.page; print('gradio' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_page_says_why_it_shows_no_double_check_flags():
    from colm.signals import BEATS_LENGTH
    assert not BEATS_LENGTH, "a signal beats answer length now: show its flags on the page and change this text"
    words = Tags(page.ABOUT_HTML).text
    assert "marks no tokens to double-check" in words and "length alone" in words


def test_a_course_correction_shows_the_dropped_line_struck_through_and_says_why():
    tr = make_trace()
    tr.rollbacks = [{"position": 3, "detector": "arithmetic", "reason": "12 * 7 = 86, but it is 84",
                     "discarded": "<b>12 * 7 = 86</b>\n", "replacement": "\tx = 1", "expert_written": 1}]
    view = page.view_html(tr)
    t = Tags(view)
    dropped = t.classed("colm-dropped")
    assert len(dropped) == 1 and "12 * 7 = 86, but it is 84" in dropped[0]["title"]
    assert "<b>12" not in view and "&lt;b&gt;12 * 7 = 86&lt;/b&gt;" in view          # model text stays text
    assert view.index("colm-dropped") < view.index('data-i="3"')                     # before its replacement
    assert "Course correction" in t.text and "token #3: 12 * 7 = 86, but it is 84" in t.text
    assert [i for i, *_ in page.tokens_of(view)] == [0, 1, 2, 3, 4, 5]             # tokens unchanged
    assert "colm-dropped" not in page.view_html(make_trace())


def test_a_corrected_token_says_course_correction_and_a_what_if_says_you_chose():
    tr = make_trace()
    for i in (3, 4):
        tr.steps[i].forced = True
    tr.rollbacks = [{"position": 3, "detector": "arithmetic", "reason": "r", "discarded": "x", "replacement": "y",
                     "expert_written": 0}]
    assert "course correction: the checker found this line wrong" in Tags(page.details_html(tr, 3)).text
    assert "course correction" in Tags(page.view_html(tr)).classed("colm-col")[4]["data-tip"]
    tr.rollbacks = []
    assert "you chose" in Tags(page.details_html(tr, 3)).text
