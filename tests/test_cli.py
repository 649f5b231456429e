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
