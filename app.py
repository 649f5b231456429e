"""Co-LLM web demo.

    python app.py [--host 127.0.0.1] [--port 7860] [--base default --expert default] [--head PATH]
                  [--device auto] [--dtype auto] [--share]

Thin on purpose: load the pair and head once, build the page around one CoLLM decoder, one callback per user
action.  Everything drawn comes from colm.viz; each browser session keeps its own trace in gr.State.  While the
models load (the first cold start takes a minute or two) a small loading page on the same port shows progress,
then reloads into the demo.
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

from colm import viz
from colm.data import messages
from colm.decode import CoLLM, Policy
from colm.models import ColmError

EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples.json"
MAX_PROMPT_CHARS = 8000
CHART_EVERY_S = 0.5        # the chart is the heavy part of a streamed update; the text updates every token
STATE_TTL_S = 3600         # a trace holds KV caches; drop a session's after an hour of disuse
MODEL = "model"            # one concurrency group for every callback that runs a model
DEFAULT_MAX_NEW = 512      # covers every shipped example's whole answer (bench/examples.py measures them)

POLICY_CHOICES = [("Co-LLM", "colm"), ("base only", "base"), ("expert only", "expert"),
                  ("random", "random"), ("confidence", "confidence")]

ABOUT = r"""
**Co-LLM** (Shen et al., ACL 2024) lets a small *base* model write an answer and, token by token, decide to hand
the next token to a larger *expert* model instead.

Before each token the base model has a hidden state $h_t$ (its last layer, after reading everything so far).
A learned linear map — the *deferral head* — turns it into a probability of deferring:

$$p_{\text{defer}} = \sigma(w \cdot h_t + v \cdot c_t + b)$$

where $c_t$ is how sure the base is about its next token (its top probability, entropy and top-2 margin).
The paper's head reads $h_t$ only; with a frozen base, adding $c_t$ made the shipped head much better.

The token comes from the expert if $p_{\text{defer}} > \eta$ and from the base model otherwise; $\eta$ is the
threshold slider.  Lower $\eta$ means more expert tokens: better answers, more expert compute.

**Training.**  Nobody labels which tokens need help.  The head is fit by treating the choice as a latent variable
and maximising the likelihood of correct answers under the mixture of the two models:

$$\mathcal{L} = -\sum_t \log\Big[(1-\sigma(d_t))\,P_{\text{base}}(x_t \mid x_{<t}) + \sigma(d_t)\,P_{\text{expert}}(x_t \mid x_{<t})\Big],\qquad d_t = w\cdot h_t + v\cdot c_t + b$$

so the head learns to defer exactly where the expert is much more likely to produce the right token.
With the base frozen (as here, on a CPU) a simpler label worked better: the shipped head is a logistic
regression on *disagreement* — positions where the base's top token differs from the expert's.  Deferring at
exactly those positions reproduces the expert's answer.

**Why it is cheap.**  The expert only runs when a token is deferred.  Tokens it has not seen yet wait in a queue
and go through it in one forward pass at the next deferral, so expert forward passes = deferred tokens.

**Reading the page.**  Orange tokens came from the expert.  The chart shows $p_{\text{defer}}$ for every
position, with the threshold as a dashed line; hover a bar to see the base's and the expert's top candidates.
Dragging the threshold previews which decisions would flip (hatched bars, purple text); releasing it (or
*Apply threshold*) re-decodes from the first flipped token, reusing everything before it.
"""
# Gradio lays HighlightedText tokens out as separate flex boxes with margins, which adds gaps inside words and
# moves line breaks; this makes the answer flow as plain monospace text, each "\n" a real line break.  The
# font-size 0 hides the template's own whitespace between spans, so only the text's sizes (and backgrounds) count.
CSS = r"""
.colm-answer .textfield { display: block; font-size: 0; word-break: normal; overflow-wrap: anywhere; }
.colm-answer .token-container, .colm-answer .token { display: inline; }
.colm-answer .text, .colm-answer .line-break::after { font-family: var(--font-mono); font-size: var(--text-md);
  line-height: 1.6; }
.colm-answer .token.highlighted { margin: 0; padding: 0; }
.colm-answer .token.highlighted .text { background: inherit; border-radius: 2px; box-decoration-break: clone;
  -webkit-box-decoration-break: clone; }
