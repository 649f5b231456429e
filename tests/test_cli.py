import json
import subprocess
import sys

import pytest

from colm.cli import main, render_marked
from colm.decode import Step, Trace


def run(*args):
    return subprocess.run([sys.executable, "-m", "colm", *args], capture_output=True, text=True, timeout=300)


def test_render_marked_brackets_expert_runs():
    steps = [Step(i, i, t, s, 0.5, []) for i, (t, s) in enumerate(
        [("a", "base"), (" b", "expert"), (" c", "expert"), (" d", "base"), (" e", "expert")])]
    tr = Trace("p", [], {"name": "colm"}, steps)
    assert render_marked(tr, color=False) == "a[[ b c]] d[[ e]]"
    assert "\x1b[" in render_marked(tr, color=True)


def test_generate_json_on_tiny_local_pair(pair_dirs, tmp_path):
    r = run("generate", "What is 2+2?", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
            "--policy", "random", "--rate", "0.5", "--max-new-tokens", "8", "--json", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"text", "deferral_rate", "expert_calls", "decode_seconds", "tokens_per_second", "base_model",
            "expert_model", "head", "steps"} <= set(d)
    assert len(d["steps"]) == 8 and set(d["steps"][0]) == {"position", "token_id", "text", "source", "p_defer"}
    assert d["expert_calls"] == sum(s["source"] == "expert" for s in d["steps"])
    assert d["engine"] == "torch"          # model directories run on torch under --engine auto


@pytest.mark.parametrize("flag, want", [([], 0.9), (["--min-prob", "0.3"], 0.3)])
def test_generate_confidence_defaults_to_the_cut_off_recorded_with_the_head(pair_dirs, tmp_path, flag, want):
    from colm.head import DeferralHead
    DeferralHead(32, {"trained": True, "base_model": "tiny", "min_prob": 0.9}).save(tmp_path / "h.safetensors")
    r = run("generate", "What is 2+2?", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
            "--head", str(tmp_path / "h.safetensors"), "--policy", "confidence", *flag, "--max-new-tokens", "4",
            "--json", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"] == {"name": "confidence", "min_prob": want}


def test_generate_backtrack_json_and_refusals(pair_dirs):
    models = ("--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"), "--dtype", "fp32")
    r = run("generate", "What is 2+2?", *models, "--policy", "base", "--max-new-tokens", "6", "--json", "--backtrack")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rollbacks"] == [] and d["policy"]["backtrack"] == {"max_retries": 2, "detectors": ["arithmetic"]}
    r = run("generate", "hi", *models, "--backtrack", "--force", "2=expert")
    assert r.returncode == 2 and "do not combine" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "hi", *models, "--backtrack", "--max-retries", "-1")
    assert r.returncode == 2 and "max_retries" in r.stderr and "Traceback" not in r.stderr


def test_generate_plain_marks_and_reports_rate(pair_dirs):
    r = run("generate", "hi", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
            "--policy", "expert", "--max-new-tokens", "5", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "[[" in r.stdout and "deferral rate: 100.0%" in r.stdout


def test_untrained_head_warns(pair_dirs):
    r = run("generate", "hi", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
            "--max-new-tokens", "3", "--dtype", "fp32")
    assert r.returncode == 0 and "no trained deferral head" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["generate", "   ", "--policy", "base"], "empty"),
    (["generate", "hi", "--policy", "random", "--rate", "1.5"], "rate"),
    (["generate", "hi", "--threshold", "nan"], "threshold"),
    (["generate", "hi", "--max-new-tokens", "0", "--policy", "base"], "max_new_tokens"),
    (["generate", "hi", "--head", "/nonexistent/head.safetensors"], "not found"),
])
def test_generate_bad_input_exits_nonzero(pair_dirs, args, msg):
    r = run(*args, "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"), "--dtype", "fp32")
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("content,msg", [
    ('{"question": "q", "answer": "#### 1"}\n{not json\n', ":2: not valid JSON"),
    ('{"question": "q"}\n', ":1: each line needs"),
    ('{"question": "q", "answer": "no number"}\n', "no final number"),
])
def test_train_bad_data_names_the_line(tmp_path, content, msg, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "h.safetensors")]) == 2
    assert msg in capsys.readouterr().err


def test_evaluate_missing_data_file(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--start", "-1"], "--start must be ≥ 0 and --limit ≥ 1"),
    (["--limit", "0"], "--start must be ≥ 0 and --limit ≥ 1"),
    (["--model", "expert", "--threshold", "0.2"], "--head and --threshold are for --model colm"),
    (["--model", "base", "--head", "h.safetensors"], "--head and --threshold are for --model colm"),
])
def test_rollouts_rejects_bad_arguments(tmp_path, capsys, args, msg):
    assert main(["rollouts", *args, "--out", str(tmp_path / "r.jsonl")]) == 2
    assert msg in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("flag, value, msg", [
    ("--baseline-rate", "1.5", "--baseline-rate must be in [0, 1]"),
    ("--max-deferral", "-0.1", "--max-deferral must be in [0, 1]"),
    ("--random-rates", "0.1,2", "--random-rates must be in [0, 1]"),
    ("--random-rates", "0.1,x", "--random-rates takes comma-separated numbers"),
    ("--fractions", "0,ten", "--fractions takes comma-separated numbers"),
])
def test_evaluate_rejects_shares_outside_0_1(tmp_path, capsys, flag, value, msg):
    assert main(["evaluate", flag, value, "--out", str(tmp_path / "o")]) == 2
    assert msg in capsys.readouterr().err


