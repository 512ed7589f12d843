"""Run records on disk: one JSON-lines file per run, appended to as training happens.

Why JSON lines and not one JSON at the end: a crash (or a Ctrl-C in the notebook) must lose at most the
step in flight, and `run_comparison` must be able to tell finished runs from interrupted ones. Each line is
one event; a run is *complete* once its ``summary`` event is written.

Events, in the order a run writes them (fields beyond these are allowed and kept):

- ``config``  : run_id, group ("comparison" | "sweep" | ...), method, model, rank, alpha, seed, ... (the run's
  configuration, parameter counts and the model-size report under ``size``)
- ``step``    : step, epoch, loss, lr, elapsed_s
- ``eval``    : step, epoch, accuracy, loss, n, eval_time_s
- ``summary`` : train_time_s, eval_time_s, samples_per_s, tokens_per_s, peak_memory_bytes, memory_kind,
  final_accuracy, final_eval_loss, n_eval, steps
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

EVENTS = ("config", "step", "eval", "summary")


def _jsonable(value: Any) -> Any:
    """Make numpy/torch scalars and paths JSON-safe; NaN/inf become null so every line stays valid JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """Appends events of one run to ``<results_dir>/<run_id>.jsonl``, flushed and fsynced per line."""

    def __init__(self, results_dir: str | Path, run_id: str) -> None:
        self.path = Path(results_dir) / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A re-run of an incomplete run starts over: its partial file would mix two runs' steps.
        self._file = open(self.path, "w", encoding="utf-8")

    def log(self, event: str, **fields: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
        self._file.write(json.dumps(_jsonable({"event": event, **fields})) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All events of one run file; a torn last line (killed mid-write) is ignored, any other bad line is an error."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
    return events


def is_complete(results_dir: str | Path, run_id: str) -> bool:
    """True when ``run_id`` has a finished record (a ``summary`` event) in ``results_dir``."""
    path = Path(results_dir) / f"{run_id}.jsonl"
    return path.exists() and any(e.get("event") == "summary" for e in read_events(path))


@dataclass
class Results:
    """Everything the plots need, as tidy tables keyed by ``run_id``.

    ``runs``: one row per complete run (config fields, flattened ``size.*`` fields, summary fields);
    ``steps`` and ``evals``: one row per logged step / evaluation, with ``run_id``, ``method`` and ``group``.
    """

    runs: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame


def load_results(results_dir: str | Path, include_incomplete: bool = False) -> Results:
    """Read every ``*.jsonl`` run in ``results_dir`` into tables (complete runs only, unless asked)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist; run the comparison first")
    runs, steps, evals = [], [], []
    for path in sorted(results_dir.glob("*.jsonl")):
        events = read_events(path)
        config = next((e for e in events if e["event"] == "config"), None)
        summary = next((e for e in events if e["event"] == "summary"), None)
        if config is None or (summary is None and not include_incomplete):
            continue
        keys = {"run_id": config["run_id"], "method": config.get("method"), "group": config.get("group")}
        row = {k: v for k, v in config.items() if k != "event"}
        row.update({k: v for k, v in (summary or {}).items() if k != "event"})
        runs.append(row)
        steps += [{**keys, **{k: v for k, v in e.items() if k != "event"}} for e in events if e["event"] == "step"]
        evals += [{**keys, **{k: v for k, v in e.items() if k != "event"}} for e in events if e["event"] == "eval"]
    runs_frame = pd.json_normalize(runs) if runs else pd.DataFrame()
    return Results(runs=runs_frame, steps=pd.DataFrame(steps), evals=pd.DataFrame(evals))