.dark .colm-answer .token.highlighted .text, .dark .colm-answer .legend-item { color: var(--body-text-color); }
.colm-answer .line-break { display: inline; }
.colm-answer .line-break::after { content: "\A"; white-space: pre; }
"""
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


# ----------------------------------------------------------------------------------------------- plain helpers
def load_examples(path: Path = EXAMPLES) -> list[tuple[str, str]]:
    """(label, prompt) pairs.  Word problems get the instruction the head was trained with."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return [(e["label"], messages(e["question"])[0]["content"] if e.get("gsm8k") else e["question"]) for e in items]


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
    thr0 = decoder.head.threshold if decoder.head is not None else 0.5
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

    def render(traces, threshold: float, settings: dict, stop: threading.Event):
        """Stream a growing trace: text and summary every token, the chart at most every CHART_EVERY_S,
        everything (and the export file) once it ends."""
        yield gr.skip(), stop, gr.skip(), gr.skip(), gr.skip(), "", gr.skip()   # Stop works during the prefill too
        last_chart, trace = 0.0, None
        for trace in traces:
            now = time.monotonic()
            chart = gr.skip()
            if now - last_chart >= CHART_EVERY_S:
                chart, last_chart = viz.deferral_figure(trace, threshold), now
            yield trace, stop, viz.highlighted(trace), chart, viz.summary_line(trace), "", gr.skip()
        if trace is not None:
            yield (trace, stop, viz.highlighted(trace), viz.deferral_figure(trace, threshold),
                   viz.summary_line(trace), "", export(trace, settings))

    def refuse(message: str):
        gr.Warning(message)
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {message}", gr.skip()

    def generate(prompt, policy_name, threshold, rate, min_prob, max_new):
        prompt = prompt or ""   # lone surrogates and control characters are the decoder's to sanitise
        problem = prompt_problem(prompt, max_prompt_chars)
        if problem:
            yield refuse(problem)
            return
        stop = threading.Event()
        try:
            n = max_new_tokens(max_new)
            settings = {"policy": policy_name, "threshold": threshold, "rate": rate, "min_prob": min_prob,
                        "max_new_tokens": n}
            policy = Policy(policy_name, threshold=float(threshold), rate=float(rate), min_prob=float(min_prob))
            yield from render(decoder.stream(prompt, policy, n, stop=stop), threshold, settings, stop)
        except ColmError as e:
            yield refuse(str(e))

    def redecode(trace, threshold, max_new):
        if trace is None:
            yield refuse("Generate an answer first; the threshold then re-decodes it.")
            return
        if trace.policy.get("name") != "colm":
            yield refuse("Re-decoding at a new threshold applies to Co-LLM answers: choose Co-LLM and Generate.")
            return
        stop = threading.Event()
        try:
            n = max_new_tokens(max_new)
            settings = {"policy": "colm", "threshold": threshold, "max_new_tokens": n, "redecoded": True}
            stream = decoder.redecode_stream(trace, Policy("colm", threshold=float(threshold)), n, stop)
            yield from render(stream, threshold, settings, stop)
        except ColmError as e:
            yield refuse(str(e))

    def preview(trace, threshold):
        """Slider moving: redraw the line and mark the decisions that would flip.  No model call."""
        if trace is None:
            return gr.skip(), gr.skip(), ""
        if not 0.0 <= threshold <= 1.0:   # NaN passes Gradio's range check when sent through the API
            return gr.skip(), gr.skip(), f"⚠️ threshold must be a number in [0, 1], got {threshold!r}"
        if trace.policy.get("name") != "colm":
            return (viz.highlighted(trace), viz.deferral_figure(trace, threshold),
                    "The threshold applies to the Co-LLM policy; this answer used another policy.")
        flipped = viz.flips(trace, threshold)
        note = (f"{len(flipped)} decision(s) would flip at η = {threshold:.2f}; release the slider or press "
                "*Apply threshold* to re-decode from the first one." if flipped else "")
        return viz.highlighted(trace, flipped), viz.deferral_figure(trace, threshold, flipped), note

    def stop_decoding(stop):
        if stop is not None:
            stop.set()

    def compare(prompt, threshold, max_new):
        prompt = prompt or ""
        problem = prompt_problem(prompt, max_prompt_chars)
        if problem:
            gr.Warning(problem)
            yield (gr.skip(),) * 7 + (f"⚠️ {problem}",)
            return
        stop = threading.Event()
        views = [gr.skip()] * 6
        try:
            n = max_new_tokens(max_new)
            for i, policy in enumerate([Policy("base"), Policy("expert"), Policy("colm", threshold=float(threshold))]):
                for trace in decoder.stream(prompt, policy, n, stop=stop):
                    views[2 * i:2 * i + 2] = viz.highlighted(trace), viz.summary_line(trace)
                    yield (stop, *views, "")
                trace.release()  # side-by-side views are final: free their KV caches now
        except ColmError as e:
            gr.Warning(str(e))
            yield (stop, *views, f"⚠️ {e}")

    def show_policy_sliders(name):
        return gr.Slider(visible=name == "random"), gr.Slider(visible=name == "confidence")

    with gr.Blocks(title="Co-LLM demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        # A trace holds engine rows (KV caches; llama.cpp has a fixed number): freed when the session's state
        # expires, and before that whenever another session needs the slot (least recently used first).
        trace_state = gr.State(None, time_to_live=STATE_TTL_S, delete_callback=release)
        stop_state = gr.State(None)
        gr.Markdown("# Co-LLM: a small model that learns when to ask a bigger one\n"
                    f"base **{decoder.pair.base_id}** · expert **{decoder.pair.expert_id}** · "
                    f"head **{decoder.head.identity if decoder.head is not None else 'none'}** · "
                    f"engine **{engine_label(decoder)}**", elem_id="models")
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=20, elem_id="prompt",
                                    placeholder="Ask a math word problem or a coding question…")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                policy = gr.Radio(POLICY_CHOICES, value="colm", label="Who writes each token", elem_id="policy")
                rate = gr.Slider(0, 1, value=0.3, step=0.05, label="Random: share of tokens sent to the expert",
                                 visible=False, elem_id="rate")
                min_prob = gr.Slider(0, 1, value=0.5, step=0.05, visible=False, elem_id="min-prob",
                                     label="Confidence: defer when the base's top probability is below")
                threshold = gr.Slider(0, 1, value=thr0, step=0.01, label="Deferral threshold η (Co-LLM)",
                                      info="Drag to preview which tokens would change; release or press Apply "
                                           "to re-decode from the first change.", elem_id="threshold")
                apply_btn = gr.Button("Apply threshold", size="sm", elem_id="apply")
                max_new = gr.Slider(1, 1024, value=default_max_new, step=1, label="Max new tokens", elem_id="max-new")
                gr.Examples([[p] for _, p in examples], inputs=[prompt], example_labels=[lbl for lbl, _ in examples],
                            label="Examples")
            with gr.Column(scale=3, min_width=320):
                answer = gr.HighlightedText(label="Answer (highlighted tokens came from the expert)",
                                            color_map=viz.COLOR_MAP, show_legend=True, show_inline_category=False,
                                            elem_id="answer", elem_classes="colm-answer")
                summary = gr.Markdown(elem_id="summary")
                note = gr.Markdown(elem_id="note")
                chart = gr.Plot(label="p_defer per token", elem_id="chart")
                download = gr.DownloadButton("Export trace (JSON)", elem_id="export")
        with gr.Accordion("Compare: base only · expert only · Co-LLM on the same prompt", open=False):
            cmp_btn = gr.Button("Compare", elem_id="compare")
            cmp_views = []
            with gr.Row():
                for name in ("Base only", "Expert only", "Co-LLM"):
                    with gr.Column(min_width=240):
                        cmp_views += [gr.HighlightedText(label=name, color_map=viz.COLOR_MAP, show_legend=False,
                                                         show_inline_category=False, elem_classes="colm-answer"),
                                      gr.Markdown()]
        with gr.Accordion("About Co-LLM", open=False):
            gr.Markdown(ABOUT, latex_delimiters=LATEX)

        decoded = [trace_state, stop_state, answer, chart, summary, note, download]
        model_call = dict(concurrency_id=MODEL, concurrency_limit=1)
        gen_btn.click(generate, [prompt, policy, threshold, rate, min_prob, max_new], decoded,
                      api_name="generate", **model_call)
        threshold.input(preview, [trace_state, threshold], [answer, chart, note], api_name="preview",
                        trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")
        threshold.release(redecode, [trace_state, threshold, max_new], decoded, api_name="redecode", **model_call)
        # .release does not fire for arrow keys; keyboard users apply with the button (same callback).
        apply_btn.click(redecode, [trace_state, threshold, max_new], decoded, api_name="apply_threshold",
                        **model_call)
        stop_btn.click(stop_decoding, [stop_state], None, api_name="stop", concurrency_limit=None)
        cmp_btn.click(compare, [prompt, threshold, max_new], [stop_state, *cmp_views, note], api_name="compare",
                      **model_call)
        policy.change(show_policy_sliders, [policy], [rate, min_prob], api_visibility="private", queue=False)
    demo.colm_export_dir = export_dir
    return demo


def serve(demo: gr.Blocks, **launch_kwargs):
    """Queue with one model call at a time (a shared CPU/GPU gains nothing from more) and launch with our CSS."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(css=CSS, **launch_kwargs)


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

    def log(m):
        print(m, file=sys.stderr, flush=True)
        if progress is not None:
            progress(m)
    t0 = time.perf_counter()
    log("loading models (the very first start assembles the default pair into the cache: about 90 s)")
    pair = load_pair(args.base, args.expert, engine=args.engine, dtype=args.dtype, device=args.device,
                     threads=args.threads, progress=log)
    path = args.head or (SHIPPED_HEAD if SHIPPED_HEAD.exists() and args.base == "default" else None)
    head, banner = None, ""
    if path is not None:
        try:
            head = DeferralHead.load(path, pair.base, pair.base_id)
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
