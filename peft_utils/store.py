"""The run store: one JSON-lines file per run, appended to as training happens, and the one owner of run files.

Why JSON lines and not one JSON at the end: a crash (or a Ctrl-C in the notebook) must lose at most the step in
flight, and a comparison must be able to tell finished runs from interrupted ones. Each line is one event; a run is
*complete* once its ``summary`` event is written.

Events, in the order a run writes them (fields beyond these are allowed and kept):

- ``config``  : run_id, group ("comparison" | "sweep" | "tune"), method, model, rank, alpha, seed, lr, every data and
  training setting, the resolved device and the hardware behind it (GPU name, or CPU model and threads), compute
  dtype and mixed precision, num_processes, per_device_batch_size
  and global_batch_size, parameter counts, on a GPU the memory plan (``memory_*``); a tuning run's ``eval_split``
  ("train-holdout"), a tuned run's ``lr_source`` ("tune")
- ``step``    : step, epoch, loss, lr, elapsed_s
- ``eval``    : step, epoch, accuracy, loss, n, eval_time_s
- ``summary`` : train_time_s, eval_time_s, samples_per_s, tokens_per_s, peak_memory_bytes, memory_kind,
  final_accuracy, final_eval_loss, n_eval, steps, dev_predictions, dev_probabilities, and (except tuning runs) the
  saved result's folder and size report (``saved_to``, ``size``)

:class:`RunStore` decides which runs belong together. Runs in one *series* (the same method in the comparison, the
same rank and alpha in the sweep, the same method and rate in learning-rate tuning) are drawn as repeats of one experiment, so they may differ in their seed and
nothing else: a planned run whose settings differ from a finished run of its series is refused, naming the keys,
and a folder that holds such a mix anyway (copied together by hand) is refused when loaded, never averaged.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .config import TrainConfig

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


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from a record (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(_jsonable(value)))


@dataclass
class Results:
    """Everything the plots need, as tidy tables keyed by ``run_id``.

    ``runs``: one row per complete run (config fields, flattened ``size.*`` fields, summary fields);
    ``steps`` and ``evals``: one row per logged step / evaluation, with ``run_id``, ``method`` and ``group``.
    """

    runs: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame


# The settings a run is identified by, beside its group and method, in the order its record lists them: every
# training setting except the device and the precision, which are identified as what they resolve to (the compute
# dtype: "auto" is bf16 on one GPU and float32 on a CPU), and ``rslora`` for sweep runs only. The seed is what
# repeats of one series may differ in.
IDENTITY_KEYS = (
    ("model", "rank", "alpha", "dropout", "targets", "train_size", "eval_size", "lr", "seed")
    + tuple(f.name for f in fields(TrainConfig) if f.name not in ("device", "precision"))
    + ("compute_dtype", "rslora")
)
REPEAT_KEY = "seed"
# Run groups as the records name them.
COMPARISON_GROUP = "comparison"
SWEEP_GROUP = "sweep"
TUNE_GROUP = "tune"


def series_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """Which series a run belongs to: its method in the comparison; its method, rank and alpha in the sweep; its
    method and learning rate in tuning."""
    if record.get("group") == SWEEP_GROUP:
        return (SWEEP_GROUP, record.get("method"), record.get("rank"), record.get("alpha"))
    if record.get("group") == TUNE_GROUP:
        return (TUNE_GROUP, record.get("method"), record.get("lr"))
    return (record.get("group"), record.get("method"))


def _describe(key: tuple[Any, ...]) -> str:
    if key[0] == SWEEP_GROUP:
        return f"sweep run ({key[1]}, rank {key[2]}, alpha {key[3]})"
    if key[0] == TUNE_GROUP:
        return f"tuning run ({key[1]}, lr {key[2]})"
    return f"{key[1]!r} run"


class RunStore:
    """The run records of one results folder: paths, completion, compatibility and loading.

    ``check(run_id, planned)`` is called before a run trains: it says whether an identical run is already complete
    (skip it) and refuses a planned run whose settings differ from a complete run of its series.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def check_writable(self) -> None:
        """Refuse, before anything is built, a folder that is a file or cannot be written (nor created): found
        otherwise only when the first run opens its record, after its model is built."""
        existing = next(p for p in (self.folder, *self.folder.absolute().parents) if p.exists())
        if not existing.is_dir():
            problem = ("is a file, not a folder" if existing == self.folder
                       else f"cannot be created: {existing} is a file")
            raise ValueError(f"results folder {self.folder} {problem}; choose another results_dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == self.folder else f" (to create {self.folder} in)"
            raise ValueError(f"cannot write to results folder {existing}{where}: permission denied or a "
                             "read-only file system; choose another results_dir")

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.jsonl"

    def saved_dir(self, run_id: str) -> Path:
        """Where a run keeps what it trained (its peft adapter, or the full checkpoint), beside its record."""
        return self.folder / run_id

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return read_events(self.path(run_id))

    def is_complete(self, run_id: str) -> bool:
        """True when ``run_id`` has a finished record (a ``summary`` event)."""
        path = self.path(run_id)
        return path.exists() and any(e.get("event") == "summary" for e in read_events(path))

    def recorder(self, run_id: str) -> RunRecorder:
        """A recorder for ``run_id``; an incomplete earlier file is replaced (it would mix two runs' steps)."""
        return RunRecorder(self.folder, run_id)

    @functools.cached_property
    def _complete_configs(self) -> list[dict[str, Any]]:
        """The config events of the runs finished when this store was first asked: read once per plan, not once per
        planned run (a plan checks every run against every finished one)."""
        if not self.folder.is_dir():
            return []
        configs = []
        for path in sorted(self.folder.glob("*.jsonl")):
            events = read_events(path)
            config = next((e for e in events if e.get("event") == "config"), None)
            if config is not None and any(e.get("event") == "summary" for e in events):
                configs.append(config)
        return configs

    def check(self, run_id: str, planned: dict[str, Any]) -> bool:
        """``True`` if an identical run is complete; ``False`` if it must train; a ValueError if it conflicts.

        ``planned``: every setting that changes the run's result, as its ``config`` event will record it; a
        ``None`` learning rate is not known yet (it waits for tuning) and is not compared.
        """
        planned = jsonable(planned)
        key = series_key(planned)
        unknown = {REPEAT_KEY} | ({"lr"} if planned.get("lr") is None else set())
        for config in self._complete_configs:
            if series_key(config) != key:
                continue
            differ = [k for k in planned if k not in unknown and config.get(k) != planned[k]]
            if differ:
                details = ", ".join(f"{k} {config.get(k)!r} -> {planned[k]!r}" for k in sorted(differ))
                raise ValueError(
                    f"{self.folder} already holds a finished {_describe(key)} with other settings ({details}): "
                    f"{config.get('run_id')}; use another results_dir, or delete that run's file to replace it"
                )
            if config.get("run_id") == run_id:
                return True
        return False

    def load(self, include_incomplete: bool = False) -> Results:
        """Every run of the folder as tables (complete runs only, unless asked); mixed series are refused."""
        if not self.folder.is_dir():
            raise FileNotFoundError(f"results folder {self.folder} does not exist; run the comparison first")
        runs, steps, evals = [], [], []
        for path in sorted(self.folder.glob("*.jsonl")):
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
        self._refuse_mixed_series(runs)
        runs_frame = pd.json_normalize(runs) if runs else pd.DataFrame()
        return Results(runs=runs_frame, steps=pd.DataFrame(steps), evals=pd.DataFrame(evals))

    def _refuse_mixed_series(self, runs: list[dict[str, Any]]) -> None:
        """Repeats of one series must differ only in the seed, else a figure would average different experiments."""
        first_of: dict[tuple[Any, ...], dict[str, Any]] = {}
        for run in runs:
            first = first_of.setdefault(series_key(run), run)
            differ = sorted(k for k in IDENTITY_KEYS if k != REPEAT_KEY and first.get(k) != run.get(k))
            if differ:
                details = ", ".join(f"{k} {first.get(k)!r} vs {run.get(k)!r}" for k in differ)
                raise ValueError(
                    f"{self.folder} mixes two different {_describe(series_key(run))}s ({first['run_id']} and "
                    f"{run['run_id']}: {details}); keep each experiment in its own results folder"
                )

    def summary(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """One row per complete run (every recorded field, the main ones first), in ``run_ids`` order if given."""
        runs = self.load().runs
        if runs.empty:
            return runs
        if run_ids is not None:
            runs = runs.set_index("run_id").loc[list(run_ids)].reset_index()
        first = [c for c in SUMMARY_COLUMNS if c in runs.columns]
        return runs[first + [c for c in runs.columns if c not in first]].reset_index(drop=True)


# The settings a run is identified by (beside group and method): what its planned record holds.
IDENTITY_KEYS = (
    "model", "rank", "alpha", "rslora", "dropout", "targets", "train_size", "eval_size", "lr", "seed", "epochs",
    "batch_size",
    "weight_decay", "warmup_ratio", "max_grad_norm", "grad_accum_steps", "max_length", "eval_every",
    "gradient_checkpointing", "log_every", "bucket_by_length", "eval_batch_size",
)
SUMMARY_COLUMNS = ("run_id", "group", "method", "rank", "alpha", "seed", "final_accuracy", "final_eval_loss",
                   "train_time_s", "samples_per_s", "peak_memory_bytes", "memory_kind", "trainable_params",
                   "total_params", "size.disk_bytes")
