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
- ``eval``    : step, epoch, accuracy, loss, n, eval_time_s; at an epoch's end also train_loss (the epoch's mean)
- ``summary`` : train_time_s, eval_time_s, samples_per_s, tokens_per_s, peak_memory_bytes, memory_kind,
  final_accuracy, final_eval_loss, n_eval, steps, dev_predictions, dev_probabilities, and (except tuning runs) the
  saved result's folder and size report (``saved_to``, ``size``)

:class:`RunStore` decides which runs belong together. Runs in one *series* (the same method in the comparison, the
same rank and alpha in the sweep, the same method and rate in learning-rate tuning) are drawn as repeats of one experiment, so they may differ in their seed and
nothing else: a planned run whose settings differ from a finished run of its series is refused, naming the keys,
and a folder that holds such a mix anyway (copied together by hand) is refused when loaded, never averaged.

Processes may share a folder (a notebook and a terminal, or one process per GPU on the same experiment): each run is
trained by the process that claims it (:meth:`RunStore.claim`), the others skip it, or wait for it when they need
its result, and settings that differ from a run being trained are refused before anything trains.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from .config import TrainConfig
from .methods import series_name

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

    ``runs``: one row per complete run (config fields, flattened ``size.*`` fields, summary fields, and its
    ``series``: :func:`~peft_utils.methods.series_name` of its method and targets, what tables and figures key runs
    by); ``steps`` and ``evals``: one row per logged step / evaluation, with its run's ``run_id``, ``method``,
    ``series`` and ``group``.
    """

    runs: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame


# The settings a run is identified by, beside its group and method, in the order its record lists them: the data
# as a fingerprint of the rows it used (where they were read from is recorded as ``data_source``, not compared: the
# same files in another folder are the same data); every training setting except the device and the precision,
# which are identified as what they resolve to (the compute dtype: "auto" is bf16 on one GPU and float32 on a CPU);
# and ``rslora`` for sweep runs only. The seed is what repeats of one series may differ in.
IDENTITY_KEYS = (
    ("model", "rank", "alpha", "dropout", "targets", "modules_to_save", "train_size", "eval_size", "data_fingerprint",
     "lr", "seed")
    + tuple(f.name for f in fields(TrainConfig) if f.name not in ("device", "precision"))
    + ("compute_dtype", "rslora")
)
REPEAT_KEY = "seed"
# Run groups as the records name them.
COMPARISON_GROUP = "comparison"
SWEEP_GROUP = "sweep"
TUNE_GROUP = "tune"


def series_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """Which series a run belongs to: its method and target set (:func:`~peft_utils.methods.series_name`) in the
    comparison; with its rank and alpha in the sweep; with its learning rate in tuning."""
    series = series_name(record.get("method"), record.get("targets"))
    if record.get("group") == SWEEP_GROUP:
        return (SWEEP_GROUP, series, record.get("rank"), record.get("alpha"))
    if record.get("group") == TUNE_GROUP:
        return (TUNE_GROUP, series, record.get("lr"))
    return (record.get("group"), series)


def _describe(key: tuple[Any, ...]) -> str:
    if key[0] == SWEEP_GROUP:
        return f"sweep run ({key[1]}, rank {key[2]}, alpha {key[3]})"
    if key[0] == TUNE_GROUP:
        return f"tuning run ({key[1]}, lr {key[2]})"
    return f"{key[1]!r} run"


# Sharing a results folder (see :meth:`RunStore.claim`): the folder's lock, held while a process picks its next run,
# and a claims folder with one lock per run, held while it trains, beside the run's planned settings. Both are OS
# locks (``flock``, through ``filelock``): they die with their process, so a killed run is never left claimed.
FOLDER_LOCK = ".lock"
CLAIMS = ".claims"


class SettingsConflict(ValueError):
    """A planned run differs in more than its seed from a run of its series in the folder (finished or training)."""


class RunInProgress(Exception):
    """The run is being trained by another process now (it holds the run's claim)."""


class Claim:
    """This process's right to train one run, from before its record is opened until :meth:`release`."""

    def __init__(self, lock: FileLock, settings: Path) -> None:
        self.lock, self.settings = lock, settings

    def release(self) -> None:
        self.settings.unlink(missing_ok=True)
        self.lock.release()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over: a reader sees all of it or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


class RunStore:
    """The run records of one results folder: paths, completion, compatibility and loading.

    ``check(run_id, planned)`` is called when a run is planned: it says whether an identical run is already complete
    (skip it) and refuses a planned run whose settings differ from a complete run of its series, or from one another
    process is training. ``claim(run_id, planned)`` is taken before a run trains, so that processes sharing the folder
    train each run once.
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
        """A recorder for ``run_id``, to open only while holding its :meth:`claim`: an incomplete earlier file is
        replaced (it would mix two runs' steps), which no other process may be writing then."""
        return RunRecorder(self.folder, run_id)

    def _finished_configs(self) -> list[dict[str, Any]]:
        """The config events of the folder's complete runs, as they are now."""
        if not self.folder.is_dir():
            return []
        configs = []
        for path in sorted(self.folder.glob("*.jsonl")):
            events = read_events(path)
            config = next((e for e in events if e.get("event") == "config"), None)
            if config is not None and any(e.get("event") == "summary" for e in events):
                configs.append(config)
        return configs

    @functools.cached_property
    def _planned_against(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(runs being trained by other processes, finished runs) when this store was first asked: read once per
        plan, not once per planned run (a plan checks every run against every other one). Claims are read first: a
        run that finishes in between is then seen as one or the other."""
        claimed = self._claimed_configs()
        return claimed, self._finished_configs()

    def check(self, run_id: str, planned: dict[str, Any]) -> bool:
        """``True`` if an identical run is complete; ``False`` if it must train; a ValueError if it conflicts with a
        finished run, or one another process is training, of its series.

        ``planned``: every setting that changes the run's result, as its ``config`` event will record it; a
        ``None`` learning rate is not known yet (it waits for tuning) and is not compared.
        """
        planned = jsonable(planned)
        claimed, finished = self._planned_against
        self._refuse_conflicts(planned, claimed, finished)
        return any(config.get("run_id") == run_id for config in finished)

    def _refuse_conflicts(self, planned: dict[str, Any], claimed: list[dict[str, Any]],
                          finished: list[dict[str, Any]]) -> None:
        """A ValueError naming the keys when a run of ``planned``'s series, claimed or finished, differs in more
        than its seed (and, in the data's case, naming both sources)."""
        key = series_key(planned)
        unknown = {REPEAT_KEY} | ({"lr"} if planned.get("lr") is None else set())
        for state, others, remedy in (
                ("a run another process is training now:", claimed, "wait for it to finish"),
                ("a finished", finished, "delete that run's file to replace it")):
            for other in others:
                differ = [k for k in IDENTITY_KEYS if k in planned and k not in unknown and other.get(k) != planned[k]]
                if series_key(other) != key or not differ:
                    continue
                details = ", ".join(f"{k} {other.get(k)!r} -> {planned[k]!r}" for k in sorted(differ))
                if "data_fingerprint" in differ:
                    details += f" (data from {other.get('data_source')} -> {planned.get('data_source')})"
                raise SettingsConflict(f"{self.folder} already holds {state} {_describe(key)} with other settings "
                                 f"({details}): {other.get('run_id')}; use another results_dir, or {remedy}")

    # ----------------------------------------------------------------------------- sharing the folder

    def _lock(self, name: str) -> FileLock:
        return FileLock(self.folder / name)

    def _run_lock(self, run_id: str) -> FileLock:
        return self._lock(f"{CLAIMS}/{run_id}.lock")

    def _claim_is_held(self, run_id: str) -> bool:
        """Whether a process (this one included) holds ``run_id``'s claim: its lock cannot be taken now."""
        lock = self._run_lock(run_id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def _claimed_configs(self, other_than: str | None = None) -> list[dict[str, Any]]:
        """The planned settings of the runs being trained now (held claims), ``other_than`` excepted; a claim left
        by a killed process is no longer held and does not count."""
        claims = []
        for path in sorted((self.folder / CLAIMS).glob("*.json")):
            if path.stem != other_than and self._claim_is_held(path.stem):
                with contextlib.suppress(FileNotFoundError):  # released since the glob
                    claims.append(json.loads(path.read_text(encoding="utf-8")))
        return claims

    def claim(self, run_id: str, planned: dict[str, Any], wait: bool = False) -> Claim | None:
        """The right to train ``run_id``, or ``None`` when it is complete: two processes may share a folder.

        Decided under the folder's lock, so two processes never claim one run; the claim is an OS lock held until
        :meth:`Claim.release`, so a run in progress is never written by another process, and a killed process's
        claim dies with it. A run another process is training raises :class:`RunInProgress`, or with ``wait`` is
        waited for (and claimed if that process died before finishing it). Settings that differ from a run of the
        series finished or being trained are refused as in :meth:`check`.
        """
        planned = jsonable(planned)
        (self.folder / CLAIMS).mkdir(parents=True, exist_ok=True)
        while True:
            try:
                with self._lock(FOLDER_LOCK):
                    return self._claim_now(run_id, planned)
            except RunInProgress:
                if not wait:
                    raise
            with self._run_lock(run_id):  # blocks until the other process releases (or dies)
                pass

    def _claim_now(self, run_id: str, planned: dict[str, Any]) -> Claim | None:
        lock = self._run_lock(run_id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunInProgress(f"{run_id} is being trained by another process") from None
        try:
            if self.is_complete(run_id):
                lock.release()
                return None
            self._refuse_conflicts(planned, self._claimed_configs(other_than=run_id), self._finished_configs())
        except BaseException:
            if lock.is_locked:
                lock.release()
            raise
        settings = self.folder / CLAIMS / f"{run_id}.json"
        _write_atomically(settings, json.dumps({**planned, "run_id": run_id, "pid": os.getpid()}))
        return Claim(lock, settings)

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
            keys = {"run_id": config["run_id"], "method": config.get("method"),
                    "series": series_name(config.get("method"), config.get("targets")), "group": config.get("group")}
            row = {**{k: v for k, v in config.items() if k != "event"}, "series": keys["series"]}
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


SUMMARY_COLUMNS = ("run_id", "group", "method", "rank", "alpha", "seed", "final_accuracy", "final_eval_loss",
                   "train_time_s", "samples_per_s", "peak_memory_bytes", "memory_kind", "trainable_params",
                   "total_params", "size.disk_bytes")
