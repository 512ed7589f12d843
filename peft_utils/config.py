"""One typed configuration from the notebook's parameters cell to the run record.

An experiment is an :class:`ExperimentConfig`: the model, the methods and seeds, per-method learning rates, and five
parts — :class:`DataConfig`, :class:`AdapterSettings`, :class:`TrainConfig`, :class:`SweepConfig`,
:class:`TuneConfig`. The profiles
(``full``, ``cpu``, ``smoke``) are instances of it. Users change it through flat *parameters* (``rank=16``,
``lr={"lora": 5e-4}``, ``train_size="all"``): :data:`PARAMETERS` lists each one once, with its help text, its
command-line spelling and the check that validates it, and from that one table come

- :func:`make_config` (the notebook and the Python API),
- every ``python -m peft_utils.experiment`` flag (:func:`add_cli_arguments`),
- the values ``make run`` gives the notebook's parameters cell for a profile (:func:`notebook_values`),

so the three cannot drift apart. Every value is checked when the configuration is made, before anything loads or
trains: a typo costs a one-line error, not a finished full fine-tuning run followed by a crash.
"""
from __future__ import annotations

import argparse
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .methods import METHOD_NAMES, get_method

ALL_ROWS = "all"  # spelling of "every row of the split" (None already means "keep the profile's value")
TUNE = "tune"  # lr="tune": each method's rate is chosen from its lr_grid on held-out train rows
PROFILE_NAMES = ("full", "cpu", "smoke")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The row counts a profile sets, which planning fits to the data when the user left them to the profile.
SIZE_PARAMETERS = ("train_size", "eval_size", "sweep_train_size", "tune_train_size", "tune_holdout_size")


# ------------------------------------------------------------------------------------------------ checks
# Each check takes the parameter's name (for the message) and a user value, and returns the normalised value.


def check_positive_int(name: str, value: Any) -> int:
    """A positive int; ``True`` and ``2.5`` are refused (``int()`` would silently turn them into 1 and 2)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else check_positive_int(name, value)


def _number(name: str, value: Any, what: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_positive_number(name: str, value: Any) -> float:
    return _number(name, value, "a positive number", lambda v: v > 0)


def check_fraction(name: str, value: Any) -> float:
    """A probability-like setting in [0, 1): dropout, warm-up share."""
    return _number(name, value, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _non_negative_number(name: str, value: Any) -> float:
    return _number(name, value, "a number >= 0", lambda v: v >= 0)


def _optional_positive_number(name: str, value: Any) -> float | None:
    return None if value is None else check_positive_number(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _optional_path(name: str, value: Any) -> str | None:
    """A folder, or ``None``; ``""`` counts as not set (papermill and Make pass empty strings for "unset")."""
    return None if value in (None, "") else _text(name, value)


def _text_columns(name: str, value: Any) -> tuple[str, ...]:
    """One column name, or two (a sentence pair, such as premise and hypothesis)."""
    columns = tuple(_text(name, v) for v in _as_list(name, value))
    if len(columns) > 2:
        raise ValueError(f"{name} takes one column, or two for sentence pairs; got {len(columns)}: {columns}")
    return columns


def _as_list(name: str, value: Any) -> list[Any]:
    """One value, or a list/tuple of them; an empty list is an error (it would silently mean "run nothing")."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name} is empty: give at least one value")
    return items


