"""The demo page's pictures and words, as HTML and text (no Gradio: app.py binds them to components).

    words.py    how a step, a policy and an answer are said in words (shared by the view, the panels and tests)
    view.py     the answer and its p_defer chart as one view: a token and its bar are one element each, linked
    panels.py   the selected token's details, before/after a threshold change or a what-if, progress, Compare's table
    about.py    the About text and picture, and the page-level script (slider keys, About on first visit)

Everything that shows model text goes through colm.viz.display_token and html.escape: model output is data,
never markup.  Colours come from colm.viz.PALETTE only.
"""
from . import about, panels, view
from .about import ABOUT_HTML, ABOUT_MATHS, PAGE_JS, PAPER, SEEN_JS  # noqa: F401
from .panels import (NO_SELECTION, branch_html, branch_label, changes_html, compare_table, details_html,  # noqa: F401
                     preview_html, progress_line)
from .view import EMPTY, VIEW_JS, text_html, tokens_of, view_html  # noqa: F401
from .words import final_answer, is_right  # noqa: F401

CSS = view.CSS + panels.CSS + about.CSS