class FakeTerminal:
    """A stdout that says it is a terminal and logs every write and flush, in order."""

    def __init__(self, log):
        self.log = log

    def isatty(self):
        return True

    def write(self, s):
        self.log.append(("write", s))
        return len(s)

    def flush(self):
        self.log.append(("flush", None))


def test_generate_streams_in_colour_on_a_terminal(pair_dirs, monkeypatch):
    """On a terminal each token is printed (and flushed) as soon as it is decoded, expert runs in colour, then the
    summary; the whole equals the marked rendering of the finished trace."""
    from colm import cli
    from colm.decode import CoLLM
    log, traces = [], []
    real_stream = CoLLM.stream

    def stream(self, *a, **kw):
        for tr in real_stream(self, *a, **kw):
            traces.append(tr)
            log.append(("yield", len(tr.steps)))
            yield tr
    monkeypatch.setattr(CoLLM, "stream", stream)
    monkeypatch.setattr(sys, "stdout", FakeTerminal(log))
    monkeypatch.delenv("NO_COLOR", raising=False)
    code = cli.main(["generate", "hi", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                     "--policy", "random", "--rate", "0.5", "--max-new-tokens", "10", "--dtype", "fp32"])
    assert code == 0
    trace = traces[-1]
    sources = [s.source for s in trace.steps]
    assert "expert" in sources and "base" in sources and len(trace.steps) > 2
    out = "".join(s for kind, s in log if kind == "write")
    answer, summary = out.split("\n", 1)
    assert answer == cli.render_marked(trace, color=True)
    assert "\x1b[" in answer and "deferral rate:" in summary
    # Each token's text is written (and flushed) before the next token is decoded.
    for k, s in enumerate(trace.steps):
        next_yield = log.index(("yield", k + 2)) if k + 1 < len(trace.steps) else len(log)
        written = "".join(x for kind, x in log[:next_yield] if kind == "write")
        assert "".join(t.text for t in trace.steps[:k + 1]) in written.replace(cli.EXPERT_ON, "").replace(
            cli.EXPERT_OFF, "")
        assert ("flush", None) in log[log.index(("yield", k + 1)):next_yield]
    # ANSI codes open before each expert run and close after it.
    for k, s in enumerate(trace.steps):
        if s.source == "expert" and (k == 0 or trace.steps[k - 1].source != "expert"):
            assert cli.EXPERT_ON + s.text in answer
    assert answer.count(cli.EXPERT_ON) == answer.count(cli.EXPERT_OFF)


def test_stream_marked_closes_the_colour_on_interrupt():
    """Ctrl-C in the middle of an expert run leaves the terminal uncoloured."""
    from colm.cli import EXPERT_OFF, EXPERT_ON, stream_marked
    steps = [Step(0, 0, "a", "base", 0.1, []), Step(1, 1, " b", "expert", 0.9, [])]

    def traces():
        for k in (1, 2):
            yield Trace("p", [], {"name": "colm"}, steps[:k])
        raise KeyboardInterrupt
    log = []
    with pytest.raises(KeyboardInterrupt):
        stream_marked(traces(), color=True, out=FakeTerminal(log))
    assert "".join(s for kind, s in log if kind == "write") == f"a{EXPERT_ON} b{EXPERT_OFF}\n"


def test_generate_not_a_terminal_keeps_brackets(pair_dirs, monkeypatch, capsys):
    from colm import cli
    code = cli.main(["generate", "hi", "--base", str(pair_dirs / "base"), "--expert", str(pair_dirs / "expert"),
                     "--policy", "expert", "--max-new-tokens", "4", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("[[") and "]]\n\ndeferral rate: 100.0%" in out and "\x1b[" not in out


def test_app_help_lists_the_demo_options():
    r = run("app", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: colm app" in r.stdout and "--port" in r.stdout and "--share" in r.stdout


def test_app_passes_its_arguments_through(monkeypatch):
    import app
    seen = []
    monkeypatch.setattr(app, "main", lambda argv: seen.append(argv) or 0)
    assert main(["app", "--port", "7999", "--base", "some/dir", "--share"]) == 0
    assert seen == [["--port", "7999", "--base", "some/dir", "--share"]]


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("colm generate: error:")
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--bogus" in err


def test_generate_json_on_the_default_pair_says_llamacpp():
    """The embedded pair under --engine auto on a CPU runs on llama.cpp, and --json says so."""
    from conftest import default_pair_installed
    if not default_pair_installed():
        pytest.skip("embedded default pair or llama-cpp-python not installed")
    r = run("generate", "What is 2+2?", "--max-new-tokens", "6", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["engine"] == "llamacpp" and len(d["steps"]) <= 6 and d["head"] == "head-gsm8k.safetensors"
