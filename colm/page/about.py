"""The About text (plain words beside a small picture of the loop, then the maths for those who want it) and the
page-level script.  Colour words come from colm.viz.PALETTE, so the text says what the page shows."""
from __future__ import annotations

from .. import viz

PAPER = "https://arxiv.org/abs/2403.03870"
_P = viz.PALETTE


def _box(text: str, colour: str | None = None) -> str:
    style = f' style="border-color:{colour};box-shadow:inset 4px 0 0 {colour}"' if colour else ""
    return f'<div class="colm-box"{style}>{text}</div>'


_PICTURE = (
    '<div class="colm-loop" aria-label="one token of Co-LLM">'
    + _box("The <b>base model</b> reads the text so far")
    + '<div class="colm-arrow">→</div>'
    + _box("The <b>head</b> scores it: p_defer. Above η?")
    + '<div class="colm-arrow">→</div>'
    + '<div class="colm-fork">'
    + _box(f"<b>yes</b>: the <b>expert</b> writes the token ({_P['expert'].name})", _P["expert"].hex)
    + _box(f"<b>no</b>: the <b>base model</b> writes it (plain text, {_P['base'].name} bar)", _P["base"].hex)
    + "</div></div>")

# The paper says Co-LLM shows where to double-check an answer.  colm.signals found no signal that predicts a wrong
# answer better than its length (BEATS_LENGTH), so the page shows no flags and says why (tests/test_page.py).
_DOUBLE_CHECK = (
    "The page marks no tokens to double-check. colm tested the obvious signals (a writer unsure of its token, the "
    "two models disagreeing) on 200 practice answers: none predicted a wrong final answer better than the "
    "answer's length alone, so flags would mislead. The top candidates of both models are in the details of "
    "every token.")

ABOUT_HTML = f"""<div class="colm-about">
{_PICTURE}
<div class="colm-words">
<p><b>Co-LLM</b> lets two language models write one answer together. A small <b>base model</b> writes it, one token
(a word or a piece of one) at a time. Before every token a tiny learned <b>deferral head</b> looks at the base
model's state and says how much it wants help: <b>p_defer</b>, a number between 0 and 1.</p>
<p>If p_defer is above the threshold <b>η</b>, the bigger <b>expert</b> model writes that one token instead
({_P['expert'].name} in the answer and in the chart); otherwise the base model keeps it (plain text,
{_P['base'].name} bars). The expert runs only for the tokens it writes, so it is called far less than if it wrote
everything.</p>
<p><b>The slider trades accuracy for expert calls.</b> A lower η sends more tokens to the expert: usually better
answers, more expert work. While you drag, the tokens that would change writer turn {_P['flip'].name} (nothing is
decoded yet); when you let go — or stop pressing the arrow keys — the answer is re-decoded from the first change.
Hover or click any token or bar to see its scores and both models' top candidates, and ask "what if the other
model wrote this token?": the answer continues from there.</p>
<p><b>Where to double-check?</b> {_DOUBLE_CHECK}</p>
<p>Paper: Shen, Lang, Wang, Kim, Sontag, <a href="{PAPER}" target="_blank" rel="noopener noreferrer">Learning to
Decode Collaboratively with Multiple Language Models</a> (ACL 2024).</p>
</div></div>"""

ABOUT_MATHS = r"""
Before each token the base model has a hidden state $h_t$ (its last layer, after reading everything so far).
A learned linear map — the *deferral head* — turns it into a probability of deferring:

$$p_{\text{defer}} = \sigma(w \cdot h_t + v \cdot c_t + b)$$

where $c_t$ is how sure the base is about its next token (its top probability, entropy and top-2 margin).
The paper's head reads $h_t$ only; with a frozen base, adding $c_t$ made the shipped head much better.
The token comes from the expert if $p_{\text{defer}} > \eta$ and from the base model otherwise.

**Training.**  Nobody labels which tokens need help.  The paper fits the head by treating the choice as a latent
variable and maximising the likelihood of correct answers under the mixture of the two models:

$$\mathcal{L} = -\sum_t \log\Big[(1-\sigma(d_t))\,P_{\text{base}}(x_t \mid x_{<t}) + \sigma(d_t)\,P_{\text{expert}}(x_t \mid x_{<t})\Big]$$

With the base frozen (as here, on a CPU) a simpler label worked better: the shipped head is a logistic
regression on *disagreement* — positions where the base's top token differs from the expert's.

**Why it is cheap.**  Tokens the expert has not seen wait in a queue and go through it in one forward pass at the
next deferral, so expert forward passes = deferred tokens.
"""

# About is open on the first visit only.  The browser remembers the visit; the server closes the accordion through
# Gradio's own update (demo.load with this as its js step), because a script clicking the toggle raced Gradio
# wiring it: on a loaded machine the click was lost and About stayed open.
SEEN_JS = r"""
() => {
  let seen = false;
  try { seen = !!localStorage.getItem("colm-about-seen"); localStorage.setItem("colm-about-seen", "1"); } catch (e) {}
  return seen;
}
"""

# Runs once when the page loads (launch(js=...)).  Gradio's slider re-decodes on "release", which a mouse sends
# on pointerup and the number box on blur, but arrow keys never send: the keys end the same way here, once the
# user stops pressing them.  Enter in the number box leaves it, which releases too.
PAGE_JS = r"""
() => {
  const KEYS = ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"];
  let timer = null;
  const inThreshold = (t) => t instanceof HTMLInputElement && t.closest("#threshold");
  document.addEventListener("keyup", (e) => {
    const t = e.target;
    if (!inThreshold(t) || t.type !== "range" || !KEYS.includes(e.key)) return;
    clearTimeout(timer);
    timer = setTimeout(() => t.dispatchEvent(new PointerEvent("pointerup", {bubbles: true})), 500);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && inThreshold(e.target) && e.target.type === "number") e.target.blur();
  });
}
"""

CSS = f"""
.colm-about {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
.colm-loop {{ flex: 1 1 260px; display: flex; flex-direction: column; align-items: stretch; gap: 4px; }}
.colm-words {{ flex: 3 1 420px; }}
.colm-words p {{ margin: 0 0 8px; }}
.colm-box {{ border: 2px solid {_P['threshold'].hex}; border-radius: 6px; padding: 6px 10px; }}
.colm-arrow {{ text-align: center; font-size: 18px; line-height: 1; }}
.colm-fork {{ display: flex; flex-direction: column; gap: 4px; }}
"""
