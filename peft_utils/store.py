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
same rank and alpha in the sweep, the same method and rate in learning-rate tuning) are drawn as repeats of one
experiment, so they may differ in their seed and nothing else. Runs of a series that differ in anything else are
different *settings* (``setting_id``: a hash of the run's identity without its seed), and a folder may hold several:
changing the rank and re-running into the same folder trains the new setting beside the old one, a run is found by
its identity rather than by its file name, and loading keeps the settings apart, one setting per series, never
averaged together (:meth:`RunStore.load`).

Processes may share a folder (a notebook and a terminal, or one process per GPU on the same experiment): each run is
trained by the process that claims it (:meth:`RunStore.claim`), the others skip it, or wait for it when they need
its result; processes with other settings train other runs.
"""
from __future__ import annotations

import contextlib
import functools
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

    ``runs``: one row per complete run (config fields, flattened ``size.*`` fields, summary fields, its ``series``:
    :func:`~peft_utils.methods.series_name` of its method and targets, what tables and figures key runs by, and its
    ``setting``: :func:`setting_id`); ``steps`` and ``evals``: one row per logged step / evaluation, with its run's
    ``run_id``, ``method``, ``series`` and ``group``.
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


def _identity(record: dict[str, Any], keys: Sequence[str]) -> str:
    """The run's group, method and ``keys`` values as one canonical text: a number as a float (alpha 16 and 16.0
    are one setting), a key the record lacks as null (older records lack the keys added since, at their default)."""
    values = jsonable([record.get("group"), record.get("method"), *(record.get(key) for key in keys)])
    return json.dumps([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values])


def identity(record: dict[str, Any]) -> str:
    """What a run is (:data:`IDENTITY_KEYS`, beside its group and method): a planned run is found by it, under any
    file name, and trains only when no complete run of the folder has it."""
    return _identity(record, IDENTITY_KEYS)


def setting_id(record: dict[str, Any]) -> str:
    """The run's *setting*, 8 hex digits of the SHA-1 of its identity without the seed: what the seeds of one
    series share, what tells two settings of a series apart when loaded, and what a run's file name ends with when
    another setting holds its readable name."""
    without_seed = [key for key in IDENTITY_KEYS if key != REPEAT_KEY]
    return hashlib.sha1(_identity(record, without_seed).encode()).hexdigest()[:8]


def _differences(one: dict[str, Any], other: dict[str, Any]) -> str:
    """The identity keys, the seed aside, in which two runs differ: ``"alpha 8.0 vs 16.0, rank 4 vs 8"``."""
    keys = [k for k in IDENTITY_KEYS if k != REPEAT_KEY and _identity(one, [k]) != _identity(other, [k])]
    return ", ".join(f"{k} {one.get(k)!r} vs {other.get(k)!r}" for k in keys)


# Sharing a results folder (see :meth:`RunStore.claim`): the folder's lock, held while a process picks its next run,
# and a claims folder with one lock per run, held while it trains, beside the run's planned settings. Both are OS
# locks (``flock``, through ``filelock``): they die with their process, so a killed run is never left claimed.
FOLDER_LOCK = ".lock"
CLAIMS = ".claims"


class RunInProgress(Exception):
    """The run is being trained by another process now (it holds the claim of the run's file, ``run_id``)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"{run_id} is being trained by another process")
        self.run_id = run_id


class Claim:
    """This process's right to train one run, from before its record is opened until :meth:`release`. ``run_id``
    names the run's file: its readable run id or, where another setting holds that, the id and its setting's hash
    (:meth:`RunStore.find`)."""

    def __init__(self, lock: FileLock, settings: Path, run_id: str) -> None:
        self.lock, self.settings, self.run_id = lock, settings, run_id

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
    """The run records of one results folder: paths, completion, where each planned run is, and loading.

    ``find(name, planned)`` is called when a run is planned: the run's file (``name``, its readable run id, unless
    another setting holds that name) and whether a run with its identity is complete (skip it). ``claim(name,
    planned)`` is taken before a run trains, so that processes sharing the folder train each run once.
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

    def mark_asked(self, run_id: str) -> None:
        """Date a complete run's record now, when a plan asks for it again and finds it complete: the folder's
        default view (:meth:`load` without ``run_ids``) shows each series' setting asked for last, so re-running an
        earlier setting shows that setting again, as training it would have."""
        with contextlib.suppress(OSError):  # a read-only copy: its view follows when its runs finished
            os.utime(self.path(run_id))

    def _complete_runs(self) -> dict[str, list[dict[str, Any]]]:
        """The events of every complete run (a ``config`` and a ``summary`` event), by run id: its file's name."""
        if not self.folder.is_dir():
            return {}
        runs = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            events = read_events(path)
            if {"config", "summary"} <= {e.get("event") for e in events}:
                runs[path.stem] = events
        return runs

    def _read_index(self) -> tuple[dict[str, str], dict[str, str]]:
        """(the identity of each complete run -> its run id; run id -> the identity of the complete run, or of the
        run another process is training, in that file), as the folder is now. Claims are read first: a run that
        finishes in between is then seen as one or the other."""
        claimed = {config["run_id"]: identity(config) for config in self._claimed_configs()}
        finished = {run_id: identity(_config(events)) for run_id, events in self._complete_runs().items()}
        found: dict[str, str] = {}
        for run_id, known in finished.items():
            found.setdefault(known, run_id)
        return found, {**finished, **claimed}

    @functools.cached_property
    def _index(self) -> tuple[dict[str, str], dict[str, str]]:
        """:meth:`_read_index` when this store was first asked: read once per plan, not once per planned run."""
        return self._read_index()

    def find(self, name: str, planned: dict[str, Any]) -> tuple[str, bool]:
        """(the planned run's id, whether a run with its identity is complete) for a run of readable id ``name``.

        A run is found by its :func:`identity`, whatever its file's name. Not found, it takes ``name`` where no
        other setting's run (complete, or being trained) holds that file, else ``name`` and its :func:`setting_id`:
        changing a setting and re-running into the folder trains beside the old runs, never over them.

        ``planned``: every setting that changes the run's result, as its ``config`` event will record it. A run
        whose learning rate waits for tuning (``None``) is placed once that is known: (``name``, ``False``).
        """
        if planned.get("lr") is None:
            return name, False
        return _place(name, planned, *self._index)

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

    def _claimed_configs(self) -> list[dict[str, Any]]:
        """The planned settings of the runs being trained now (held claims), each with its ``run_id``; a claim left
        by a killed process is no longer held and does not count."""
        claims = []
        for path in sorted((self.folder / CLAIMS).glob("*.json")):
            if self._claim_is_held(path.stem):
                with contextlib.suppress(FileNotFoundError):  # released since the glob
                    claims.append({**json.loads(path.read_text(encoding="utf-8")), "run_id": path.stem})
        return claims

    def claim(self, name: str, planned: dict[str, Any], wait: bool = False) -> Claim | None:
        """The right to train the planned run of readable id ``name`` (in the file :attr:`Claim.run_id`), or
        ``None`` when a run with its identity is complete: two processes may share a folder.

        Decided under the folder's lock, so two processes never claim one run, and on the folder as it is then (its
        file as :meth:`find` places it now: since the plan, another process may have taken ``name`` for another
        setting). The claim is an OS lock held until :meth:`Claim.release`, so a run in progress is never written
        by another process, and a killed process's claim dies with it. A run another process is training raises
        :class:`RunInProgress`, or with ``wait`` is waited for (and claimed if that process died before finishing).
        """
        planned = jsonable(planned)
        (self.folder / CLAIMS).mkdir(parents=True, exist_ok=True)
        while True:
            try:
                with self._lock(FOLDER_LOCK):
                    return self._claim_now(name, planned)
            except RunInProgress as busy:
                if not wait:
                    raise
                with self._run_lock(busy.run_id):  # blocks until the other process releases (or dies)
                    pass

    def _claim_now(self, name: str, planned: dict[str, Any]) -> Claim | None:
        run_id, complete = _place(name, planned, *self._read_index())
        if complete:
            return None
        lock = self._run_lock(run_id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunInProgress(run_id) from None
        if self.is_complete(run_id):  # finished, with this identity, by the process training it when read
            lock.release()
            return None
        settings = self.folder / CLAIMS / f"{run_id}.json"
        _write_atomically(settings, json.dumps({**planned, "run_id": run_id, "pid": os.getpid()}))
        return Claim(lock, settings, run_id)

    # ----------------------------------------------------------------------------- loading

    def load(self, run_ids: Sequence[str] | None = None, every_setting: bool = False) -> Results:
        """The folder's complete runs as tables, one setting per series: the runs ``run_ids`` (two settings of one
        series among them are refused), or without them each series' setting asked for last (its newest record:
        trained, or found complete by a plan, last; see :meth:`mark_asked`). ``every_setting`` keeps every
        setting, told apart by the runs' ``setting`` column.

        Why one setting per series: tables, figures and paired tests key runs by series and take its runs for
        seeds of one experiment, so a rank-4 run among rank-8 seeds would be averaged into them.
        """
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
        newest: dict[tuple[Any, ...], tuple[int, str]] = {}
        for run_id, config in configs.items():
            stamp = (self.path(run_id).stat().st_mtime_ns, run_id)
            newest[series_key(config)] = max(newest.get(series_key(config), stamp), stamp)
        latest = {key: setting_id(configs[run_id]) for key, (_, run_id) in newest.items()}
        return {run_id: c for run_id, c in configs.items() if setting_id(c) == latest[series_key(c)]}

    def _refuse_mixed_settings(self, configs: dict[str, dict[str, Any]]) -> None:
        """Runs asked for together must be one setting per series, else a table would average two experiments."""
        first_of: dict[tuple[Any, ...], str] = {}
        for run_id, config in configs.items():
            first = first_of.setdefault(series_key(config), run_id)
            if setting_id(configs[first]) != setting_id(config):
                raise ValueError(f"{first} and {run_id} are two settings of one {_describe(series_key(config))} "
                                 f"({_differences(configs[first], config)}), not two seeds: select one setting")

    def summary(self, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per complete run (every recorded field, the main ones first), in ``run_ids`` order if given, else
        the folder's default view (:meth:`load`)."""
        runs = self.load(run_ids).runs
        if runs.empty:
            return runs
        if run_ids is not None:
            runs = runs.set_index("run_id").loc[list(run_ids)].reset_index()
        first = [c for c in SUMMARY_COLUMNS if c in runs.columns]
        return runs[first + [c for c in runs.columns if c not in first]].reset_index(drop=True)


def _config(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e.get("event") == "config")


def _place(name: str, planned: dict[str, Any], found: dict[str, str], held: dict[str, str]) -> tuple[str, bool]:
    """:meth:`RunStore.find` on a folder read as :meth:`RunStore._read_index` reads it."""
    known = identity(planned)
    if known in found:
        return found[known], True
    if held.get(name, known) == known:
        return name, False
    return f"{name}-{setting_id(planned)}", False


def _results(runs: dict[str, list[dict[str, Any]]]) -> Results:
    """The tables of :class:`Results` from the events of complete runs, by run id."""
    rows, steps, evals = [], [], []
    for run_id, events in runs.items():
        config, summary = _config(events), next(e for e in events if e.get("event") == "summary")
        keys = {"run_id": run_id, "method": config.get("method"),
                "series": series_name(config.get("method"), config.get("targets")), "group": config.get("group")}
        row = {**{k: v for k, v in config.items() if k != "event"}, "run_id": run_id, "series": keys["series"],
               "setting": setting_id(config)}
        rows.append({**row, **{k: v for k, v in summary.items() if k != "event"}})
        steps += [{**keys, **{k: v for k, v in e.items() if k != "event"}} for e in events if e["event"] == "step"]
        evals += [{**keys, **{k: v for k, v in e.items() if k != "event"}} for e in events if e["event"] == "eval"]
    runs_frame = pd.json_normalize(rows) if rows else pd.DataFrame()
    return Results(runs=runs_frame, steps=pd.DataFrame(steps), evals=pd.DataFrame(evals))


SUMMARY_COLUMNS = ("run_id", "group", "method", "rank", "alpha", "seed", "final_accuracy", "final_eval_loss",
                   "train_time_s", "samples_per_s", "peak_memory_bytes", "memory_kind", "trainable_params",
                   "total_params", "size.disk_bytes")
