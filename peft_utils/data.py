"""The data: SST-2's strict loader, any other classification dataset through ``datasets`` (:func:`load_splits`),
the data's fingerprint, seeded subsets, and the held-out and evaluation rows.

Every method (full, LoRA, DoRA, QLoRA) must see exactly the same rows for a given seed, otherwise accuracy
differences could come from the data rather than the method. Hence: a strict TSV parser (a silently mis-parsed
row would change the data set) and seeded subsetting. Tokenising and batching are the core's
(:mod:`peft_utils.core.batches`).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import DataConfig
from .quiet import datasets_bars_off

SPLIT_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
HEADER = ("sentence", "label")
LABELS = {"0": 0, "1": 1}
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------- loading


def load_sst2(data_dir: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Return ``{"train": ..., "dev": ...}`` frames with columns ``sentence`` (str) and ``label`` (int 0/1).

    Local files win over the network so tests and notebooks run offline and always on the same bytes:
    ``data_dir`` first (the ``sst2`` folder or its parent), then ``SST2_DIR`` / ``PEFT_LAB_DATA``, and only
    then the Hugging Face hub (``glue``/``sst2``; its ``validation`` split becomes ``dev``).
    """
    folder = _local_sst2_dir(data_dir)
    if folder is None:
        return _load_from_hub()
    return {split: read_sst2_tsv(folder / name) for split, name in SPLIT_FILES.items()}


def sst2_source(data_dir: str | Path | None = None) -> str:
    """Where :func:`load_sst2` reads from, for the records: the local folder (absolute, without ``..``: one folder
    reads one way from any working directory), or the hub dataset."""
    folder = _local_sst2_dir(data_dir)
    return os.path.abspath(folder) if folder is not None else "glue/sst2 (Hugging Face hub)"


def fingerprint(*frames: pd.DataFrame) -> str:
    """A short hash of the data's rows, texts and labels in order, one frame (split) after the other.

    Why the rows and not the files: two runs with one fingerprint saw the same data wherever it was read from, and
    two runs of different data (another folder, an edited file) never share one, so a results folder can refuse to
    count them as repeats of one experiment.
    """
    digest = hashlib.sha256()
    for frame in frames:
        for sentence, label in zip(frame["sentence"], frame["label"]):
            digest.update(f"{sentence}\t{label}\n".encode())
        digest.update(b"\0")  # where one frame ends: moving a row from train to dev changes the fingerprint
    return digest.hexdigest()[:16]


def _local_sst2_dir(data_dir: str | Path | None) -> Path | None:
    """The SST-2 folder named by the argument or the environment, checked; ``None`` when nothing names one.

    ``SST2_DIR`` is checked before ``PEFT_LAB_DATA`` because it is the more specific setting (the Makefile
    always exports ``PEFT_LAB_DATA``). A folder that is named but wrong is an error, not a reason to fall
    back to the hub: a typo must not silently switch the data source.
    """
    if data_dir is not None:
        return _checked_sst2_dir(Path(data_dir), "data_dir")
    if os.environ.get("SST2_DIR"):
        return _checked_sst2_dir(Path(os.environ["SST2_DIR"]), "SST2_DIR")
    if os.environ.get("PEFT_LAB_DATA"):
        return _checked_sst2_dir(Path(os.environ["PEFT_LAB_DATA"]) / "sst2", "PEFT_LAB_DATA")
    return None


def _checked_sst2_dir(path: Path, source: str) -> Path:
    """Accept the ``sst2`` folder itself or a parent holding ``sst2/``; fail naming the path otherwise."""
    if not path.is_dir():
        raise FileNotFoundError(f"SST-2 folder {path} (from {source}) does not exist")
    if not (path / SPLIT_FILES["train"]).exists() and (path / "sst2").is_dir():
        path = path / "sst2"
    missing = [name for name in SPLIT_FILES.values() if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"SST-2 folder {path} (from {source}) lacks {', '.join(missing)}")
    return path


def _hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    return any(os.environ.get(name, "").strip().lower() in _TRUTHY for name in OFFLINE_ENV_VARS)


def _no_data_error(reason: str) -> FileNotFoundError:
    """The error says how to fix it, because the usual cause is simply not having pointed at the local copy."""
    return FileNotFoundError(
        f"SST-2 not available: {reason}. Point at a local copy instead: pass load_sst2(data_dir=...) or set "
        "PEFT_LAB_DATA to a folder containing sst2/, or SST2_DIR to the sst2 folder itself. That folder must "
        "hold the GLUE files train.tsv and dev.tsv (tab-separated, header 'sentence<TAB>label')."
    )


