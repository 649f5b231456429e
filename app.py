"""Co-LLM web demo.

    python app.py [--host 127.0.0.1] [--port 7860] [--base default --expert default] [--head PATH]
                  [--device auto] [--dtype auto] [--share]

Thin on purpose: load the pair and head once, build the page around one CoLLM decoder, one callback per user
action.  Everything drawn comes from colm.page (HTML and words) and colm.viz (palette, summary, JSON); each browser
session keeps its own trace in gr.State.  While the models load (the first cold start takes a minute or two) a
small loading page on the same port shows progress, then reloads into the demo.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from colm import page, viz
from colm.backtrack import Backtrack, backtrack_stream
from colm.data import messages
from colm.decode import CoLLM, Policy
from colm.loading import add_expert_server_arguments
from colm.models import ColmError

EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples.json"
MAX_PROMPT_CHARS = 8000
VIEW_EVERY_S = 0.25        # the answer+chart view is the heavy part of a streamed update; progress updates every token
STATE_TTL_S = 3600         # a trace holds KV caches; drop a session's after an hour of disuse
MODEL = "model"            # one concurrency group for every callback that runs a model
DEFAULT_MAX_NEW = 512      # covers every shipped example's whole answer (bench/examples.py measures them)
THRESHOLD_STEP = 0.005     # fine enough for the shipped η (0.145), coarse enough for arrow keys
MIN_PROB_STEP = 0.0025     # the confidence rule lives near 1 (0.975 defers as often as the shipped head)

POLICY_CHOICES = [("Co-LLM", "colm"), ("base only", "base"), ("expert only", "expert"),
                  ("random", "random"), ("confidence", "confidence")]
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


# ----------------------------------------------------------------------------------------------- plain helpers
def load_examples(path: Path = EXAMPLES) -> list[tuple[str, str]]:
    """(label, prompt) pairs.  Word problems get the instruction the head was trained with."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return [(e["label"], messages(e["question"])[0]["content"] if e.get("gsm8k") else e["question"]) for e in items]


def example_answers(path: Path = EXAMPLES) -> dict[str, str]:
    """The known final answer of each shipped example, keyed by the prompt text the page sends (Compare marks
    answers right or wrong only for these)."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return {prompt: str(e["answer"]) for (_, prompt), e in zip(load_examples(path), items) if e.get("answer")}


class ThresholdStop(threading.Event):
    """The Stop of a Co-LLM decode of the main answer, with the threshold it decodes at."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold


def stop_outdated(stop, threshold) -> None:
    """A new threshold was let go of: a decode of the answer at another threshold is no longer wanted (the re-decode
    queued behind it continues from wherever it stopped).  Compare's decodes and other policies are left alone."""
    if isinstance(stop, ThresholdStop) and stop.threshold != threshold:
        stop.set()


def unchanged(trace, threshold, max_new) -> bool:
    """A Co-LLM answer asked to re-decode at its own threshold with no room to grow: nothing to do.  (A stopped
    or cut answer given more tokens does continue.)"""
    done = trace.stop_reason in ("eos", "answer") or (isinstance(max_new, (int, float)) and len(trace.steps) >= max_new)
    return trace.policy.get("threshold") == threshold and done


def prompt_problem(prompt: str, limit: int) -> str | None:
    if not prompt.strip():
        return "The prompt is empty: type a question or pick an example."
    if len(prompt) > limit:
        return f"The prompt is {len(prompt):,} characters; the limit is {limit:,}."
    return None


def max_new_tokens(value) -> int:
    """The slider's value as a token count.  Gradio checks the slider's range but lets NaN and fractions through
    the API; refuse those with a message rather than an opaque error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ColmError(f"max new tokens must be a whole number, got {value!r}")
    return int(value)


def release(trace) -> None:
    """Free the engine rows a session's trace holds (its state expired or was replaced)."""
    if trace is not None:
        trace.release()


def about_on_first_visit(seen: bool):
    """About stays open for a first visit and starts closed on a return (the visitor can still open it)."""
    return gr.skip() if not seen else gr.Accordion(open=False)


