"""Resumable greedy rollouts of one model over GSM8K prompts (the on-policy data for disagreement labels).

Generation is the expensive part of training, so a rollout is a run file (``colm.runs``): one JSON line per answer,
appended as it goes, skipped on a rerun, with a manifest that a rerun must match.  A rollout is the Co-LLM loop
under the pure ``base`` or ``expert`` policy, so it runs on whatever engine the pair has and stops where every
other decode stops (``CoLLM.eos_ids``).
"""
from __future__ import annotations

from pathlib import Path

from .data import Example
from .models import ColmError
from .policy import Policy
from .runs import append_records, read_done, run_policy, sort_in_windows  # noqa: F401  (re-exported)


def rollout(dec, role: str, examples: list[Example], out: str | Path, batch_size: int = 16,
            max_new_tokens: int = 256, progress: bool = True, window: int = 8, data: dict | None = None,
            restart: bool = False, data_file: str | None = None) -> dict[int, dict]:
    """Greedy answers of the ``role`` ("base" or "expert") model of ``dec`` (a ``CoLLM``) to every example not yet
    in ``out``: records {index, ids, text, correct, model, ...}; ``model`` tells training which model's argmax
    the answer already is.  Returns the records of ``examples`` only.

    ``window`` batches at a time are sorted by prompt length; work goes in the examples' order window by window.
    ``data``, ``restart``, ``data_file``: see ``colm.runs.run_policy``."""
    if role not in ("base", "expert"):
        raise ColmError(f"rollout role must be 'base' or 'expert', got {role!r}")
    return run_policy(dec, examples, Policy(role), Path(out), batch_size, max_new_tokens, progress, window,
                      tag={"model": role}, data=data, restart=restart, data_file=data_file)
