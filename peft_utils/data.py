"""The data: SST-2 and any classification dataset through ``datasets``, its fingerprint, and seeded subsets. Every
method must see the same rows for a given seed, or accuracy differences could come from the data: hence text read as
text (no quoting, no "NA" as missing), every empty cell refused, and seeded subsets.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import DataConfig, ExperimentConfig, TuneConfig
from .quiet import datasets_bars_off

SST2 = "sst2"  # the default dataset: GLUE's SST-2, from a local copy of its TSVs or the hub
SST2_LABEL_NAMES = ("negative", "positive")  # GLUE's names for SST-2's labels 0 and 1
SST2_FILES = ("train.tsv", "dev.tsv")
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


def load_sst2(data_dir: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """SST-2's ``{"train": ..., "dev": ...}`` frames of ``sentence`` and ``label``, as :func:`load_splits` reads it."""
    splits = load_splits(DataConfig(data_dir=None if data_dir is None else str(data_dir)))
    return {"train": splits.train, "dev": splits.dev}


def fingerprint(*frames: pd.DataFrame) -> str:
    """A short hash of the rows, texts and labels in order, split after split (not of the files: the same data
    wherever it was read from), so that a results folder can refuse to count runs of other data as repeats."""
    digest = hashlib.sha256()
    for frame in frames:
        for sentence, label in zip(frame["sentence"], frame["label"]):
            digest.update(f"{sentence}\t{label}\n".encode())
        digest.update(b"\0")  # where one frame ends: moving a row from train to dev changes the fingerprint
    return digest.hexdigest()[:16]


def _load_sst2(data_dir: str | None) -> tuple[dict[str, Any], str]:
    """SST-2's raw splits and source: ``data_dir`` (``sst2`` or its parent), ``SST2_DIR``, ``PEFT_LAB_DATA``, and
    only then the hub. A named folder that is wrong is an error: a typo must not silently switch to the hub."""
    lab_data = os.environ.get("PEFT_LAB_DATA")
    named = ((data_dir, "data_dir"), (os.environ.get("SST2_DIR"), "SST2_DIR"),
             (lab_data and Path(lab_data) / "sst2", "PEFT_LAB_DATA"))
    folder, origin = next(((Path(path), origin) for path, origin in named if path), (None, None))
    if folder is None:
        try:
            return _load_hub("glue", "sst2")
        except ValueError as error:
            raise FileNotFoundError(
                f"SST-2 not available: no local folder given, and {error}. Point at a local copy instead: pass "
                "data_dir, or set PEFT_LAB_DATA to a folder containing sst2/, or SST2_DIR to the sst2 folder itself. "
                "That folder must hold the GLUE files train.tsv and dev.tsv (tab-separated, header "
                "'sentence<TAB>label').") from None
    if not folder.is_dir():
        raise FileNotFoundError(f"SST-2 folder {folder} (from {origin}) does not exist")
    if not (folder / SST2_FILES[0]).exists() and (folder / "sst2").is_dir():
        folder = folder / "sst2"
    missing = [name for name in SST2_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"SST-2 folder {folder} (from {origin}) lacks {', '.join(missing)}")
    return _load_local(folder)


def subset(frame: pd.DataFrame, size: int | None, seed: int, balanced: bool = False,
           stratified: bool = False) -> pd.DataFrame:
    """A seeded sample of ``size`` rows (``None``: all), in the original order. ``balanced``: ``size // K`` rows per
    class, so that small runs are not skewed by SST-2's 56/44 split; ``stratified``: see :func:`rows_per_class`."""
    if size is not None and size <= 0:
        raise ValueError(f"subset size must be positive or None, got {size}")
    if balanced or stratified:
        positions = _per_class_positions(frame, size, seed, stratified)
    elif size is None or size >= len(frame):
        positions = np.arange(len(frame))
    else:
        positions = np.random.default_rng(seed).choice(len(frame), size=size, replace=False)
    return frame.iloc[np.sort(positions)].reset_index(drop=True)


