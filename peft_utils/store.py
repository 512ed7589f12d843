"""The run store: one JSON-lines file per run, flushed per event so that a crash loses at most the step in flight;
a run is *complete* once its ``summary`` event is written. Events, in order (more fields are kept):

- ``config``: run_id, group ("comparison" | "sweep" | "tune"), method, model, rank, alpha, seed, lr, every data and
  training setting, the resolved device, hardware and dtypes, batch sizes, parameter counts, on a GPU the memory
  plan (``memory_*``); a tuning run's ``eval_split``, a tuned run's ``lr_source``
- ``step``: step, epoch, loss, lr, elapsed_s
- ``eval``: step, epoch, accuracy, loss, n, eval_time_s; at an epoch's end also train_loss (the epoch's mean)
- ``summary``: times, throughput, peak memory, final_accuracy, final_eval_loss, n_eval, steps, dev_predictions,
  dev_probabilities, and (except tuning runs) ``saved_to`` and the ``size`` report

Runs of one *series* differ only in their seed; other *settings* (:func:`setting_id`) are kept apart when loaded.
Processes may share a folder: each trains the runs it claims.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from .config import TrainConfig
from .methods import series_name

EVENTS = ("config", "step", "eval", "summary")


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from a record: numpy/torch scalars as numbers, paths as text, tuples as lists, and
    NaN/inf as null so every line stays valid JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder(contextlib.AbstractContextManager):
    """Appends events of one run to ``<results_dir>/<run_id>.jsonl``, flushed and fsynced per line."""

    def __init__(self, results_dir: str | Path, run_id: str) -> None:
        self.path = Path(results_dir) / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # an incomplete earlier run starts over

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps(jsonable({"event": event, **fields})) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All events of one run file; a torn last line (killed mid-write) is ignored, any other bad line is an error."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
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


@dataclass
class Results:
    """``runs``: one row per complete run (config, flattened ``size.*`` and summary fields, ``series``, ``setting``);
    ``steps`` and ``evals``: one row per event, with its run's ``run_id``, ``method``, ``series`` and ``group``."""

    runs: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame


# What identifies a run beside its group and method: the data by a fingerprint of its rows (not where they were
# read from), every training setting, the device and precision as what they resolve to (the compute dtype), and
# ``rslora`` (sweep runs only). The seed is what repeats of one series may differ in: the setting leaves it out.
IDENTITY_KEYS = (
    ("model", "rank", "alpha", "dropout", "targets", "modules_to_save", "train_size", "eval_size", "data_fingerprint",
     "lr", "seed")
    + tuple(f.name for f in fields(TrainConfig) if f.name not in ("device", "precision", "compile", "workers"))
    + ("compute_dtype", "rslora")
)
SETTING_KEYS = tuple(key for key in IDENTITY_KEYS if key != "seed")
# Run groups as the records name them.
COMPARISON_GROUP = "comparison"
SWEEP_GROUP = "sweep"
TUNE_GROUP = "tune"


def series_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """A run's series: its method and target set, with its rank and alpha in the sweep, its rate in tuning."""
    series = series_name(record.get("method"), record.get("targets"))
    if record.get("group") == SWEEP_GROUP:
        return (SWEEP_GROUP, series, record.get("rank"), record.get("alpha"))
    if record.get("group") == TUNE_GROUP:
        return (TUNE_GROUP, series, record.get("lr"))
    return (record.get("group"), series)


def _digest(record: dict[str, Any], keys: Sequence[str]) -> str:
    """SHA-1 of the run's group, method and ``keys`` values as one canonical text: numbers as floats (alpha 16 and
    16.0 are one setting), a key the record lacks as null."""
    values = jsonable([record.get("group"), record.get("method"), *(record.get(key) for key in keys)])
    text = json.dumps([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values])
    return hashlib.sha1(text.encode()).hexdigest()


def identity(record: dict[str, Any]) -> str:
    """What a run is: a planned run is found by it under any file name, trains only if no complete run has it, and
    names the claim of the process training it."""
    return _digest(record, IDENTITY_KEYS)


def setting_id(record: dict[str, Any]) -> str:
    """8 hex digits of the run's identity without its seed: what the seeds of one series share, and what a run's file
    name ends with when another setting holds its readable name."""
    return _digest(record, SETTING_KEYS)[:8]


def _differences(one: dict[str, Any], other: dict[str, Any]) -> str:
    """The identity keys, the seed aside, in which two runs differ: ``"alpha 8.0 vs 16.0, rank 4 vs 8"``."""
    keys = [k for k in SETTING_KEYS if _digest(one, [k]) != _digest(other, [k])]
    return ", ".join(f"{k} {one.get(k)!r} vs {other.get(k)!r}" for k in keys)


