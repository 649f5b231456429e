"""Run files: every decode over a problem set (an evaluation point, a baseline, a training rollout) is one JSONL file
with one record per problem, written by ``run_policy``, and beside it a manifest saying what made it.

A run is resumable: records are appended and fsynced batch by batch, and a rerun skips the problems already there.
Resuming is only right when the rerun would have written the same records, so ``NAME.jsonl`` has ``NAME.manifest.json``:

    {"format": "colm-run/1",
     "match": {...},   what the records depend on; a resume must agree on every field
     "info":  {...}}   provenance that does not change the records (colm version, dtype, threads, exact values)

``match`` holds the policy (as the file is named: threshold to 6 places, rate to 3, the random policy's seed and how it
draws), the models the policy reads, the engine, max_new_tokens, the data (a sha256 of every problem's index and
question), the prompt (chat template + the shared instruction) and, for the Co-LLM policy only, a sha256 of the head's
weights (base, expert, random and confidence runs do not read the head, so any head may reuse them).

Continuing a file whose manifest differs, or one with no manifest at all (written before colm kept them: nothing says
how it was made), raises ColmError naming the fields; ``restart=True`` (``--restart``) moves the old file and
manifest aside to ``NAME.jsonl.replaced-<UTC time>`` and starts afresh.  A manifest marked ``"reconstructed"`` in its
info was written after the fact from what the commit history says (the committed runs under data/).

``run_backtracking`` writes the course-corrected twin of a Co-LLM run (only answers with a wrong line decoded again);
``summarize`` and ``backtracked`` turn records into the figures an evaluation reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .data import INSTRUCTION, Example, is_correct, messages
from .models import ColmError
from .policy import Policy
from .stats import paired as paired_comparison
from .stats import wilson

MANIFEST_FORMAT = "colm-run/1"


# ----------------------------------------------------------------------------------------------- records
def read_done(path: Path) -> dict[int, dict]:
    """index -> record for every complete line; a torn last line is truncated away."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            done[rec["index"]] = rec
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole JSON lines and fsync: a kill leaves at most one torn last line, which ``read_done`` drops."""
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sort_in_windows(items: list, key, size: int) -> list:
    """Sort by ``key`` within consecutive windows of ``size`` items.

    Similar lengths batch together, so left padding wastes little; but only within windows of a few batches, so a
    run stopped early has answered a prefix of the problems, not the shortest ones (a biased training set).
    """
    size = max(size, 1)
    return [x for s in range(0, len(items), size) for x in sorted(items[s:s + size], key=key)]


# ----------------------------------------------------------------------------------------------- manifests
def manifest_path(path: Path) -> Path:
    """NAME.jsonl -> NAME.manifest.json"""
    return path.with_name(path.stem + ".manifest.json")


def head_sha256(head) -> str:
    """sha256 of what a head computes: its inputs and its fp32 weights (not the file: ``--write-threshold`` rewrites
    the file's metadata, not what the head says)."""
    h = hashlib.sha256(json.dumps({"inputs": list(head.meta["inputs"]),
                                   "shape": list(head.linear.weight.shape)}).encode())
    for t in (head.linear.weight, head.linear.bias):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(rows: list[Example]) -> dict:
    """What problem each index names: a sha256 over every row's index and question.  Pass the whole data file's
    rows (as the CLI does) so that a run extended by a larger --limit or shared by --start still matches."""
    h = hashlib.sha256()
    for e in rows:
        h.update(f"{e.index}\t{e.question}\n".encode())
    return {"questions_sha256": h.hexdigest(), "rows": len(rows)}


def policy_key(policy: Policy) -> dict:
    """The policy as its run file is named (a threshold to 6 places, a rate to 3), plus how random draws are made."""
    d = policy.describe()
    if "threshold" in d:
        d["threshold"] = round(d["threshold"], 6)
    if policy.name == "random":
        d["rate"] = round(d["rate"], 3)
        d["draws"] = "per-row"       # one generator per problem from (seed, index): colm.policy.Policy.rngs
    return d


def colm_version() -> str:
    try:
        from importlib.metadata import version
        return version("colm")
    except Exception:
        pass
    try:
        import tomllib
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"   # a checkout, not installed
        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except Exception:
        return "unknown"


def run_manifest(dec, policy: Policy, max_new_tokens: int, data: dict, key: dict | None = None,
                 data_file: str | None = None) -> dict:
    """The manifest of a run of ``policy`` on decoder ``dec``.  ``key`` replaces ``policy_key(policy)`` where a file is
    named by something else (the confidence baseline: by its share of deferred tokens, not its cut-off)."""
    pair = dec.pair
    models = ({"base": pair.base_id} if policy.name == "base" else {"expert": pair.expert_id}
              if policy.name == "expert" else {"base": pair.base_id, "expert": pair.expert_id})
    match = {"policy": key or policy_key(policy), "models": models, "engine": pair.engine,
             "max_new_tokens": max_new_tokens, "data": data, "prompt": {"chat": True, "instruction": INSTRUCTION}}
    if getattr(dec, "stop_at_answer", False):   # absent: the end-token rule alone, as every run before it
        match["stop"] = "eos or '#### n' line"
    model = getattr(pair.base, "model", None)
    info = {"colm_version": colm_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "policy": policy.describe(), "data_file": data_file, "eos_ids": list(dec.eos_ids),
            "threads": pair.describe().get("threads"), "dtype": str(getattr(model, "dtype", "")) or None}
    if policy.needs_head:
        match["head"] = {"sha256": head_sha256(dec.head)}
        info["head"] = dec.head.identity
    return {"format": MANIFEST_FORMAT, "match": match, "info": info}


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = "unknown" if v is None else json.dumps(v)
    return s if len(s) <= 40 else s[:16] + "…" + s[-8:]


def _read_manifest(mpath: Path) -> dict | str:
    if not mpath.exists():
        return "no manifest (the file predates them, so how it was made is unknown)"
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest {mpath.name} ({e})"
    return old if isinstance(old, dict) else f"unreadable manifest {mpath.name}"


def differences(old: dict | str, new: dict) -> list[str]:
    """'field: X in the file, Y now' for every ``match`` field (dotted) on which two manifests differ (``old`` may
    be a string saying why there is no manifest to compare)."""
    if isinstance(old, str):
        return [old]
    if old.get("format") != new["format"]:
        return [f"format: {_short(old.get('format'))} in the file, {_short(new['format'])} now"]
    a, b = _flat(old.get("match")), _flat(new["match"])
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            note = " (reconstructed)" if (old.get("info") or {}).get("reconstructed") and a.get(k) is None else ""
            names = ""
            if k == "head.sha256":
                names = f" [{(old.get('info') or {}).get('head', '?')} vs {(new.get('info') or {}).get('head', '?')}]"
            out.append(f"{k}: {_short(a.get(k))}{note} in the file, {_short(b.get(k))} now{names}")
    return out


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def open_run(path: Path, manifest: dict, restart: bool = False) -> dict[int, dict]:
    """Make ``path`` ready for (more) records of the run ``manifest`` describes; returns the records already there.

    A file with records must carry an agreeing manifest; otherwise ColmError, or with ``restart`` the file and its
    manifest are moved aside (never deleted) and the run starts afresh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(path)
    if path.exists() and path.stat().st_size > 0:
        why = differences(_read_manifest(mpath), manifest)
        if not why:
            return read_done(path)
        if not restart:
            raise ColmError(f"{path} was not written by this run, so it cannot be resumed: {'; '.join(why)}. Pass "
                            f"--restart to move it aside and decode again, or use another output path")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for p in (path, mpath):
            if p.exists():
                os.replace(p, p.with_name(f"{p.name}.replaced-{stamp}"))
        print(f"--restart: moved {path.name} aside to {path.name}.replaced-{stamp} ({'; '.join(why)})",
              file=sys.stderr)
    _write_json(mpath, manifest)
    return read_done(path)


# ----------------------------------------------------------------------------------------------- the decode loop
def record(e: Example, tr, seconds: float, batch_tokens: int) -> dict:
    """One problem's line in a run file: the answer, whether it is right, and what it cost (its batch's time and
    tokens: the rows of one batch share them)."""
    return {"index": e.index, "ids": tr.token_ids, "text": tr.text, "correct": is_correct(tr.text, e.answer),
            "deferral": tr.deferral_rate, "expert_calls": tr.expert_calls, "expert_fed": tr.expert_fed,
            "stop_reason": tr.stop_reason, "batch_seconds": seconds, "batch_tokens": batch_tokens}


def run_policy(dec, examples: list[Example], policy: Policy, path: Path, batch_size: int = 16,
               max_new_tokens: int = 256, progress: bool = True, window: int | None = None,
               tag: dict | None = None, data: dict | None = None, restart: bool = False, key: dict | None = None,
               data_file: str | None = None) -> dict[int, dict]:
    """Decode every example not yet in ``path`` under ``policy`` with ``CoLLM.generate_batch`` (rows keyed by the
    example index, so random draws do not depend on the batching); one JSON line per problem (plus ``tag``'s fields).
    Returns the records of ``examples`` only (the file may hold more, e.g. from a larger earlier run).

    ``data``: ``data_fingerprint`` of the data file (default: of ``examples``); ``restart``/``key``: see ``open_run``
    and ``run_manifest``.  Problems are sorted by prompt length, all at once or (``window``) within windows of that
    many batches."""
    path = Path(path)
    manifest = run_manifest(dec, policy, max_new_tokens, data or data_fingerprint(examples), key, data_file)
    done = open_run(path, manifest, restart)
    todo = [e for e in examples if e.index not in done]
    prompts = {e.index: messages(e.question) for e in todo}
    lengths = {e.index: len(dec.encode(prompts[e.index])) for e in todo}
    todo = sort_in_windows(todo, lambda e: lengths[e.index], batch_size * window if window else len(todo))
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=path.stem, file=sys.stderr)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        t0 = time.perf_counter()
        traces = dec.generate_batch([prompts[e.index] for e in chunk], policy, max_new_tokens,
                                    keys=[e.index for e in chunk])
        dt = time.perf_counter() - t0
        recs = [{**record(e, tr, dt, sum(len(t.steps) for t in traces)), **(tag or {})}
                for e, tr in zip(chunk, traces)]
        append_records(path, recs)
        done.update((r["index"], r) for r in recs)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return {e.index: done[e.index] for e in examples}


def run_backtracking(dec, examples: list[Example], policy: Policy, plain: dict[int, dict], path: Path, backtrack,
                     max_new_tokens: int = 256, data: dict | None = None, restart: bool = False,
                     data_file: str | None = None) -> dict[int, dict]:
    """``policy`` with course correction (``colm.backtrack``) on every example, as a run file like ``run_policy``'s.

    A rollback needs a completed line the detectors find wrong, and until one fires a backtracking decode *is* the
    plain decode; so an example whose ``plain`` answer (the same policy's run) has no such line keeps that record
    (``"backtrack": "none fired"``), and only the others are decoded again, one at a time (a crop is per row).
    Records add ``rollbacks`` and the expert's work on dropped text (``expert_written_dropped``)."""
    from .backtrack import backtrack_stream, detect_done
    path = Path(path)
    key = {**policy_key(policy), "backtrack": backtrack.describe()}
    done = open_run(path, run_manifest(dec, policy, max_new_tokens, data or data_fingerprint(examples), key,
                                       data_file), restart)
    for e in (e for e in examples if e.index not in done):
        rec = plain[e.index]
        if detect_done(backtrack, rec["text"]) is None:
            recs = [{**rec, "rollbacks": [], "backtrack": "none fired"}]
        else:
            t0 = time.perf_counter()
            *_, tr = backtrack_stream(dec, messages(e.question), policy, max_new_tokens, backtrack)
            tr.release()
            recs = [{**record(e, tr, time.perf_counter() - t0, len(tr.steps)), "rollbacks": tr.rollbacks,
                     "backtrack": "decoded", "expert_written_dropped": sum(r["expert_written"] for r in tr.rollbacks)}]
        append_records(path, recs)
        done[e.index] = recs[0]
    return {e.index: done[e.index] for e in examples}


# ----------------------------------------------------------------------------------------------- summaries
def summarize(records: dict[int, dict], pure: str | None = None) -> dict:
    """Accuracy and mean per-example deferral frequency (the paper's definition) over ``records``."""
    recs = list(records.values())
    n = len(recs)
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "deferral": float("nan")}
    deferral = 1.0 if pure == "expert" else 0.0 if pure == "base" else sum(r["deferral"] for r in recs) / n
    k = sum(bool(r["correct"]) for r in recs)
    out = {"n": n, "accuracy": k / n, "accuracy_ci": wilson(k, n), "deferral": deferral,
           "mean_tokens": sum(len(r["ids"]) for r in recs) / n,
           # answers cut by the budget: their accuracy says more about max_new_tokens than about the policy
           "capped": sum(r.get("stop_reason") == "length" for r in recs),
           "capped_known": all("stop_reason" in r for r in recs)}
    if pure is None:
        out["expert_calls"] = sum(r["expert_calls"] for r in recs)
        batches = {(r["batch_seconds"], r["batch_tokens"]) for r in recs}
        secs = sum(b[0] for b in batches)
        out["tokens_per_second"] = sum(b[1] for b in batches) / secs if secs else float("nan")
    return out


def backtracked(dec, examples, threshold: float, plain: dict[int, dict], runs: Path, backtrack, max_new_tokens: int,
                data, restart: bool, data_file) -> dict:
    """The chosen point with course correction: accuracy, how often it fired, fixed and broke, its paired difference
    to the plain point, and the expert's work both ways (tokens written, dropped ones included; tokens processed)."""
    recs = run_backtracking(dec, examples, Policy("colm", threshold=threshold), plain,
                            runs / f"colm-backtrack-{threshold:.6f}.jsonl", backtrack, max_new_tokens, data=data,
                            restart=restart, data_file=data_file)
    fired = [i for i, r in recs.items() if r["rollbacks"]]
    written = lambda r: round(r["deferral"] * len(r["ids"]))
    return {"threshold": threshold, "settings": backtrack.describe(), **summarize(recs), "fired": len(fired),
            "rollbacks": sum(len(recs[i]["rollbacks"]) for i in fired),
            "fixed": sum(recs[i]["correct"] and not plain[i]["correct"] for i in fired),
            "broke": sum(plain[i]["correct"] and not recs[i]["correct"] for i in fired),
            "expert_written": [sum(written(r) for r in plain.values()),
                               sum(written(r) + r.get("expert_written_dropped", 0) for r in recs.values())],
            "expert_fed": [sum(r.get("expert_fed", 0) for r in plain.values()),
                           sum(r.get("expert_fed", 0) for r in recs.values())],
            "paired_vs_colm": paired_comparison({i: bool(r["correct"]) for i, r in recs.items()},
                                                {i: bool(r["correct"]) for i, r in plain.items()})}