def hold_out(frame: pd.DataFrame, size: int, seed: int,
             stratified: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(held_out, rest)``: a balanced (or ``stratified``) seeded sample of ``size`` rows and every other row.
    Tuning scores on rows it did not train on (else it would favour memorising), and leaves dev to the results."""
    return _split_off(frame, _per_class_positions(frame, size, seed, stratified))


def _split_off(frame: pd.DataFrame, positions: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows at ``positions``, every other row), each in the original order."""
    chosen = np.zeros(len(frame), dtype=bool)
    chosen[positions] = True
    return frame[chosen].reset_index(drop=True), frame[~chosen].reset_index(drop=True)


def class_counts(frame: pd.DataFrame) -> np.ndarray:
    """Rows of each class of ``frame``, in label order: what :func:`rows_per_class` splits a subset by."""
    return np.unique(frame["label"].to_numpy(), return_counts=True)[1]


def balance_problem(counts: np.ndarray, size: int | None) -> str | None:
    """Why no balanced subset of ``size`` rows can be drawn from classes of ``counts`` rows, or ``None``."""
    if size is not None and size % len(counts):
        return f"balanced subset of {size} rows is impossible with {len(counts)} classes (not divisible)"
    per_class = int(counts.min()) if size is None else size // len(counts)
    if per_class > counts.min():
        return f"balanced subset needs {per_class} rows per class, but the rarest class has {counts.min()}"
    return None


def rows_per_class(counts: np.ndarray, size: int | None, stratified: bool = False) -> np.ndarray:
    """How many rows each class (``counts``, in label order) gives a subset of ``size`` rows. Balanced: ``size //
    K`` each (``None``: the rarest class's count), or a ``ValueError``. Stratified: in proportion (largest
    remainders first), at least one row of each class when ``size`` allows; ``None``: every row."""
    if not stratified:
        problem = balance_problem(counts, size)
        if problem:
            raise ValueError(problem)
        return np.full(len(counts), int(counts.min()) if size is None else size // len(counts))
    size = int(counts.sum()) if size is None else min(size, int(counts.sum()))
    share = size * counts / counts.sum()
    taken = np.minimum(np.maximum(np.floor(share), 1 if size >= len(counts) else 0), counts).astype(int)
    while taken.sum() < size:  # hand out what flooring left over, to the largest remainders with rows to spare
        taken[np.argmax(np.where(taken < counts, share - taken, -np.inf))] += 1
    while taken.sum() > size:  # the "one of each" rows overshot: take back from the classes most above their share
        taken[np.argmax(np.where(taken > 1, taken - share, -np.inf))] -= 1
    return taken


def _per_class_positions(frame: pd.DataFrame, size: int | None, seed: int, stratified: bool) -> np.ndarray:
    """Positions of a seeded subset of ``frame`` taking :func:`rows_per_class` rows of each class."""
    return _class_positions(frame["label"].to_numpy(), seed, lambda counts: rows_per_class(counts, size, stratified))


def _class_positions(labels: np.ndarray, seed: int, taken: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Positions of a seeded subset with ``taken(counts)`` rows of each class, classes in sorted order."""
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                           for c, n in zip(classes, taken(counts))])


# Local files by suffix: the ``datasets`` builder that reads them and its options. Text stays text: no "NA" or
# "null" read as missing; a TSV has no quoting (sentences hold quotes, as SST-2's do).
_TEXT_CELLS = {"keep_default_na": False}
LOCAL_FORMATS = {".csv": ("csv", _TEXT_CELLS), ".tsv": ("csv", {**_TEXT_CELLS, "delimiter": "\t", "quoting": 3}),
                 ".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}
DEV_SPLIT_NAMES = ("validation", "dev", "valid")  # a test split is never read: its labels are for the very end
CARVED_DEV_FRACTION, CARVED_DEV_SEED = 0.1, 0
# The eval rows must not change with the run seed: paired tests compare methods on the same sentences.
EVAL_SUBSET_SEED = 0


@dataclass(frozen=True)
class Splits:
    """A classification dataset: ``train`` and ``dev`` frames of ``sentence`` (and ``sentence2`` for pairs) and
    ``label`` (ids ``0..K-1``, named by ``label_names``), where they were read from, and what ``dev`` is."""

    train: pd.DataFrame
    dev: pd.DataFrame
    label_names: tuple[str, ...]
    source: str
    dev_split: str


def load_splits(data: DataConfig) -> Splits:
    """``data.dataset``: ``"sst2"``, a local file or folder (``train.<ext>``, maybe ``validation``/``dev``), or a hub
    dataset id, all read by ``datasets``; without a validation split, one is carved from train. Every problem is
    one line naming the dataset, the split and the column, before anything trains."""
    sst2 = data.dataset == SST2
    raw, source = _load_sst2(data.data_dir) if sst2 else _load_raw(data.dataset, data.dataset_config)
    columns = _text_columns(data, raw["train"].column_names)
    frames = {name: _frame(split, columns, data.label_column, f"{data.dataset} ({name} split)")
              for name, split in raw.items()}
    train, dev, dev_split = frames["train"], frames.get("dev"), "dev" if sst2 else "validation"
    if dev is None:  # CARVED_DEV_FRACTION of each class (at least a row), classes in the order of their text
        labels, fraction = train["label"].astype(str).to_numpy(), CARVED_DEV_FRACTION
        dev, train = _split_off(train, _class_positions(labels, CARVED_DEV_SEED,
                                                        lambda n: np.maximum(1, np.round(fraction * n)).astype(int)))
        dev_split = f"carved from train ({CARVED_DEV_FRACTION:.0%} of each class, seed {CARVED_DEV_SEED})"
    names = SST2_LABEL_NAMES if sst2 else getattr(raw["train"].features.get(data.label_column), "names", None)
    train, dev, names = _label_ids((train, dev), names, data.dataset)
    return Splits(train, dev, names, source, dev_split)


def _load_raw(dataset: str, config_name: str | None) -> tuple[dict[str, Any], str]:
    """The raw splits (``train``, maybe ``dev``) of a local file or folder, else of a hub dataset, and the source."""
    path = Path(dataset)
    if path.exists():
        return _load_local(path)
    if path.suffix.lower() in LOCAL_FORMATS or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise FileNotFoundError(f"dataset file {dataset} does not exist")
    return _load_hub(dataset, config_name)


def _load_local(path: Path) -> tuple[dict[str, Any], str]:
    """Each split read on its own, so that a column one file lacks is named, not a schema clash between files."""
    from datasets import load_dataset

    loaded = {}
    for split, file in _local_files(path).items():
        builder, options = LOCAL_FORMATS[file.suffix.lower()]
        try:
            with datasets_bars_off():  # "Generating train split" over a file of a few hundred rows says nothing
                loaded[split] = load_dataset(builder, data_files=str(file), split="train", **options)
        except Exception as error:  # a malformed file: datasets' parsers raise many kinds, each spanning lines
            raise ValueError(f"dataset {file}: cannot read it as {builder}: {_first_line(error)}") from None
    return loaded, os.path.abspath(path)


def _load_hub(dataset: str, config_name: str | None) -> tuple[dict[str, Any], str]:
    from datasets import load_dataset

    if any(os.environ.get(name, "").strip().lower() in _TRUTHY for name in OFFLINE_ENV_VARS):
        raise ValueError(f"dataset {dataset!r} is not a local file or folder, and Hugging Face offline mode is on "
                         "(HF_HUB_OFFLINE): give a local CSV/TSV/JSON Lines/Parquet file or folder instead")
    try:
        with datasets_bars_off():
            loaded = load_dataset(dataset, config_name)
    except (ConnectionError, OSError, ValueError) as error:
        raise ValueError(f"dataset {dataset!r}: cannot load it from the Hugging Face hub: {_first_line(error)}") from None
    if "train" not in loaded:
        raise ValueError(f"dataset {dataset!r} has no train split (it has {', '.join(loaded)})")
    name = f"{dataset}/{config_name}" if config_name else dataset
    return _train_and_dev(loaded), f"{name} (Hugging Face hub)"


def _train_and_dev(splits: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` and, as ``dev``, the first of :data:`DEV_SPLIT_NAMES` there is."""
    dev = next((name for name in DEV_SPLIT_NAMES if name in splits), None)
    return {"train": splits["train"], **({"dev": splits[dev]} if dev else {})}


def _first_line(error: BaseException) -> str:
    """The first line of the error's root cause (``datasets`` wraps a parser's error in a generic one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(f"dataset file {path}: unknown format {path.suffix!r}; use one of "
                             f"{', '.join(LOCAL_FORMATS)}")
        return {"train": path}
    found = {p.stem.lower(): p for p in sorted(path.iterdir()) if p.suffix.lower() in LOCAL_FORMATS}
    if "train" not in found:
        raise FileNotFoundError(f"dataset folder {path} has no train file (train{', train'.join(LOCAL_FORMATS)})")
    return _train_and_dev(found)


def _text_columns(data: DataConfig, columns: Sequence[str]) -> tuple[str, ...]:
    """The text column(s) to read: as configured, else ``text`` or ``sentence``, whichever train has."""
    wanted = data.text_column or next(((c,) for c in ("text", "sentence") if c in columns), None)
    if wanted is None:
        raise ValueError(f"dataset {data.dataset} (train split): no 'text' or 'sentence' column (columns: "
                         f"{', '.join(columns)}); name the text column(s) with text_column")
    return tuple(wanted)


def _frame(split, text_columns: tuple[str, ...], label_column: str, where: str) -> pd.DataFrame:
    """``sentence`` [``sentence2``] and the raw ``label`` of one split; an empty text or label is refused."""
    frame = split.to_pandas()
    missing = [c for c in (*text_columns, label_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"dataset {where}: no column {missing[0]!r} (columns: {', '.join(frame.columns)})")
    for column in (*text_columns, label_column):
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"dataset {where}: row {int(np.flatnonzero(empty)[0]) + 1}: empty "
                             f"{'label' if column == label_column else 'text'} in column {column!r}")
    texts = {name: frame[column].astype(str).str.rstrip()  # trailing whitespace: GLUE's TSVs end sentences in one
             for name, column in zip(("sentence", "sentence2"), text_columns)}
    return pd.DataFrame({**texts, "label": frame[label_column].to_numpy()})


def _label_ids(frames: tuple[pd.DataFrame, pd.DataFrame], names: Sequence[str] | None,
               dataset: str) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """(train, dev) with labels as ids ``0..K-1`` and the K names: ``names`` (a ``ClassLabel``'s, SST-2's), else
    the train labels sorted. One class, or a label outside those, is refused."""
    try:
        values = list(range(len(names))) if names else sorted(frames[0]["label"].unique().tolist())
    except TypeError:
        raise ValueError(f"dataset {dataset}: labels mix numbers and text; use one kind") from None
    if frames[0]["label"].nunique() < 2:
        raise ValueError(f"dataset {dataset}: every train row has label {frames[0]['label'].tolist()[0]!r}: a "
                         "classifier needs two or more classes")
    out = []
    for frame, split in zip(frames, ("train", "validation")):
        ids = pd.Index(values).get_indexer(frame["label"])  # -1: not one of the values
        if (ids < 0).any():
            raise ValueError(f"dataset {dataset}: {split} label {frame['label'][ids < 0].tolist()[0]!r} is not one "
                             f"of the labels ({', '.join(map(str, values))})")
        out.append(frame.assign(label=ids.astype(np.int64)))
    return out[0], out[1], tuple(names or map(str, values))


def train_and_eval_rows(config: ExperimentConfig, train: pd.DataFrame, dev: pd.DataFrame, seed: int,
                         size_name: str = "train_size") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows (balanced, drawn with the run seed; stratified where :func:`fit_sizes` found no balanced
    subset) and eval rows (the same for every run and seed); ``size_name``: the train size's name in errors."""
    train_size, eval_size = config.data.train_size, config.data.eval_size
    for name, size, split, frame in ((size_name, train_size, "train", train), ("eval_size", eval_size, "dev", dev)):
        if size is not None and size > len(frame):
            raise ValueError(f"{name}={size} is more than the {len(frame):,} rows of the {split} split; "
                             f"ask for at most {len(frame):,} or 'all'")
    try:
        train_frame = train if train_size is None else subset(train, train_size, seed, balanced=True,
                                                              stratified=size_name in config.stratified_sizes)
    except ValueError as error:
        raise ValueError(f"{size_name}={train_size}: {error}") from None
    return train_frame, dev if eval_size is None else subset(dev, eval_size, EVAL_SUBSET_SEED)


class _SizeFitter:
    """Fits the sizes a user left to the profile (``adaptable``) to the data, one note per size it changes."""

    def __init__(self, adaptable: frozenset[str]) -> None:
        self.adaptable = adaptable
        self.seen: set[str] = set()
        self.notes: list[str] = []
        self.stratified: set[str] = set()

    def fit(self, name: str, size: int | None, counts: np.ndarray, asked: int | None = None, balanced: bool = True,
            count_all: bool = False) -> int | None:
        """Size ``name`` (``size`` rows) drawn from ``counts`` rows per class: every row when it asks for as many
        (``None``, or their count with ``count_all``, where ``None`` means the comparison's size); stratified where
        a ``balanced`` draw cannot be. ``asked``: the profile's size, for the note."""
        self.seen.add(name)
        if name not in self.adaptable or size is None:
            return size
        asked, total = size if asked is None else asked, int(counts.sum())
        rows = min(size, total)
        note = f" -> {rows:,}" + (" (all rows)" if rows == total else "") if rows != asked else ""
        if balanced and balance_problem(counts, rows) is not None:
            self.stratified.add(name)
            note += f" stratified over {len(counts)} classes" if rows < total else ""
        if note:
            self.notes.append(f"{name} {asked:,}{note}")
        return rows if rows < total or count_all else None

    def tuning(self, tune: TuneConfig, train_size: int | None, counts: np.ndarray) -> TuneConfig:
        """Tuning's sizes: a held-out slice that leaves no train rows shrinks to a carved dev split's share (at
        least a row per class); its train rows are then fitted to the rows not held out."""
        total, size, holdout = int(counts.sum()), tune.train_size or train_size, tune.holdout_size
        if "tune_holdout_size" in self.adaptable and holdout + (size or 1) > total:
            holdout = min(holdout, max(len(counts), round(CARVED_DEV_FRACTION * total)))
        holdout = self.fit("tune_holdout_size", holdout, counts, asked=tune.holdout_size, count_all=True)
        stratified = "tune_holdout_size" in self.stratified
        if holdout >= total or not (stratified or balance_problem(counts, holdout) is None):
            return replace(tune, holdout_size=holdout)  # no rows left, or a user's slice: tuning_rows refuses it
        rest = counts - rows_per_class(counts, holdout, stratified)
        fitted = self.fit("tune_train_size", size, rest, count_all=True)
        return replace(tune, holdout_size=holdout, train_size=tune.train_size if fitted == size else fitted)


def fit_sizes(config: ExperimentConfig, splits: Splits, sweep: bool) -> tuple[ExperimentConfig, str]:
    """``config`` with each size the user left to the profile (``config.adaptable_sizes``) fitted to the data, and
    one line of what changed (``""``: nothing). A profile's sizes are chosen for SST-2; a user's own 240-row,
    3-class file should train with them rather than be refused over numbers the user never chose. A size the user
    set is left as set; the fitted config fits nothing more when planned again (a widened tuning grid)."""
    fitter, train = _SizeFitter(config.adaptable_sizes), class_counts(splits.train)
    data = replace(config.data, train_size=fitter.fit("train_size", config.data.train_size, train),
                   eval_size=fitter.fit("eval_size", config.data.eval_size, class_counts(splits.dev), balanced=False))
    parts: dict[str, Any] = {"data": data}
    if sweep:
        parts["sweep"] = replace(config.sweep, train_size=fitter.fit("sweep_train_size", config.sweep.train_size,
                                                                     train, count_all=True))
    if config.tune.enabled:
        parts["tune"] = fitter.tuning(config.tune, data.train_size, train)
    fitted = replace(config, **parts, adaptable_sizes=config.adaptable_sizes - fitter.seen,
                     stratified_sizes=config.stratified_sizes | fitter.stratified)
    return fitted, ", ".join(fitter.notes)