def _unique(name: str, items: Sequence[Any]) -> tuple[Any, ...]:
    repeated = sorted({repr(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(repeated)} more than once")
    return tuple(items)


def check_methods(name: str, value: Any) -> tuple[str, ...]:
    """A method name (one method) or a list of them; unknown names and repeats are errors."""
    return _unique(name, [get_method(m).name for m in _as_list(name, value)])


def _seeds(name: str, value: Any) -> tuple[int, ...]:
    seeds = [value] if not isinstance(value, (list, tuple)) else list(value)
    if not seeds:
        raise ValueError(f"{name} is empty: give at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"{name} must be non-negative integers, got {seed!r}")
    return _unique(name, [int(s) for s in seeds])


def _optional_seeds(name: str, value: Any) -> tuple[int, ...] | None:
    return None if value is None else _seeds(name, value)


def check_rows(name: str, value: Any) -> int | None:
    """A row count, or ``"all"`` -> ``None`` (every row of the split)."""
    if value == ALL_ROWS:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive number of rows or 'all', got {value!r}")
    return int(value)


def _module_names(name: str, value: Any) -> tuple[str, ...] | None:
    """Module-name suffixes (``"pooler"``, ``["pooler"]``), or ``None``/``[]`` for none."""
    if value is None or value == [] or value == ():
        return None
    return _unique(name, [_text(name, item) for item in _as_list(name, value)])


def _targets(name: str, value: Any) -> str | tuple[str, ...] | None:
    """One target set: ``None`` (the model's default), a preset, a regex, or module-name suffixes, read as the core
    reads them (``core.targets.parse_targets``): a regex that does not compile is refused here, before any model
    loads.

    One suffix given as a string (``"c_attn"``) is recorded as a list of one, so ``--targets c_attn`` and
    ``targets=["c_attn"]`` are the same setting in a run's identity."""
    from .core.targets import parse_targets

    if value is None or isinstance(value, str) and value:
        parsed = parse_targets(value, name)
        return parsed if isinstance(parsed, tuple) else value
    items = _as_list(name, value)
    if not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"{name} must be a preset, a regex or a list of module names, got {value!r}")
    return parse_targets(items, name)


def _target_sets(name: str, value: Any) -> tuple[str | tuple[str, ...] | None, ...]:
    """The target sets every adapter method runs on: an axis of the experiment, like its methods.

    One set (``None``, ``"all-linear"``, ``["query", "value"]``, a regex), or several: a list of presets
    (``["attn", "all-linear"]``) or a list of sets (``[["query", "value"], "all-linear"]``). A flat list mixing
    presets with module names could mean either, so it is refused."""
    from .core.targets import MODEL_PRESETS

    if not isinstance(value, (list, tuple)) or not value:
        return (_targets(name, value),)
    is_set = [item is None or item in MODEL_PRESETS or isinstance(item, (list, tuple)) for item in value]
    if not any(is_set):
        return (_targets(name, value),)
    if not all(is_set):
        sets = [repr(i) for i, whole in zip(value, is_set) if whole]
        names = [repr(i) for i, whole in zip(value, is_set) if not whole]
        raise ValueError(f"{name} mixes target sets ({', '.join(sets)}) with module names ({', '.join(names)}): "
                         "give several sets as a list of sets, e.g. [['query', 'value'], 'all-linear']")
    return _unique(name, [_targets(f"{name}[{index}]", item) for index, item in enumerate(value)])


def _sentences(name: str, value: Any) -> tuple[str, ...]:
    items = _as_list(name, value)
    if not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError(f"{name} must be non-empty strings, got {value!r}")
    return tuple(items)


def _ranks(name: str, value: Any) -> tuple[int, ...]:
    return _unique(name, [check_positive_int(name, r) for r in _as_list(name, value)])


def _ratios(name: str, value: Any) -> tuple[float, ...]:
    return _unique(name, [check_positive_number(name, r) for r in _as_list(name, value)])


def _precision(name: str, value: Any) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")
    return value


def _device(name: str, value: Any) -> str:
    text = _text(name, value)
    if text not in DEVICES and not text.startswith("cuda:"):
        raise ValueError(f"{name} must be one of {DEVICES} or 'cuda:<index>', got {value!r}")
    return text


def check_lr(name: str, value: Any) -> float | dict[str, float] | str:
    """One learning rate for every method, ``{method: rate}`` (keys must be known methods: typos are errors), or
    ``"tune"``."""
    if value == TUNE:
        return TUNE
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{name} is an empty dict: give a rate for at least one method")
        _check_method_keys(name, value)
        return {m: check_positive_number(f"{name}[{m!r}]", r) for m, r in value.items()}
    return check_positive_number(name, value)


def _check_method_keys(name: str, value: Mapping) -> None:
    """Refuse a per-method dict whose keys include an unknown method: a typo would otherwise be silently ignored."""
    unknown = [m for m in value if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"{name} names unknown method(s) {', '.join(map(repr, unknown))}; choose from {METHOD_NAMES}")


def _lr_grid(name: str, value: Any) -> dict[str, tuple[float, ...]]:
    """``{method: [rate, ...]}``: at least two distinct rates per method, else there is nothing to choose from."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} must be a dict of method -> list of rates, e.g. {{'lora': [1e-3, 3e-3]}}, "
                         f"got {value!r}")
    _check_method_keys(name, value)
    grid = {}
    for method, rates in value.items():
        rates = _unique(f"{name}[{method!r}]", [check_positive_number(f"{name}[{method!r}]", r)
                                                for r in _as_list(name, rates)])
        if len(rates) < 2:
            raise ValueError(f"{name}[{method!r}] has {len(rates)} rate: give at least two to choose from")
        grid[method] = tuple(sorted(rates))
    return grid


def _optional_rows(name: str, value: Any) -> int | None:
    """A row count, or ``None`` (the comparison's train rows)."""
    return None if value is None else check_positive_int(name, value)


# ------------------------------------------------------------------------------------------------ the parts


@dataclass(frozen=True)
class DataConfig:
    """Which rows: ``train_size`` / ``eval_size`` ``None`` = every row of the split.

    A train size draws a class-balanced subset seeded by the run seed; an eval size a fixed subset of dev, the same
    for every run, so that every run is scored on the same sentences.
    """

    data_dir: str | None = None
    train_size: int | None = None
    eval_size: int | None = None
    # "sst2", a local CSV/TSV/JSON Lines/Parquet file or folder, or a hub dataset id (see data.load_splits)
    dataset: str = "sst2"
    dataset_config: str | None = None  # a hub dataset's configuration name ("sst2" of "glue")
    text_column: tuple[str, ...] | None = None  # one column, or two for sentence pairs; None: "text" or "sentence"
    label_column: str = "label"


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter every LoRA-family method injects: ``y = W0 x + (alpha / rank) · B A dropout(x)``
    (``rslora``: ``alpha / sqrt(rank)``, set by the sweep's ``rslora`` option)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None
    rslora: bool = False
    # modules trained in full beside the adapters and the classification head (peft's modules_to_save), e.g.
    # ("pooler",): BERT's pooler, which full fine-tuning trains and a frozen adapter run would not; None: the head only
    modules_to_save: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings, the same for every method (learning rate and seed are per run).

    ``batch_size`` is the global batch: the rows of one optimiser step, over every process and accumulation step
    (each process computes ``batch_size / (processes x grad_accum_steps)`` rows at a time), so that a run means
    the same experiment on one CPU or eight GPUs.
    ``eval_every``: also evaluate every that many optimiser steps (``None``: only at the end of each epoch).
    ``device``: ``"auto"`` picks CUDA when available. ``precision``: the autocast dtype (``"auto"``: bf16 on GPUs
    with native bf16, fp16 with loss scaling on older GPUs, fp32 on CPU; see ``devices.compute_dtype_for``).
    ``log_every``: steps averaged into one ``step`` event.
    ``eval_batch_size``: ``None`` uses ``2 * batch_size`` (no activations are kept for backward in evaluation).
    """

    epochs: int = 1
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    max_length: int = 128
    eval_every: int | None = None
    gradient_checkpointing: bool = False
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    bucket_by_length: bool = False
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            parameter = PARAMETER_BY_FIELD.get(("train", item.name))
            if parameter is not None:
                parameter.check(f"TrainConfig.{item.name}", getattr(self, item.name))


@dataclass(frozen=True)
class SweepConfig:
    """The LoRA rank x alpha grid, in alpha/rank ratios: at a fixed ratio the update keeps its scale.

    ``train_size``: train rows of each grid run (``None``: the comparison's), so that a grid of 28 runs fits a
    CPU budget. ``rslora``: scale the update by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``.
    """

    enabled: bool = False
    ranks: tuple[int, ...] = (2, 8, 32)
    alpha_ratios: tuple[float, ...] = (1.0,)
    train_size: int | None = None
    rslora: bool = False


@dataclass(frozen=True)
class TuneConfig:
    """Learning-rate tuning, on when ``lr="tune"``.

    Why: one fixed rate for every method favours whichever method it happens to suit. Each method trains once per
    rate of its ``grid`` and tuning seed (``seeds``; ``None``: the comparison's first seed), on ``train_size`` rows
    with the comparison's schedule, and is scored on ``holdout_size`` *other* rows of the train split; the rate
    with the best mean over the tuning seeds is then used for every seed (several seeds: a choice that does not
    hinge on one seed's luck). The dev split, which the comparison reports, takes no part in the choice.
    ``train_size`` ``None``: the comparison's train size, less the held-out rows when that is the whole split.
    """

    enabled: bool = False
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    train_size: int | None = None
    holdout_size: int = 2000
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides an experiment's results, validated (see :func:`make_config`)."""

    profile: str
    model: str
    methods: tuple[str, ...]
    lr: dict[str, float]
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    # The target sets every adapter method runs on (``None``: the model's default layers): an axis of the
    # experiment, so each holds its own targets and ``adapter.targets`` is left unset (see ``adapters``).
    targets: tuple[str | tuple[str, ...] | None, ...] = (None,)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    results_dir: str = "results"
    imgs_dir: str | None = None
    report_to: tuple[str, ...] = ()  # experiment trackers (peft_utils.trackers): how runs are watched, not what
    sentences: tuple[str, ...] = (
        "A gripping, beautifully acted film.", "The plot is thin and the jokes fall flat.",
        "Not the best film of the year, but far from the worst.",
    )
    # Which sizes (:data:`SIZE_PARAMETERS`) the user left to the profile: planning fits those to the data
    # (``experiment._fitted_sizes``: every row of a smaller split; stratified where no balanced subset exists),
    # and refuses in one line a size the user set that the data cannot meet. make_config fills it; the sizes a run
    # used are in its record (``train_size``, ``eval_size``: row counts), so neither field is part of a result.
    adaptable_sizes: frozenset[str] = field(default=frozenset(), compare=False)
    # The sizes planning draws stratified (each class in proportion) because no balanced subset meets them.
    stratified_sizes: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def figures_dir(self) -> str:
        """Where figures go: ``imgs_dir``, else ``<results_dir>/imgs`` (never the committed ``imgs/`` by accident)."""
        return self.imgs_dir or str(Path(self.results_dir) / "imgs")

    def __post_init__(self) -> None:
        if self.adapter.targets is not None:
            raise ValueError("ExperimentConfig takes its target sets as targets=(...), not adapter.targets: an "
                             "experiment may compare several")

    @property
    def adapters(self) -> tuple[AdapterSettings, ...]:
        """The adapter settings of each target set, in the order ``targets`` lists them."""
        return tuple(replace(self.adapter, targets=targets) for targets in self.targets)

    def method_lr(self, method: str) -> float:
        return self.lr[method]


# ------------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Parameter:
    """One user-facing setting: where it lives in :class:`ExperimentConfig`, its help, its check, its CLI form."""

    name: str
    part: str  # "" for a top-level field, else the attribute of the part ("data", "adapter", "train", "sweep")
    field: str
    help: str
    check: Callable[[str, Any], Any]
    cli: dict[str, Any] = field(default_factory=dict)  # argparse keywords (type, nargs, action)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _lr_tokens(tokens: Sequence[str]) -> float | dict[str, float]:
    """``--lr 2e-4`` (every method) or ``--lr lora=5e-4 full=2e-5``."""
    if len(tokens) == 1 and "=" not in tokens[0]:
        return _float_token(tokens[0])
    rates = {}
    for token in tokens:
        method, sep, rate = token.partition("=")
        if not sep:
            raise ValueError(f"--lr takes one rate or method=rate pairs, got {' '.join(tokens)!r}")
        rates[method] = _float_token(rate)
    return rates


def _float_token(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"expected a number, got {token!r}") from None


def _rows_token(token: str) -> int | str:
    if token == ALL_ROWS:
        return token
    try:
        return int(token)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'all', got {token!r}") from None


def _lr_tokens_or_tune(tokens: Sequence[str]) -> float | dict[str, float] | str:
    return TUNE if list(tokens) == [TUNE] else _lr_tokens(tokens)


def _lr_grid_tokens(tokens: Sequence[str]) -> dict[str, list[float]]:
    """``--lr-grid lora=1e-3,3e-3 full=3e-5,1e-4``."""
    grid = {}
    for token in tokens:
        method, sep, rates = token.partition("=")
        if not sep:
            raise ValueError(f"--lr-grid takes method=rate,rate,... pairs, got {token!r}")
        grid[method] = [_float_token(r) for r in rates.split(",") if r]
    return grid


def _targets_tokens(tokens: Sequence[str]) -> str | list[Any]:
    """One token: a preset, a module-name suffix or a regex, as in the notebook; several: module-name suffixes (one
    set) or presets (several sets); a token with commas is one set of suffixes (``--targets query,value all-linear``)."""
    if len(tokens) == 1 and "," not in tokens[0]:
        return tokens[0]
    if any("," in token for token in tokens):
        return [[s for s in token.split(",") if s] if "," in token else token for token in tokens]
    return list(tokens)


def _report_to(name: str, value: Any) -> tuple[str, ...]:
    """Tracker names accelerate supports and finds installed (imported here: config.py imports only methods.py)."""
    from .trackers import check_report_to

    return check_report_to(name, value)


_BOOL = {"action": argparse.BooleanOptionalAction}
_LIST = {"nargs": "+"}

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("model", "", "model", "hub id, local folder, 'minilm' or 'random-gpt2-<size>'", _text),
    Parameter("methods", "", "methods", "methods to compare, e.g. ['full', 'lora', 'dora', 'qlora', 'qdora']",
              check_methods, {"nargs": "+", "choices": METHOD_NAMES}),
    Parameter("rank", "adapter", "rank", "LoRA/DoRA rank r", check_positive_int, {"type": int}),
    Parameter("alpha", "adapter", "alpha", "scaling numerator: the update is (alpha / r) * B A",
              check_positive_number, {"type": float}),
    Parameter("dropout", "adapter", "dropout", "dropout on the adapter input, in [0, 1)", check_fraction,
              {"type": float}),
    Parameter("targets", "", "targets",
              "layers: a preset ('attn', 'attn-all', 'all-linear'), module-name suffixes or a regex; several sets "
              "compare them: ['attn', 'all-linear']",
              _target_sets, {"nargs": "+", "type": str, "post": _targets_tokens}),
    Parameter("modules_to_save", "adapter", "modules_to_save",
              "modules trained in full beside adapters and head, e.g. ['pooler'] (None: the head only)",
              _module_names, {"nargs": "+", "type": str}),
    Parameter("epochs", "train", "epochs", "passes over the train rows", check_positive_int, {"type": int}),
    Parameter("batch_size", "train", "batch_size", "rows per optimiser step, over all processes (global batch)",
              check_positive_int, {"type": int}),
    Parameter("lr", "", "lr", "one rate, per method {'full': 2e-5, 'lora': 2e-4}, or 'tune' (best of lr_grid)",
              check_lr, {"nargs": "+", "type": str, "post": _lr_tokens_or_tune}),
    Parameter("lr_grid", "tune", "grid", "rates lr 'tune' tries per method, e.g. {'lora': [1e-3, 3e-3]}",
              _lr_grid, {"nargs": "+", "type": str, "post": _lr_grid_tokens}),
    Parameter("tune_train_size", "tune", "train_size", "train rows per tuning run (None: the comparison's)",
              _optional_rows, {"type": int}),
    Parameter("tune_holdout_size", "tune", "holdout_size", "held-out train rows that score each tuning run",
              check_positive_int, {"type": int}),
    Parameter("tune_seeds", "tune", "seeds", "seeds of the tuning runs; the best mean rate wins (None: the first seed)",
              _optional_seeds, {"nargs": "+", "type": int}),
    Parameter("max_length", "train", "max_length", "tokens per sentence (longer ones are truncated)",
              check_positive_int, {"type": int}),
    Parameter("train_size", "data", "train_size", "SST-2 train rows (a balanced subset), or 'all' (67,349)",
              check_rows, {"type": _rows_token}),
    Parameter("eval_size", "data", "eval_size", "dev rows, or 'all' (872)", check_rows, {"type": _rows_token}),
    Parameter("seeds", "", "seeds", "one run per seed and method: [0, 1, 2] gives error bars", _seeds,
              {"nargs": "+", "type": int}),
    Parameter("sweep", "sweep", "enabled", "also run the LoRA rank x alpha grid", _flag, _BOOL),
    Parameter("sweep_ranks", "sweep", "ranks", "the grid's ranks, e.g. [2, 4, 8, 16]", _ranks,
              {"nargs": "+", "type": int}),
    Parameter("sweep_alpha_ratios", "sweep", "alpha_ratios", "the grid's alpha / r values, e.g. [1, 2]", _ratios,
              {"nargs": "+", "type": float}),
    Parameter("sweep_train_size", "sweep", "train_size", "train rows per grid run (None: the comparison's)",
              _optional_rows, {"type": int}),
    Parameter("sweep_rslora", "sweep", "rslora", "grid with rsLoRA scaling alpha / sqrt(r)", _flag, _BOOL),
    Parameter("dataset", "data", "dataset", "'sst2', a CSV/TSV/JSONL/Parquet file or folder, or a hub dataset id",
              _text),
    Parameter("dataset_config", "data", "dataset_config", "a hub dataset's configuration name", _optional_path),
    Parameter("text_column", "data", "text_column", "the text column, or two for sentence pairs (None: text)",
              _text_columns, {"nargs": "+"}),
    Parameter("label_column", "data", "label_column", "the label column (numbers or names)", _text),
    Parameter("data_dir", "data", "data_dir",
              "folder holding sst2/ and gpt2-tokenizer/ (or sst2/ itself); None: $PEFT_LAB_DATA, else the hub",
              _optional_path),
    Parameter("results_dir", "", "results_dir", "run records go here; None: results/<profile>", _optional_path),
    Parameter("imgs_dir", "", "imgs_dir", "figures go here; None: <results_dir>/imgs", _optional_path),
    Parameter("sentences", "", "sentences", "your own sentences, classified by every method's saved result",
              _sentences, {"nargs": "+"}),
    Parameter("report_to", "", "report_to",
              "experiment trackers, e.g. 'tensorboard' (logs in <results_dir>/runs) or ['tensorboard', 'mlflow']",
              _report_to, _LIST),
    Parameter("weight_decay", "train", "weight_decay", "AdamW decoupled weight decay (matrices only)",
              _non_negative_number, {"type": float}),
    Parameter("warmup_ratio", "train", "warmup_ratio", "share of steps with a linear warm-up", check_fraction,
              {"type": float}),
    Parameter("max_grad_norm", "train", "max_grad_norm", "gradient clipping norm (None: no clipping)",
              _optional_positive_number, {"type": float}),
    Parameter("grad_accum_steps", "train", "grad_accum_steps", "micro-batches per optimiser step and process",
              check_positive_int, {"type": int}),
    Parameter("eval_every", "train", "eval_every", "also evaluate every N optimiser steps",
              _optional_positive_int, {"type": int}),
    Parameter("gradient_checkpointing", "train", "gradient_checkpointing",
              "recompute activations in backward (less memory, more time)", _flag, _BOOL),
    Parameter("device", "train", "device", "'auto' (CUDA when available), 'cpu' or 'cuda[:i]'", _device),
    Parameter("precision", "train", "precision",
              "'auto' (GPU: bf16, or fp16 + loss scaling before Ampere; CPU: fp32) | 'fp32' | 'bf16' | 'fp16'",
              _precision, {"choices": PRECISIONS}),
    Parameter("log_every", "train", "log_every", "optimiser steps averaged into one logged loss",
              check_positive_int, {"type": int}),
    Parameter("bucket_by_length", "train", "bucket_by_length", "batch sentences of similar length (less padding)",
              _flag, _BOOL),
    Parameter("eval_batch_size", "train", "eval_batch_size", "rows per evaluation batch (None: 2 x batch_size)",
              _optional_positive_int, {"type": int}),
)
PARAMETER_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMETERS)
# make_config's keywords: what the notebook takes, in its parameters cell or from papermill (-p weight_decay 0.1
# too: a parameter left out of the cell is still a parameter).
CONFIG_NAMES: tuple[str, ...] = ("profile", *PARAMETER_NAMES)
PARAMETER_BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}
PARAMETER_BY_FIELD: dict[tuple[str, str], Parameter] = {(p.part, p.field): p for p in PARAMETERS}


def check_parameter_names(names: Iterable[str], known: Sequence[str] = PARAMETER_NAMES) -> None:
    """Refuse every name that is not in ``known``, suggesting the closest known one (``rnak``: did you mean
    ``rank``?). Why: a misspelt name is otherwise dropped without a word (papermill makes it one more unused
    variable) and the profile's value trains instead of the one asked for."""
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    if not unknown:
        return
    close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
    listed = ", ".join(f"{n!r} (did you mean {c[0]!r}?)" if c else repr(n) for n, c in close.items())
    raise ValueError(f"unknown parameter(s) {listed}" + ("" if all(close.values()) else f"; known: {', '.join(known)}"))


# ------------------------------------------------------------------------------------------------ profiles

# Learning rates: ~2e-5 is the usual full fine-tuning rate for GPT-2/BERT-size models; adapters move far fewer
# weights from a zero update and take ~10x more (2e-4: LoRA and QLoRA papers; DoRA uses LoRA's settings).
_GPU_LR = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "qdora": 2e-4}
# MiniLM on a CPU: the rates the all-linear study chose on held-out train rows over two seeds (full 1e-4 of 5e-5 /
# 1e-4 / 2e-4; every adapter 1e-3 of 5e-4 to 4e-3: docs/results.md), so that the cpu profile is a small version of
# the headline experiment.
_CPU_LR = {"full": 1e-4, "lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "qdora": 1e-3}
# lr="tune" grids around each rate above (full fine-tuning moves pretrained weights, adapters start from a zero
# update: their grids sit ~10x apart); a winner on an edge widens its grid (experiment.widened_grid).
_ADAPTER_METHODS = tuple(m for m in METHOD_NAMES if get_method(m).adapter)
_GPU_GRID = {"full": (1e-5, 3e-5, 1e-4), **dict.fromkeys(_ADAPTER_METHODS, (1e-4, 3e-4, 1e-3))}
_CPU_GRID = {"full": (5e-5, 1e-4, 2e-4), **dict.fromkeys(_ADAPTER_METHODS, (5e-4, 1e-3, 2e-3, 4e-3))}
# The rank x alpha map: ranks 1-64 x alpha/r 0.5-4 (28 LoRA runs).
_RANKS = (1, 2, 4, 8, 16, 32, 64)
_ALPHA_RATIOS = (0.5, 1.0, 2.0, 4.0)

PROFILES: dict[str, ExperimentConfig] = {
    # GPT-2 Large on all of SST-2, on a GPU: the real comparison.
    "full": ExperimentConfig(
        profile="full", model="openai-community/gpt2-large", methods=METHOD_NAMES, lr=_GPU_LR,
        adapter=AdapterSettings(rank=8, alpha=16.0, dropout=0.05),
        train=TrainConfig(batch_size=16, max_length=128, eval_every=1000, device="cuda", log_every=10,
                          bucket_by_length=True),
        # On a quarter of the train split: 28 runs of GPT-2 Large on all of it would cost 7 comparisons.
        sweep=SweepConfig(enabled=True, ranks=_RANKS, alpha_ratios=_ALPHA_RATIOS, train_size=16000),
        tune=TuneConfig(grid=_GPU_GRID, train_size=16000),
        results_dir="results/full",
    ),
    # The headline experiment, small: the pretrained all-MiniLM-L6-v2 on a balanced 4,000-row subset (not 67,349),
    # one seed (not three), adapters on every linear layer at the study's rates, scored on the whole dev set.
    "cpu": ExperimentConfig(
        profile="cpu", model="minilm", methods=("full", "lora", "dora", "qlora"), lr=_CPU_LR,
        data=DataConfig(train_size=4000), targets=("all-linear",),
        adapter=AdapterSettings(rank=8, alpha=16.0, dropout=0.05),
        train=TrainConfig(batch_size=16, max_length=64, eval_every=125, device="cpu", log_every=5,
                          bucket_by_length=True),
        # 28 runs of 2,000 rows (125 steps each).
        sweep=SweepConfig(enabled=True, ranks=_RANKS, alpha_ratios=_ALPHA_RATIOS, train_size=2000),
        tune=TuneConfig(grid=_CPU_GRID),
        results_dir="results/cpu",
    ),
    # A tiny random GPT-2 (real tokenizer) on a few dozen rows: checks the plumbing in seconds.
    "smoke": ExperimentConfig(
        profile="smoke", model="random-gpt2-tiny", methods=METHOD_NAMES, lr=dict.fromkeys(METHOD_NAMES, 1e-3),
        data=DataConfig(train_size=32, eval_size=32),
        adapter=AdapterSettings(rank=4, alpha=8.0, dropout=0.0),
        train=TrainConfig(batch_size=8, max_length=32, warmup_ratio=0.0, log_every=1),
        sweep=SweepConfig(enabled=True, ranks=(2, 4), alpha_ratios=(1.0, 2.0)),
        tune=TuneConfig(grid=dict.fromkeys(METHOD_NAMES, (1e-3, 1e-2)), holdout_size=16),
        results_dir="results/smoke",
    ),
}


def resolve_profile(profile: str = "auto") -> str:
    """``"auto"`` -> ``"full"`` with a CUDA GPU, else ``"cpu"``; any other name is checked and returned."""
    if profile == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose 'auto' or one of {tuple(PROFILES)}")
    return profile


def make_config(profile: str = "auto", **parameters: Any) -> ExperimentConfig:
    """The profile's configuration with ``parameters`` applied and every value checked.

    ``None`` keeps the profile's value (the notebook's and the CLI's "not set"); ``train_size="all"`` asks for
    every row; a row count kept so is fitted to the data when the experiment is planned (``adaptable_sizes``).
    A dict ``lr`` is merged into the profile's per-method rates; a float replaces them all.
    Unknown parameter names are errors (naming the closest known one), as are values of the wrong type or range
    (see :data:`PARAMETERS`) and settings given that this configuration would never read (an ``lr_grid`` without
    ``lr="tune"``, ``sweep_ranks`` with ``sweep=False``...: :func:`_refuse_settings_without_effect`).
    """
    base = PROFILES[resolve_profile(profile)]
    check_parameter_names(parameters)
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {"data": {}, "adapter": {}, "train": {}, "sweep": {}, "tune": {}}
    for name, value in parameters.items():
        if value is None:
            continue
        parameter = PARAMETER_BY_NAME[name]
        value = parameter.check(name, value)
        if name in ("data_dir", "results_dir", "imgs_dir") and value is None:
            continue  # "" means unset, like None
        (parts[parameter.part] if parameter.part else top)[parameter.field] = value
    if top.get("lr") == TUNE:
        del top["lr"]
        parts["tune"]["enabled"] = True
    elif "lr" in top:
        top["lr"] = {**base.lr, **top["lr"]} if isinstance(top["lr"], dict) else dict.fromkeys(METHOD_NAMES, top["lr"])
    if "grid" in parts["tune"]:
        parts["tune"]["grid"] = {**base.tune.grid, **parts["tune"]["grid"]}
    config = replace(base, **top, **{part: replace(getattr(base, part), **values) for part, values in parts.items()},
                     adaptable_sizes=frozenset(name for name in SIZE_PARAMETERS if parameters.get(name) is None))
    if config.tune.enabled:
        missing = [m for m in config.methods if m not in config.tune.grid]
        if missing:
            raise ValueError(f"lr='tune' but lr_grid has no rates for method(s) {', '.join(missing)}")
    else:
        missing = [m for m in config.methods if m not in config.lr]
        if missing:
            raise ValueError(f"lr has no rate for method(s) {', '.join(missing)}")
    changed = {name: value for name, value in parameters.items()
               if value is not None and _setting(config, name) != _setting(base, name)}
    _refuse_settings_without_effect(config, changed)
    return config


def _setting(config: ExperimentConfig, name: str) -> Any:
    """The value parameter ``name`` set in ``config``, as a user writes it: one target set as itself, not as an
    axis of one (``targets=None`` is ``config.targets == (None,)``)."""
    parameter = PARAMETER_BY_NAME[name]
    value = getattr(getattr(config, parameter.part) if parameter.part else config, parameter.field)
    return value[0] if name == "targets" and len(value) == 1 else value


def _refuse_settings_without_effect(config: ExperimentConfig, given: Mapping[str, Any]) -> None:
    """Refuse a setting the user changed (``given``: a value other than the profile's; the profile's own values,
    which the notebook's parameters cell shows, are never refused) that ``config`` never reads. Why: ``lr_grid`` without ``lr='tune'``, ``sweep_ranks`` with ``sweep=False`` or
    ``rank`` with only full fine-tuning would be ignored, and the results would look as if they had used it.

    ``methods`` and the sweep (LoRA) are what runs; the command line's ``--sweep-only`` is not known here."""
    adapters = any(get_method(m).adapter for m in config.methods)
    no_adapter = f"methods {list(config.methods)} include no adapter method"
    needs = (
        (("lr_grid", "tune_train_size", "tune_holdout_size", "tune_seeds"), config.tune.enabled, "unless lr='tune'"),
        (("sweep_ranks", "sweep_alpha_ratios", "sweep_train_size", "sweep_rslora"), config.sweep.enabled,
         "while the sweep is off (sweep=False)"),
        (("rank", "alpha"), adapters, f"here: {no_adapter} (the sweep sets its own)"),
        (("dropout", "targets", "modules_to_save"), adapters or config.sweep.enabled,
         f"here: {no_adapter} and the sweep is off"),
        (("dataset_config", "text_column", "label_column"), config.data.dataset != "sst2",
         "with dataset='sst2' (read from its own TSV files)"),
    )
    for names, used, why in needs:
        ignored = [name for name in names if name in given]
        if ignored and not used:
            raise ValueError(f"{ignored[0]} has no effect {why}; leave it out")
    running = set(config.methods) | ({"lora"} if config.sweep.enabled else set())
    for name in ("lr", "lr_grid"):
        rates = given.get(name)
        idle = [m for m in rates if m not in running] if isinstance(rates, Mapping) else []
        if idle:
            raise ValueError(f"{name} gives {', '.join(map(repr, idle))} a rate, but only {sorted(running)} run "
                             f"here; leave the others out")


# ------------------------------------------------------------------------------------------------ CLI / notebook


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter (``--rank``, ``--lr lora=5e-4``, ``--train-size all``, ``--no-sweep``...)."""
    for parameter in PARAMETERS:
        options = {k: v for k, v in parameter.cli.items() if k != "post"}
        parser.add_argument(parameter.flag, dest=parameter.name, default=None, help=parameter.help, **options)


def cli_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters given on the command line (``None``: not given), converted as the notebook would pass them."""
    given = {}
    for parameter in PARAMETERS:
        value = getattr(args, parameter.name)
        post = parameter.cli.get("post")
        given[parameter.name] = post(value) if post is not None and value is not None else value
    return given


# The notebook's parameters cell, in its order: what a reader changes, each a literal value (peft.ipynb).
NOTEBOOK_PARAMETERS = ("profile", "model", "methods", "targets", "rank", "alpha", "dropout", "lr", "train_size",
                       "epochs", "seeds", "sweep", "data_dir", "results_dir", "imgs_dir")


def notebook_values(profile: str) -> dict[str, Any]:
    """A profile's value of every name in the notebook's parameters cell, as one writes it there (``"all"`` rows,
    one target set as itself): what ``make run`` passes to papermill, so that the cell papermill adds under the
    notebook's own shows, literally, what trains. ``data_dir`` and ``imgs_dir`` are left to the caller."""
    config = PROFILES[resolve_profile(profile)]
    values = {name: _setting(config, name) for name in NOTEBOOK_PARAMETERS if name not in ("profile", "data_dir",
                                                                                         "imgs_dir")}
    values["train_size"] = ALL_ROWS if values["train_size"] is None else values["train_size"]
    values["lr"] = {method: values["lr"][method] for method in config.methods}
    return {"profile": config.profile, **values, "methods": list(values["methods"]), "seeds": list(values["seeds"])}


def config_record(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment-wide settings as flat parameter names (for display and for run records)."""
    record: dict[str, Any] = {"profile": config.profile}
    for parameter in PARAMETERS:
        record[parameter.name] = _setting(config, parameter.name)
    if config.tune.enabled:
        record["lr"] = TUNE
    return record


__all__ = [
    "ALL_ROWS", "TUNE", "SIZE_PARAMETERS", "DataConfig", "AdapterSettings", "TrainConfig", "SweepConfig",
    "TuneConfig", "ExperimentConfig", "Parameter",
    "PARAMETERS", "PARAMETER_NAMES", "CONFIG_NAMES", "PROFILES", "resolve_profile", "make_config",
    "check_parameter_names", "add_cli_arguments",
    "cli_parameters", "NOTEBOOK_PARAMETERS", "notebook_values", "config_record", "check_positive_int",
    "check_positive_number", "check_fraction", "check_rows", "check_methods", "check_lr",
]