def _load_from_hub() -> dict[str, pd.DataFrame]:
    """Download GLUE SST-2 with ``datasets``; offline or unreachable becomes a FileNotFoundError with a fix."""
    if _hub_offline():
        raise _no_data_error("no local folder given and Hugging Face offline mode is on")
    from datasets import load_dataset

    try:
        splits = load_dataset("glue", "sst2")
    except ConnectionError as error:
        raise _no_data_error(f"no local folder given and the Hugging Face hub is unreachable ({error})") from error
    return {split: _hub_frame(splits[hub_name]) for split, hub_name in (("train", "train"), ("dev", "validation"))}


def _hub_frame(split) -> pd.DataFrame:
    """Same columns, dtypes and stripping as the TSV path, so both sources give identical frames."""
    frame = split.to_pandas()
    return pd.DataFrame({
        "sentence": frame["sentence"].str.rstrip(),
        "label": frame["label"].astype("int64"),
    })


# ------------------------------------------------------------------------------------------- TSV parsing


def read_sst2_tsv(path: str | Path) -> pd.DataFrame:
    """Parse one GLUE SST-2 TSV (``sentence<TAB>label``) strictly.

    Quoting is off (sentences contain quotes and backticks) and every row is checked, because lenient
    parsers silently merge, drop or coerce malformed rows. Errors are ``ValueError`` naming the file and
    the 1-based line number. Windows line endings (CRLF, as spreadsheet programs save) read like Unix ones. A file
    whose rows all carry one label is refused: a classifier trained on it learns a constant, and accuracy on it
    cannot tell a model from a constant.
    """
    path = Path(path)
    lines = [line.removesuffix("\r") for line in _decoded_text(path).split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    if not lines:
        raise ValueError(f"{path}: line 1: empty file, expected the header 'sentence<TAB>label'")
    _check_header(path, lines[0])
    if len(lines) == 1:
        raise ValueError(f"{path}: line 1: header only, no data rows")
    sentences, labels = zip(*(_parse_row(path, number, line) for number, line in enumerate(lines[1:], start=2)))
    _check_both_labels(path, labels)
    return pd.DataFrame({"sentence": list(sentences), "label": np.array(labels, dtype=np.int64)})


def _check_both_labels(path: Path, labels: tuple[int, ...]) -> None:
    present = sorted(set(labels))
    if len(present) < len(LABELS):
        raise ValueError(f"{path}: all {len(labels):,} rows have label {present[0]}: SST-2 needs rows of both "
                         "labels (0 and 1)")


def _decoded_text(path: Path) -> str:
    """The file as UTF-8 text, a leading byte-order mark dropped (spreadsheet programs often save one).

    A byte that is not UTF-8 is a ``ValueError`` naming the file, the line and the byte, not a bare
    ``UnicodeDecodeError`` that names neither.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}: line {line}: byte 0x{data[error.start]:02x} at column {column} is not UTF-8; "
            "save the file as UTF-8"
        ) from None


def _check_header(path: Path, line: str) -> None:
    columns = tuple(line.split("\t"))
    if columns == HEADER:
        return
    missing = [name for name in HEADER if name not in columns]
    problem = f"missing column(s) {', '.join(missing)}" if missing else "wrong column order or extra columns"
    raise ValueError(f"{path}: line 1: header must be exactly 'sentence<TAB>label', got {line!r} ({problem})")


def _parse_row(path: Path, number: int, line: str) -> tuple[str, int]:
    fields = line.split("\t")
    if len(fields) != 2:
        raise ValueError(f"{path}: line {number}: expected 2 tab-separated fields, got {len(fields)}: {line!r}")
    sentence, label = fields[0].rstrip(), fields[1]
    if label not in LABELS:
        raise ValueError(f"{path}: line {number}: label must be 0 or 1, got {label!r}")
    if not sentence:
        raise ValueError(f"{path}: line {number}: empty sentence")
    return sentence, LABELS[label]


# ------------------------------------------------------------------------------------------- subsetting


def subset(frame: pd.DataFrame, size: int | None, seed: int, balanced: bool = False,
           stratified: bool = False) -> pd.DataFrame:
    """A seeded sample of ``size`` rows (``None``: all rows), kept in the original row order.

    Seeded so every method trains on the same rows; ``balanced`` takes ``size // n_classes`` rows per label
    so small runs are not skewed by SST-2's 56/44 class split (``size=None``: as many as the rarest class);
    ``stratified`` takes each class in proportion instead (:func:`rows_per_class`), for a size no balanced subset
    meets. The index is reset, so positions and index agree downstream.
    """
    if size is not None and size <= 0:
        raise ValueError(f"subset size must be positive or None, got {size}")
    if balanced or stratified:
        positions = _class_positions(frame["label"].to_numpy(), size, seed, stratified)
    elif size is None or size >= len(frame):
        positions = np.arange(len(frame))
    else:
        positions = np.random.default_rng(seed).choice(len(frame), size=size, replace=False)
    return frame.iloc[np.sort(positions)].reset_index(drop=True)


EVAL_SUBSET_SEED = 0  # an eval subset must not change with the run seed: every run is scored on the same rows


def eval_rows(dev: pd.DataFrame, size: int | None) -> pd.DataFrame:
    """The dev rows every run is scored on: all of them, or a fixed seeded sample of ``size`` (the same for every
    run and seed, so paired tests compare methods on the same sentences)."""
    return dev if size is None else subset(dev, size, EVAL_SUBSET_SEED)


def hold_out(frame: pd.DataFrame, size: int, seed: int,
             stratified: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(held_out, rest)``: a balanced (or ``stratified``), seeded sample of ``size`` rows and every other row, both
    in file order.

    Learning-rate tuning scores on ``held_out`` and trains on rows drawn from ``rest``: a rate chosen on rows
    it was trained on would favour memorising, and the dev split stays untouched for the reported numbers.
    """
    chosen = np.zeros(len(frame), dtype=bool)
    chosen[_class_positions(frame["label"].to_numpy(), size, seed, stratified)] = True
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
    """How many rows each class (``counts``: its rows, in label order) gives a subset of ``size`` rows.

    Balanced: ``size // K`` each (``None``: as many as the rarest class has), else a ``ValueError`` saying why.
    Stratified: each class in proportion to its rows (largest remainders first, ties to the first class), at least
    one row of each when ``size`` allows, so that 32 rows of 3 classes, or a subset of data with a rare class,
    still hold every class in its share; ``None`` or more rows than there are: every row.
    """
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


def _class_positions(labels: np.ndarray, size: int | None, seed: int, stratified: bool) -> np.ndarray:
    """Positions of a seeded subset taking :func:`rows_per_class` rows of each class."""
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                           for c, n in zip(classes, rows_per_class(counts, size, stratified))])