def engine_label(decoder: CoLLM) -> str:
    threads = getattr(decoder.pair.base, "threads", None)
    return f"{decoder.pair.engine}" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def head_banner(decoder: CoLLM) -> str:
    head = decoder.head
    if head is not None and head.trained:
        return ""
    return ("**No trained deferral head.**  p_defer is 0.5 for every token, so Co-LLM at η ≥ 0.5 never defers "
            "(and below 0.5 always does).  The base-only, expert-only and random policies still work.  "
            "Train a head with `python -m colm train`.")


# ----------------------------------------------------------------------------------------------- the page
def build_app(decoder: CoLLM, banner: str = "", examples: list[tuple[str, str]] | None = None,
              max_prompt_chars: int = MAX_PROMPT_CHARS, default_max_new: int = DEFAULT_MAX_NEW) -> gr.Blocks:
    """The whole demo around one loaded decoder.  Callbacks close over ``decoder`` and nothing else shared."""
    examples = load_examples() if examples is None else examples
    answers = example_answers()
    # Shown as it is stored: the slider keeps 2-3 significant digits (the head's 0.1446664 is 0.145).
    thr0 = float(viz.fmt_threshold(decoder.head.threshold)) if decoder.head is not None else 0.5
    # The head's file may record the rule's cut-off that defers as often as the head at η (colm evaluate): the
    # default then compares the two at equal expert cost.
    matched = decoder.head is not None and "min_prob" in decoder.head.meta
    min_prob0 = round(round(decoder.head.min_prob / MIN_PROB_STEP) * MIN_PROB_STEP, 4) if matched else 0.5
    export_dir = Path(tempfile.mkdtemp(prefix="colm-app-"))
    atexit.register(shutil.rmtree, export_dir, ignore_errors=True)
    banner = "\n\n".join(b for b in (banner, head_banner(decoder)) if b)

    def export(trace, settings: dict) -> str:
        """Write the trace for the download button.  Gradio serves its own copy, so exports older than a session's
        lifetime are deleted here: a long-running demo does not fill the disk."""
        cutoff = time.time() - STATE_TTL_S
        for old in export_dir.glob("colm-trace-*.json"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass
        path = export_dir / f"colm-trace-{uuid.uuid4().hex[:12]}.json"
        path.write_text(viz.trace_json(trace, settings), encoding="utf-8")
        return str(path)

    def render(traces, settings: dict, stop: threading.Event, before=None, changes=page.changes_html):
        """Stream a growing trace: progress every token, the view at most every VIEW_EVERY_S, and at the end the
        whole view, the summary, what changed (``changes(before, trace)`` after a re-decode or a what-if) and
        the export file."""
        max_new = settings["max_new_tokens"]
        # Stop works from here on; the export is off until this decode has a file of its own.
        off = gr.DownloadButton(interactive=False)
        yield gr.skip(), stop, gr.skip(), "", page.progress_line(None, max_new), "", off
        last_view, trace = 0.0, None
        for trace in traces:
            now = time.monotonic()
            view = gr.skip()
            if now - last_view >= VIEW_EVERY_S:
                view, last_view = page.view_html(trace), now
            yield trace, stop, view, gr.skip(), page.progress_line(trace, max_new), "", gr.skip()
        if trace is not None:
            if before is not None and trace.stop_reason == "cancelled":
                trace.shown_before = before   # the next re-decode compares with the answer before this cut one
            trace.shown_changes = changes(before, trace) if before is not None else ""   # preview() restores it
            yield (trace, stop, page.view_html(trace), trace.shown_changes, viz.summary_line(trace), "",
                   export(trace, settings))

    def refuse(message: str):
        gr.Warning(message)
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {message}", gr.skip()

    def generate(prompt, policy_name, threshold, rate, min_prob, max_new, correct=False):
        """Decode the prompt with the chosen policy; ``correct``: course correction (colm.backtrack), lines the
        arithmetic checker finds wrong are taken back and rewritten by the expert."""
        prompt = prompt or ""   # lone surrogates and control characters are the decoder's to sanitise
        problem = prompt_problem(prompt, max_prompt_chars)
        if problem:
            yield refuse(problem)
            return
        stop = ThresholdStop(threshold) if policy_name == "colm" else threading.Event()
        try:
            n = max_new_tokens(max_new)
            settings = {"policy": policy_name, "threshold": threshold, "rate": rate, "min_prob": min_prob,
                        "max_new_tokens": n}
            policy = Policy(policy_name, threshold=float(threshold), rate=float(rate), min_prob=float(min_prob))
            if correct:
                backtrack = Backtrack()
                settings["backtrack"] = backtrack.describe()
                stream = backtrack_stream(decoder, prompt, policy, n, backtrack, stop=stop)
            else:
                stream = decoder.stream(prompt, policy, n, stop=stop)
            yield from render(stream, settings, stop)
        except ColmError as e:
            yield refuse(str(e))

    def redecode(trace, threshold, max_new):
        """The threshold was let go of (mouse, arrow keys, the number box) or applied: re-decode from the first
        changed decision and show what changed."""
        if trace is None:
            yield refuse("Generate an answer first; the threshold then re-decodes it.")
            return
        if trace.policy.get("name") != "colm":
            yield refuse("Re-decoding at a new threshold applies to Co-LLM answers: choose Co-LLM and Generate.")
            return
        if unchanged(trace, threshold, max_new):
            yield (gr.skip(),) * 5 + ("", gr.skip())     # let go where it started: nothing to re-decode
            return
        stop = ThresholdStop(threshold)
        try:
            n = max_new_tokens(max_new)
            settings = {"policy": "colm", "threshold": threshold, "max_new_tokens": n, "redecoded": True}
            stream = decoder.redecode_stream(trace, Policy("colm", threshold=float(threshold)), n, stop)
            yield from render(stream, settings, stop, before=getattr(trace, "shown_before", trace))
        except ColmError as e:
            yield refuse(str(e))

    def preview(trace, threshold):
        """Slider moving: mark the decisions that would flip and draw the pending line.  No model call."""
        if trace is None:
            return gr.skip(), gr.skip(), ""
        if not 0.0 <= threshold <= 1.0:   # NaN passes Gradio's range check when sent through the API
            return gr.skip(), gr.skip(), f"⚠️ threshold must be a number in [0, 1], got {threshold!r}"
        if trace.policy.get("name") != "colm":
            return gr.skip(), gr.skip(), "The threshold applies to the Co-LLM policy; this answer used another policy."
        if not trace.stop_reason:
            # Still being written (a re-decode the release queued): its own updates draw the view and the panel;
            # a preview answered now could land after the last of them and show a part of the answer.
            return gr.skip(), gr.skip(), gr.skip()
        if threshold == trace.policy.get("threshold"):
            # Back at the answer's own η (or a drag's last input arriving after its re-decode): the panel it showed,
            # not an empty one, so a late preview cannot wipe the before/after of the re-decode it belongs to.
            return page.view_html(trace), getattr(trace, "shown_changes", ""), ""
        return page.view_html(trace, pending=threshold), page.preview_html(trace, threshold), ""

    def what_if_button(trace, position):
        """The what-if button names the model it would switch to; it is live only for an answer that kept its
        decode state (a finished or stopped answer of this session, not one already branched from)."""
        live = trace is not None and position is not None and getattr(trace, "state", None) is not None
        return gr.Button(page.branch_label(trace, position), interactive=live)

    def select_token(trace, evt: gr.SelectData):
        return page.details_html(trace, evt.index), evt.index, what_if_button(trace, evt.index)

    def clear_selection():
        """A decode starts: nothing is selected in it yet."""
        return page.NO_SELECTION, None, what_if_button(None, None)

    def export_ready(trace):
        # The export's value stays a plain file path for API callers; only this handler switches the button.
        return gr.DownloadButton(interactive=trace is not None)

    def clear_if_redecoding(trace, threshold, max_new, stop):
        """Let go of a new threshold: the selection belongs to the old answer, and a decode at an older
        threshold still running is cut short (keys paused several times would otherwise queue full decodes)."""
        if trace is None or unchanged(trace, threshold, max_new):
            return gr.skip(), gr.skip(), gr.skip()
        stop_outdated(stop, threshold)
        return clear_selection()

    def what_if(trace, position, max_new):
        """"Use the other model here": the selected token is written by the other model and the answer continues
        from the cached prefix under the same policy (CoLLM.branch_stream); a later threshold change keeps the
        forced token only if it lies before the first changed decision (colm.branch)."""
        if trace is None or position is None:
            yield refuse("Click a token of an answer first; the other model then writes it.")
            return
        position = int(position)
        if not 0 <= position < len(trace.steps):
            yield refuse(f"Token #{position} is not part of this answer.")
            return
        source = page.panels.other_source(trace.steps[position])
        stop = threading.Event()
        try:
            n = max_new_tokens(max_new)
            settings = {"policy": trace.policy.get("name"), **{k: v for k, v in trace.policy.items() if k != "name"},
                        "max_new_tokens": n, "what_if": {"position": position, "source": source}}
            stream = decoder.branch_stream(trace, position, source, n, stop)
            yield from render(stream, settings, stop, before=trace,
                              changes=lambda b, a: page.branch_html(b, a, position))
        except ColmError as e:
            yield refuse(str(e))

    def stop_decoding(stop):
        if stop is not None:
            stop.set()

    def compare(prompt, threshold, max_new):
        """Base only, expert only and Co-LLM on one prompt, then a table to read them against each other."""
        prompt = prompt or ""
        problem = prompt_problem(prompt, max_prompt_chars)
        if problem:
            gr.Warning(problem)
            yield (gr.skip(),) * 8 + (f"⚠️ {problem}",)
            return
        stop = threading.Event()
        views, done = [gr.skip()] * 6, []
        try:
            n = max_new_tokens(max_new)
            yield (stop, *views, "", "")
            for i, policy in enumerate([Policy("base"), Policy("expert"), Policy("colm", threshold=float(threshold))]):
                last_view = 0.0
                for trace in decoder.stream(prompt, policy, n, stop=stop):
                    if time.monotonic() - last_view >= VIEW_EVERY_S:
                        views[2 * i], last_view = page.text_html(trace), time.monotonic()
                    views[2 * i + 1] = page.progress_line(trace, n)
                    yield (stop, *views, gr.skip(), "")
                views[2 * i:2 * i + 2] = page.text_html(trace), viz.summary_line(trace)
                done.append((viz.policy_label(trace.policy), trace))
                trace.release()  # side-by-side views are final: free their KV caches now
            yield (stop, *views, page.compare_table(done, answers.get(prompt)), "")
        except ColmError as e:
            gr.Warning(str(e))
            yield (stop, *views, gr.skip(), f"⚠️ {e}")

    def show_policy_sliders(name):
        return gr.Slider(visible=name == "random"), gr.Slider(visible=name == "confidence")

    with gr.Blocks(title="Co-LLM demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        # A trace holds engine rows (KV caches; llama.cpp has a fixed number): freed when the session's state
        # expires, and before that whenever another session needs the slot (least recently used first).
        trace_state = gr.State(None, time_to_live=STATE_TTL_S, delete_callback=release)
        stop_state = gr.State(None)
        selected_state = gr.State(None)      # the position the details panel shows
        gr.Markdown("# Co-LLM: a small model that learns when to ask a bigger one\n"
                    f"base **{decoder.pair.base_id}** · expert **{decoder.pair.expert_id}** · "
                    f"head **{decoder.head.identity if decoder.head is not None else 'none'}** · "
                    f"engine **{engine_label(decoder)}**", elem_id="models")
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Accordion("About: how Co-LLM writes an answer", open=True, elem_id="about") as about:
            gr.HTML(page.ABOUT_HTML, apply_default_css=False, js_on_load=None)
            with gr.Accordion("The maths", open=False):
                gr.Markdown(page.ABOUT_MATHS, latex_delimiters=LATEX)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=20, elem_id="prompt",
                                    placeholder="Ask a math word problem or a coding question…")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                policy = gr.Radio(POLICY_CHOICES, value="colm", label="Who writes each token", elem_id="policy")
                correct = gr.Checkbox(False, elem_id="backtrack",
                                      label="Course correction: when a finished line's arithmetic is wrong, take "
                                            "it back and have the expert rewrite it")
                rate = gr.Slider(0, 1, value=0.3, step=0.05, label="Random: share of tokens sent to the expert",
                                 visible=False, elem_id="rate")
                min_prob = gr.Slider(0, 1, value=min_prob0, step=MIN_PROB_STEP, visible=False, elem_id="min-prob",
                                     label="Confidence: defer when the base's top probability is below",
                                     info="The default defers about as often as Co-LLM at the head's η did on the "
                                          "problems η was chosen on, so the two cost the same." if matched else None)
                threshold = gr.Slider(0, 1, value=thr0, step=THRESHOLD_STEP, label="Deferral threshold η (Co-LLM)",
                                      info="Lower η: more tokens from the expert. Drag, or use the arrow keys: the "
                                           "pink preview shows what would change, and the answer is re-decoded "
                                           "when you let go or stop pressing keys.", elem_id="threshold")
                apply_btn = gr.Button("Re-decode at this η now", size="sm", elem_id="apply")
                max_new = gr.Slider(1, 1024, value=default_max_new, step=1, label="Max new tokens", elem_id="max-new")
                gr.Examples([[p] for _, p in examples], inputs=[prompt], example_labels=[lbl for lbl, _ in examples],
                            label="Examples")
            with gr.Column(scale=3, min_width=320):
                view = gr.HTML(page.EMPTY, elem_id="view", js_on_load=page.VIEW_JS, apply_default_css=False)
                summary = gr.Markdown(elem_id="summary")
                note = gr.Markdown(elem_id="note")
                changes = gr.HTML("", elem_id="changes", apply_default_css=False, js_on_load=None)
                with gr.Group(elem_id="details-box"):
                    details = gr.HTML(page.NO_SELECTION, elem_id="details", apply_default_css=False, js_on_load=None)
                    branch_btn = gr.Button(page.branch_label(None, None), size="sm", interactive=False,
                                           elem_id="branch")
                download = gr.DownloadButton("Export trace (JSON)", interactive=False, elem_id="export")
        with gr.Accordion("Compare: base only · expert only · Co-LLM on the same prompt", open=False):
            cmp_btn = gr.Button("Compare", elem_id="compare")
            cmp_views = []
            with gr.Row():
                for name in ("Base only", "Expert only", "Co-LLM"):
                    with gr.Column(min_width=240):
                        gr.Markdown(f"**{name}**")
                        cmp_views += [gr.HTML("", apply_default_css=False, js_on_load=None), gr.Markdown()]
            cmp_table = gr.Markdown(elem_id="compare-table")

        decoded = [trace_state, stop_state, view, changes, summary, note, download]
        model_call = dict(concurrency_id=MODEL, concurrency_limit=1)
        private = dict(queue=False, api_visibility="private")
        fresh = dict(fn=clear_selection, inputs=None, outputs=[details, selected_state, branch_btn], **private)
        ready = dict(fn=export_ready, inputs=[trace_state], outputs=[download], **private)
        letting_go = {**fresh, "fn": clear_if_redecoding, "inputs": [trace_state, threshold, max_new, stop_state]}
        gen_btn.click(generate, [prompt, policy, threshold, rate, min_prob, max_new, correct], decoded,
                      api_name="generate", **model_call).then(**ready)
        gen_btn.click(**fresh)
        threshold.input(preview, [trace_state, threshold], [view, changes, note], api_name="preview",
                        trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")
        # Mouse release, the number box losing focus, and (PAGE_JS) the end of arrow-key presses all land here.
        # always_last: a release while a re-decode runs is kept and runs next, so the page ends at the slider's
        # final value however fast it moved (the default would drop it and leave the page at an older η).
        threshold.release(redecode, [trace_state, threshold, max_new], decoded, api_name="redecode",
                          trigger_mode="always_last", **model_call).then(**ready)
        threshold.release(**letting_go)
        apply_btn.click(redecode, [trace_state, threshold, max_new], decoded, api_name="apply_threshold",
                        **model_call).then(**ready)
        apply_btn.click(**letting_go)
        view.select(select_token, [trace_state], [details, selected_state, branch_btn], api_visibility="private",
                    concurrency_limit=None, show_progress="hidden")
        # The selection is read by what_if and cleared only after it (the new answer has a new view); meanwhile
        # the button is off, so a second click cannot queue a branch of the answer being written.
        branch_btn.click(what_if, [trace_state, selected_state, max_new], decoded, api_name="what_if",
                         **model_call).then(**ready).then(**fresh)
        branch_btn.click(lambda: gr.Button(interactive=False), None, [branch_btn], **private)
        stop_btn.click(stop_decoding, [stop_state], None, api_name="stop", concurrency_limit=None)
        cmp_btn.click(compare, [prompt, threshold, max_new], [stop_state, *cmp_views, cmp_table, note],
                      api_name="compare", **model_call)
        policy.change(show_policy_sliders, [policy], [rate, min_prob], api_visibility="private", queue=False)
        # SEEN_JS reads (and sets) this browser's "been here" flag into the hidden box before the server answers.
        seen_box = gr.Checkbox(False, visible=False)
        demo.load(about_on_first_visit, [seen_box], [about], js=page.SEEN_JS, **private)
    demo.colm_export_dir = export_dir
    return demo


def serve(demo: gr.Blocks, **launch_kwargs):
    """Queue with one model call at a time (a shared CPU/GPU gains nothing from more) and launch with the page's
    CSS and script."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(css=page.CSS, js=page.PAGE_JS, **launch_kwargs)


# ----------------------------------------------------------------------------------------------- loading page
class LoadStatus:
    """Progress of the background load, written by the loading thread and read by the loading page."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self.t0 = time.monotonic()
        self.state = "loading"            # then "ready" or "failed"
        self.error = ""
        self.ready_at = None              # monotonic time of finish()
        self.polled_at = None             # monotonic time of a loading page's last tick

    def log(self, message: str) -> None:
        with self._lock:
            self._lines.append(str(message))

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self.state, self.error = ("failed", error) if error else ("ready", "")
            self.ready_at = time.monotonic()

    def handover_wait(self, tick: float = 1.0) -> float:
        """Seconds to keep the loading page up so an open one sees "ready" on its next tick (it then reloads
        into the demo by itself); none when no page has ticked lately."""
        with self._lock:
            if self.polled_at is None or time.monotonic() - self.polled_at > 3 * tick:
                return 0.0
            return max(0.0, self.ready_at + tick + 0.3 - time.monotonic())

    def markdown(self) -> str:
        with self._lock:
            lines, state, error = list(self._lines[-12:]), self.state, self.error
        if state == "ready":
            head = "**Ready.** Opening the demo…"
        elif state == "failed":
            head = f"**Loading failed:** {error}"
        else:
            head = f"**Loading the models… {time.monotonic() - self.t0:.0f} s** (the first start can take a minute or two)"
        return head + "".join(f"\n\n`{line}`" for line in lines)


# Once the status says ready, wait until the demo answers on this address (the loading server closes and the
# demo starts on the same port), then reload into it.
RELOAD_JS = """(text) => {
  if (!text || !text.startsWith("**Ready.") || window.colmReloading) return;
  window.colmReloading = true;
  const poll = async () => {
    try {
      const r = await fetch("config", {cache: "no-store"});
      if (r.ok && (await r.json()).title === "Co-LLM demo") { location.reload(); return; }
    } catch (e) {}
    setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
}"""


def build_loading_page(status: LoadStatus) -> gr.Blocks:
    """A page that shows ``status`` every second until the models are loaded, then reloads into the demo."""
    with gr.Blocks(title="Co-LLM demo (loading)", analytics_enabled=False) as page:
        gr.Markdown("# Co-LLM: a small model that learns when to ask a bigger one")
        text = gr.Markdown(status.markdown(), elem_id="loading-status")
        timer = gr.Timer(1)

        def poll():
            # Once ready the timer stops: a tick still in flight when the demo takes over the port would reach the
            # demo's first event handler (a gr.Examples loader) with the loading page's inputs, and fail there.
            status.polled_at = time.monotonic()
            md = status.markdown()
            return md, gr.Timer(active=status.state == "loading")
        timer.tick(poll, None, [text, timer], api_name="loading_status", concurrency_limit=None).then(
            None, text, None, js=RELOAD_JS)
    return page


# ----------------------------------------------------------------------------------------------- main
def load(args, progress=None) -> tuple[CoLLM, str]:
    """Load the pair and head once, printing progress (and passing it to ``progress``).  A head that cannot be
    used becomes a banner, not a crash: the baseline policies still work without one."""
    from colm.head import SHIPPED_HEAD, DeferralHead, untrained_head
    from colm.engines import load_pair
    from colm.loading import expert_server_kwargs

    def log(m):
        print(m, file=sys.stderr, flush=True)
        if progress is not None:
            progress(m)
    t0 = time.perf_counter()
    log("loading models (the very first start assembles the default pair into the cache: about 90 s)")
    pair = load_pair(args.base, args.expert, engine=args.engine, dtype=args.dtype, device=args.device,
                     threads=args.threads, progress=log, **expert_server_kwargs(args))
    path = args.head or (SHIPPED_HEAD if SHIPPED_HEAD.exists() and args.base == "default" else None)
    head, banner = None, ""
    if path is not None:
        try:
            head = DeferralHead.load(path, pair.base, pair.base_id).use_engine(pair.engine)   # η for this engine
        except ColmError as e:
            banner = f"**The deferral head could not be used:** {e}"
            log(f"warning: {e}")
    head = head or untrained_head(pair.base, pair.base_id)
    if not head.trained:
        log("warning: no trained deferral head; the Co-LLM policy will not defer usefully")
    log(f"loaded {pair.base_id} + {pair.expert_id} on {pair.engine} in {time.perf_counter() - t0:.0f} s")
    return CoLLM(pair, head), banner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Co-LLM web demo")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--base", default="default")
    p.add_argument("--expert", default="default")
    p.add_argument("--head", default=None, help="deferral head .safetensors (default: the shipped head)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"],
                   help="auto: llama.cpp on a CPU for the GGUF default pair, torch on a GPU or for model directories")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_expert_server_arguments(p)
    args = p.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)   # `kill`, `docker stop`: close like Ctrl-C, clean up on exit
    status, loaded = LoadStatus(), []

    def work():
        try:
            loaded.append(load(args, status.log))
            status.finish()
        except ColmError as e:
            status.finish(str(e))
        except Exception as e:                      # shown on the page too; the traceback goes to the terminal
            status.finish(f"{type(e).__name__}: {e}")
            raise
    loader = threading.Thread(target=work, name="colm-load", daemon=True)
    loader.start()
    # The loading page is local only: a share link comes with the demo itself.
    loading = build_loading_page(status).queue()
    loading.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    print(f"loading page on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        while loader.is_alive():
            loader.join(0.5)
        if status.state != "ready":
            print(f"error: {status.error}", file=sys.stderr, flush=True)
            return 2
        demo = build_app(*loaded[0])                # built while the loading page still answers
        time.sleep(status.handover_wait())
    except KeyboardInterrupt:
        return 2 if status.state == "failed" else 130
    finally:
        loading.close()
    serve(demo, server_name=args.host, server_port=args.port, share=args.share)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
