"""bench/load.py --quick: the app as a separate server process under 4 concurrent sessions x 5 generations, then
Stop pressed 10 times in a row (tiny models; the full run on the default models is recorded in docs/RELIABILITY.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_test_head

pytest.importorskip("gradio_client")
pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parent.parent


def test_load_quick(pair_dirs, tmp_path):
    head = make_test_head(32)
    head.save(tmp_path / "head.safetensors")
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "bench/load.py", "--quick", "--base", str(pair_dirs / "base"),
                        "--expert", str(pair_dirs / "expert"), "--head", str(tmp_path / "head.safetensors"),
                        "--dtype", "fp32", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.exists(), r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert r.returncode == 0 and res["ok"], res["failures"]
    assert res["listening"] and all(a.startswith("127.0.0.1:") for a in res["listening"])
    load, stop = res["load"], res["stop"]
    assert load["generations"] == load["completed_clean"] == 20
    assert load["models"][0].endswith("base") and load["models"][2] == "random-test-head"
    assert stop["stopped"] == stop["presses"] == 10 and stop["next_request_ok"]
    assert res["server_exit_status"] == 0 and res["exports_left_after_exit"] == []   # SIGTERM: a clean exit