# Sharing a folder: its lock, held while a process picks its next run, and while a run trains a lock in the claims
# folder named ``<run id>.<identity>.lock``. OS locks die with their process: no claim outlives it.
FOLDER_LOCK = ".lock"
CLAIMS = ".claims"
GLANCE_S = 0.5


class RunInProgress(Exception):
    """Another process holds the claim of the run (the file's run id) and is training it now."""


@dataclass
class Claim(contextlib.AbstractContextManager):
    """This process's right to train the run in file ``run_id`` until :meth:`release`."""

    lock: FileLock
    run_id: str

    def release(self) -> None:
        self.lock.release()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunStore:
    """The run records of one results folder: paths, completion, where each planned run is, claims and loading."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def check_writable(self) -> None:
        """Refuse a folder that is a file or cannot be written (nor created) before any model is built."""
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
        """Where a run keeps what it trained (its peft adapter, or the full checkpoint)."""
        return self.folder / run_id

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return read_events(self.path(run_id))

    def is_complete(self, run_id: str) -> bool:
        path = self.path(run_id)
        return path.exists() and any(e.get("event") == "summary" for e in read_events(path))

    def recorder(self, run_id: str) -> RunRecorder:
        """A recorder for ``run_id``, to open only while holding its :meth:`claim` (it replaces an incomplete file)."""
        return RunRecorder(self.folder, run_id)

    def mark_asked(self, run_id: str) -> None:
        """Date a complete run's record now that a plan asked for it again: the default view (:meth:`load`) shows
        each series' setting asked for last, as training it would have."""
        with contextlib.suppress(OSError):  # a read-only copy: its view follows when its runs finished
            os.utime(self.path(run_id))

    def _complete_runs(self) -> dict[str, list[dict[str, Any]]]:
        """The events of every complete run (a ``config`` and a ``summary`` event), by run id."""
        runs = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            events = read_events(path)
            if {"config", "summary"} <= {e.get("event") for e in events}:
                runs[path.stem] = events
        return runs

    def _read_index(self) -> tuple[dict[str, str], dict[str, str]]:
        """(identity of each complete run -> run id; run id -> identity of the run complete or being trained in that
        file). Claims are read first, so a run that finishes in between is seen as one or the other."""
        claimed = self._held_claims()
        finished = {run_id: identity(_config(events)) for run_id, events in self._complete_runs().items()}
        found = {known: run_id for run_id, known in reversed(finished.items())}  # the first file of each identity
        return found, {**finished, **claimed}

    def find(self, planned: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, bool]]:
        """For each planned run (its readable id, its settings as its ``config`` event will record them): (its file's
        run id, whether a run with its :func:`identity` is complete). Not found, a run takes its readable id unless
        another setting's run holds that file, else the id and its :func:`setting_id`: a changed setting trains beside
        the old runs, never over them. A learning rate still to tune (``None``) gives (the readable id, ``False``)."""
        index = self._read_index()
        return [(name, False) if record.get("lr") is None else _place(name, record, *index) for name, record in planned]

    def _claim_lock(self, run_id: str, planned: dict[str, Any]) -> FileLock:
        return FileLock(self.folder / CLAIMS / f"{run_id}.{identity(planned)}.lock")

    def _held_claims(self) -> dict[str, str]:
        """Run id -> identity of the runs being trained now (a claim left by a killed process is free)."""
        held = {}
        for path in sorted((self.folder / CLAIMS).glob("*.lock")):
            lock = FileLock(path)
            if _acquired(lock):
                lock.release()
            else:
                run_id, _, known = path.stem.rpartition(".")
                held[run_id] = known
        return held

    def claim(self, name: str, planned: dict[str, Any], wait: bool = False) -> Claim | None:
        """The right to train the planned run of readable id ``name`` (file :attr:`Claim.run_id`), or ``None`` when a
        run with its identity is complete. Decided under the folder's lock on the folder as it is then; a run another
        process is training raises :class:`RunInProgress`, or with ``wait`` is waited for (and claimed if that
        process died before finishing)."""
        (self.folder / CLAIMS).mkdir(parents=True, exist_ok=True)
        while True:
            with FileLock(self.folder / FOLDER_LOCK):
                run_id, complete = _place(name, planned, *self._read_index())
                if complete:
                    return None
                lock = self._claim_lock(run_id, planned)
                if _acquired(lock):
                    if not self.is_complete(run_id):  # else finished by the process training it when read
                        return Claim(lock, run_id)
                    lock.release()
                    return None
            if not wait:
                raise RunInProgress(run_id)
            with lock:  # blocks until the other process releases (or dies)
                pass

    def load(self, run_ids: Sequence[str] | None = None, every_setting: bool = False) -> Results:
        """The folder's complete runs, one setting per series (else a rank-4 run would be averaged with rank-8 seeds):
        the runs ``run_ids`` (two settings of one series refused), or each series' setting asked for last (newest
        record, see :meth:`mark_asked`). ``every_setting`` keeps every setting (the ``setting`` column)."""
        if not self.folder.is_dir():
            raise FileNotFoundError(f"results folder {self.folder} does not exist; run the comparison first")
        complete = self._complete_runs()
        configs = {run_id: _config(events) for run_id, events in complete.items()}
        if run_ids is not None:
            missing = [run_id for run_id in run_ids if run_id not in configs]
            if missing:
                raise ValueError(f"no complete run {', '.join(missing)} in {self.folder}")
            configs = {run_id: configs[run_id] for run_id in run_ids}
            if not every_setting:
                self._refuse_mixed_settings(configs)
        elif not every_setting:
            configs = self._asked_last(configs)
        return _results({run_id: complete[run_id] for run_id in configs})

    def _asked_last(self, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The runs of each series' setting whose newest record is the newest of the series."""
        latest = {}
        for run_id in sorted(configs, key=lambda run_id: (self.path(run_id).stat().st_mtime_ns, run_id)):
            latest[series_key(configs[run_id])] = setting_id(configs[run_id])  # the newest last
        return {run_id: c for run_id, c in configs.items() if setting_id(c) == latest[series_key(c)]}

    def _refuse_mixed_settings(self, configs: dict[str, dict[str, Any]]) -> None:
        """Runs asked for together must be one setting per series."""
        first_of: dict[tuple[Any, ...], str] = {}
        for run_id, config in configs.items():
            first = first_of.setdefault(series_key(config), run_id)
            if setting_id(configs[first]) != setting_id(config):
                raise ValueError(f"{first} and {run_id} are two settings of one {series_key(config)[1]!r} run "
                                 f"({_differences(configs[first], config)}), not two seeds: select one setting")

    def summary(self, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per complete run, the main fields first, in ``run_ids`` order or the default view's."""
        runs = self.load(run_ids).runs
        first = [c for c in SUMMARY_COLUMNS if c in runs.columns]
        return runs[first + [c for c in runs.columns if c not in first]]


def _acquired(lock: FileLock) -> bool:
    """Whether ``lock`` was free and is now held; ``False`` when a process (this one included) holds it. It waits
    :data:`GLANCE_S`: another process looking at the claims holds a free lock for an instant, a training run for
    the whole run."""
    try:
        lock.acquire(timeout=GLANCE_S)
    except Timeout:
        return False
    return True


def _config(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e.get("event") == "config")


def _place(name: str, planned: dict[str, Any], found: dict[str, str], held: dict[str, str]) -> tuple[str, bool]:
    """Where the planned run of readable id ``name`` is (:meth:`RunStore.find`) in the folder's index."""
    known = identity(planned)
    if known in found:
        return found[known], True
    if held.get(name, known) == known:
        return name, False
    return f"{name}-{setting_id(planned)}", False


def _results(runs: dict[str, list[dict[str, Any]]]) -> Results:
    rows, steps, evals = [], [], []
    for run_id, events in runs.items():
        by_kind = {kind: [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == kind]
                   for kind in EVENTS}
        config = by_kind["config"][0]
        keys = {"run_id": run_id, "method": config.get("method"),
                "series": series_name(config.get("method"), config.get("targets")), "group": config.get("group")}
        rows.append({**config, "run_id": run_id, "series": keys["series"], "setting": setting_id(config),
                     **by_kind["summary"][0]})
        steps += [{**keys, **e} for e in by_kind["step"]]
        evals += [{**keys, **e} for e in by_kind["eval"]]
    return Results(runs=pd.json_normalize(rows), steps=pd.DataFrame(steps), evals=pd.DataFrame(evals))


SUMMARY_COLUMNS = ("run_id", "group", "method", "rank", "alpha", "seed", "final_accuracy", "final_eval_loss",
                   "train_time_s", "samples_per_s", "peak_memory_bytes", "memory_kind", "trainable_params",
                   "total_params", "size.disk_bytes")