def find_gpt2_tokenizer(data_dir: str | Path | None = None) -> Path:
    """``gpt2-tokenizer/`` of the shared data folder: in ``data_dir``, its parent, or ``$PEFT_LAB_DATA``.

    ``data_dir`` may name the data folder or its ``sst2/`` child, as :func:`load_sst2` accepts both.
    """
    roots = [Path(data_dir), Path(data_dir).parent] if data_dir is not None else []
    if os.environ.get("PEFT_LAB_DATA"):
        roots.append(Path(os.environ["PEFT_LAB_DATA"]))
    for root in roots:
        if (root / "gpt2-tokenizer" / "vocab.json").is_file():
            return root / "gpt2-tokenizer"
    raise FileNotFoundError(
        f"no gpt2-tokenizer/ folder in {[str(r) for r in roots] or 'any known place'}: a random GPT-2 needs the real "
        "tokenizer; pass data_dir (the folder holding sst2/ and gpt2-tokenizer/) or set PEFT_LAB_DATA"
    )


# ----------------------------------------------------------------------------------- any classification data

SST2 = "sst2"  # the default dataset: the strict SST-2 loader above
SST2_LABEL_NAMES = ("negative", "positive")  # GLUE's names for SST-2's labels 0 and 1
# Local files by suffix: the ``datasets`` builder that reads them and its options. Text stays text: no "NA" or
# "null" read as missing; a TSV has no quoting (sentences hold quotes, as SST-2's do).
_TEXT_CELLS = {"keep_default_na": False}
LOCAL_FORMATS = {".csv": ("csv", _TEXT_CELLS), ".tsv": ("csv", {**_TEXT_CELLS, "delimiter": "\t", "quoting": 3}),
                 ".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}
DEV_SPLIT_NAMES = ("validation", "dev", "valid")  # a test split is never read: its labels are for the very end
CARVED_DEV_FRACTION, CARVED_DEV_SEED = 0.1, 0


@dataclass(frozen=True)
class Splits:
    """A classification dataset as the experiment uses it: ``train`` and ``dev`` frames with columns ``sentence``
    (``sentence2`` too for sentence pairs) and ``label`` (ids ``0..K-1`` in the order of ``label_names``), where
    they were read from, and which split scores the runs (``dev_split``: the dataset's own, or carved from train)."""

    train: pd.DataFrame
    dev: pd.DataFrame
    label_names: tuple[str, ...]
    source: str
    dev_split: str


def load_splits(data: DataConfig) -> Splits:
    """``data.dataset``: ``"sst2"`` (:func:`load_sst2`, strict and offline-first), a local file or folder (CSV,
    TSV, JSON Lines, Parquet), or a Hugging Face hub dataset id (with ``data.dataset_config``), read by ``datasets``.

    A folder holds ``train.<ext>`` and, optionally, ``validation.<ext>`` (or ``dev``); a single file is the train
    split. Without a validation split, a seeded, stratified 10% of train is carved off to score the runs. Every
    problem (a missing column, one class, an empty text, a validation label train never has) is one line naming
    the dataset, the split and the column, before anything trains.
    """
    if data.dataset == SST2:
        frames = load_sst2(data.data_dir)
        return Splits(frames["train"], frames["dev"], SST2_LABEL_NAMES, sst2_source(data.data_dir), "dev")
    raw, source = _load_raw(data.dataset, data.dataset_config)
    columns = _text_columns(data, raw["train"].column_names, "train")
    frames = {name: _frame(split, columns, data.label_column, f"{data.dataset} ({name} split)")
              for name, split in raw.items()}
    train, dev, dev_split = frames["train"], frames.get("dev"), "validation"
    if dev is None:
        train, dev = _carve_dev(train)
        dev_split = f"carved from train ({CARVED_DEV_FRACTION:.0%} of each class, seed {CARVED_DEV_SEED})"
    train, dev, names = _label_ids((train, dev), raw["train"].features.get(data.label_column), data.dataset)
    return Splits(train, dev, names, source, dev_split)


def _load_raw(dataset: str, config_name: str | None) -> tuple[dict[str, Any], str]:
    """``{"train": ..., ["dev": ...]}`` ``datasets`` splits of a local file or folder, or of a hub dataset."""
    from datasets import load_dataset

    path = Path(dataset)
    if path.exists():
        files = _local_files(path)
        builder, options = LOCAL_FORMATS[files["train"].suffix.lower()]
        try:
            with datasets_bars_off():  # "Generating train split" over a file of a few hundred rows says nothing
                loaded = load_dataset(builder, data_files={k: str(v) for k, v in files.items()}, **options)
        except Exception as error:  # a malformed file: datasets' parsers raise many kinds, each spanning lines
            raise ValueError(f"dataset {dataset}: cannot read it as {builder}: {_first_line(error)}") from None
        return dict(loaded), str(path.absolute())
    if path.suffix.lower() in LOCAL_FORMATS or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise FileNotFoundError(f"dataset file {dataset} does not exist")
    if _hub_offline():
        raise ValueError(f"dataset {dataset!r} is not a local file or folder, and Hugging Face offline mode is on "
                         "(HF_HUB_OFFLINE): give a local CSV/TSV/JSON Lines/Parquet file or folder instead")
    try:
        with datasets_bars_off():
            loaded = load_dataset(dataset, config_name)
    except (ConnectionError, OSError, ValueError) as error:
        raise ValueError(f"dataset {dataset!r}: cannot load it from the Hugging Face hub: {_first_line(error)}") from None
    dev = next((name for name in DEV_SPLIT_NAMES if name in loaded), None)
    if "train" not in loaded:
        raise ValueError(f"dataset {dataset!r} has no train split (it has {', '.join(loaded)})")
    name = f"{dataset}/{config_name}" if config_name else dataset
    return {"train": loaded["train"], **({"dev": loaded[dev]} if dev else {})}, f"{name} (Hugging Face hub)"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _local_files(path: Path) -> dict[str, Path]:
    """A file is the train split; a folder's ``train.<ext>`` and ``validation``/``dev``/``valid`` ``.<ext>``."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(f"dataset file {path}: unknown format {path.suffix!r}; use one of "
                             f"{', '.join(LOCAL_FORMATS)}")
        return {"train": path}
    found = {p.stem.lower(): p for p in sorted(path.iterdir()) if p.suffix.lower() in LOCAL_FORMATS}
    if "train" not in found:
        raise FileNotFoundError(f"dataset folder {path} has no train file (train{', train'.join(LOCAL_FORMATS)})")
    dev = next((found[name] for name in DEV_SPLIT_NAMES if name in found), None)
    return {"train": found["train"], **({"dev": dev} if dev else {})}


def _text_columns(data: DataConfig, columns: Sequence[str], split: str) -> tuple[str, ...]:
    """The text column(s) to read: as configured, else ``text`` or ``sentence``; checked against ``columns``."""
    wanted = data.text_column or next(((c,) for c in ("text", "sentence") if c in columns), None)
    if wanted is None:
        raise ValueError(f"dataset {data.dataset} ({split} split): no 'text' or 'sentence' column (columns: "
                         f"{', '.join(columns)}); name the text column(s) with text_column")
    for column in (*wanted, data.label_column):
        if column not in columns:
            raise ValueError(f"dataset {data.dataset} ({split} split): no column {column!r} (columns: "
                             f"{', '.join(columns)})")
    return tuple(wanted)


def _frame(split, text_columns: tuple[str, ...], label_column: str, where: str) -> pd.DataFrame:
    """``sentence`` [``sentence2``] and the raw ``label`` of one split; an empty text or label is refused."""
    frame = split.to_pandas()
    missing = [c for c in (*text_columns, label_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"dataset {where}: no column {missing[0]!r} (columns: {', '.join(frame.columns)})")
    out = pd.DataFrame({name: frame[column] for name, column in zip(("sentence", "sentence2"), text_columns)})
    for name, column in zip(out.columns, text_columns):
        empty = out[name].isna() | (out[name].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"dataset {where}: row {int(np.flatnonzero(empty)[0]) + 1}: empty text in column "
                             f"{column!r}")
        out[name] = out[name].astype(str).str.rstrip()  # trailing whitespace, as the SST-2 loader drops it
    if frame[label_column].isna().any():
        row = int(np.flatnonzero(frame[label_column].isna())[0]) + 1
        raise ValueError(f"dataset {where}: row {row}: no label in column {label_column!r}")
    return out.assign(label=frame[label_column].to_numpy())


def _label_ids(frames: tuple[pd.DataFrame, pd.DataFrame], feature,
               dataset: str) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """(train, dev) with labels as ids ``0..K-1``, and the K class names in that order: a ``ClassLabel``'s names
    (its ids kept), else the train labels sorted (numbers as numbers). One class, or a validation label train
    never has, is refused."""
    if getattr(feature, "names", None):
        values = list(range(len(feature.names)))
        names = tuple(feature.names)
    else:
        try:
            values = sorted(frames[0]["label"].unique().tolist())
        except TypeError:
            raise ValueError(f"dataset {dataset}: labels mix numbers and text; use one kind") from None
        names = tuple(str(v) for v in values)
    if frames[0]["label"].nunique() < 2:
        raise ValueError(f"dataset {dataset}: every train row has label {frames[0]['label'].iloc[0]!r}: a "
                         "classifier needs two or more classes")
    index = {value: i for i, value in enumerate(values)}
    out = []
    for frame, split in zip(frames, ("train", "validation")):
        unknown = [v for v in frame["label"].unique().tolist() if v not in index]
        if unknown:
            raise ValueError(f"dataset {dataset}: {split} label {unknown[0]!r} is not a train label "
                             f"({', '.join(names)})")
        out.append(frame.assign(label=frame["label"].map(index).astype(np.int64)))
    return out[0], out[1], names


def _carve_dev(train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rest of train, a seeded stratified ``CARVED_DEV_FRACTION`` of it, at least one row per class)."""
    rng = np.random.default_rng(CARVED_DEV_SEED)
    labels = train["label"].astype(str).to_numpy()
    chosen = np.zeros(len(train), dtype=bool)
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        chosen[rng.choice(rows, size=max(1, round(CARVED_DEV_FRACTION * len(rows))), replace=False)] = True
    return train[~chosen].reset_index(drop=True), train[chosen].reset_index(drop=True)
