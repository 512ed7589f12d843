"""One typed configuration, :class:`ExperimentConfig`. Each flat user *parameter* (``rank=16``) is declared once, on
its field, with its check and help; the API, the CLI flags and the notebook's cell all come from that one table, so
they cannot drift apart, and every value is checked before anything loads: a typo costs one line, not a run."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from .core.settings import AdapterSettings
from .methods import METHOD_NAMES, get_method

ALL_ROWS = "all"  # every row of the split (None already means "keep the profile's value")
TUNE = "tune"  # lr="tune": each method's rate is chosen from its lr_grid on held-out train rows
DEVICES = ("auto", "cpu", "cuda")
# The row counts a profile sets, which planning fits to the data when the user left them to the profile.
SIZE_PARAMETERS = ("train_size", "eval_size", "sweep_train_size", "tune_train_size", "tune_holdout_size")
Check = Callable[[str, Any], Any]  # (parameter name for the message, user value) -> normalised value

# ------------------------------------------------------------------------------------------------ checks


def _number(name: str, value: Any, what: str, ok: Callable[[float], bool], kind: type = numbers.Real) -> Any:
    """A finite ``kind`` that is ``ok``: ``True`` and ``2.5`` are no integers (``int()`` would make them 1 and 2).
    Text that reads as a number (the command line's) is read."""
    for read in ((int, float) if kind is numbers.Integral else (float,)) if isinstance(value, str) else ():
        with contextlib.suppress(ValueError):
            value = read(value)
            break
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value) if kind is numbers.Integral else float(value)


_positive_int = partial(_number, what="a positive integer", ok=lambda v: v > 0, kind=numbers.Integral)
_seed = partial(_number, what="non-negative integers", ok=lambda v: v >= 0, kind=numbers.Integral)
_positive = partial(_number, what="a positive number", ok=lambda v: v > 0)
_fraction = partial(_number, what="a number in [0, 1)", ok=lambda v: 0 <= v < 1)
_non_negative = partial(_number, what="a number >= 0", ok=lambda v: v >= 0)


def _rows(name: str, value: Any) -> int | None:
    """A row count, or ``"all"`` -> ``None`` (every row of the split)."""
    return None if value == ALL_ROWS else _number(name, value, "a positive number of rows or 'all'", lambda v: v > 0,
                                                  numbers.Integral)


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    value = str(value) if isinstance(value, Path) else value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _unique(name: str, items: Sequence[Any]) -> tuple[Any, ...]:
    repeated = sorted({repr(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(repeated)} more than once")
    return tuple(items)


def _each(check: Check, unique: bool = True) -> Check:
    """One value or a list of them, each through ``check``; an empty list (it would silently mean "run nothing")
    and, where ``unique``, a repeat are errors."""
    def check_each(name: str, value: Any) -> tuple[Any, ...]:
        checked = [check(name, item) for item in (value if isinstance(value, (list, tuple)) else [value])]
        if not checked:
            raise ValueError(f"{name} is empty: give at least one value")
        return _unique(name, checked) if unique else tuple(checked)
    return check_each


def _columns(name: str, value: Any) -> tuple[str, ...]:
    """One text column, or two (a sentence pair, such as premise and hypothesis)."""
    columns = _each(_text)(name, value)
    if len(columns) > 2:
        raise ValueError(f"{name} takes one column, or two for sentence pairs; got {len(columns)}: {columns}")
    return columns


def _module_names(name: str, value: Any) -> tuple[str, ...] | None:
    """Module-name suffixes (``"pooler"``, ``["pooler"]``), or ``None``/``[]`` for none."""
    return None if value is None or isinstance(value, (list, tuple)) and not value else _each(_text)(name, value)


def _targets(name: str, value: Any) -> str | tuple[str, ...] | None:
    """One target set read as the core reads it (a bad regex is refused before any model loads); one suffix is kept
    as a list of one, so ``--targets c_attn`` and ``targets=["c_attn"]`` are the same setting in a run's identity."""
    from .core.targets import parse_targets

    if not (value is None or isinstance(value, (list, tuple)) or isinstance(value, str) and value):
        raise ValueError(f"{name} must be a preset, a regex or a list of module names, got {value!r}")
    parsed = parse_targets(value, name)
    return parsed if isinstance(parsed, tuple) else value


def _target_sets(name: str, value: Any) -> tuple[str | tuple[str, ...] | None, ...]:
    """One target set, or a list of presets or of sets (an axis of the experiment). A flat list mixing presets with
    module names could mean either, so it is refused."""
    from .core.targets import MODEL_PRESETS

    is_set = ([item is None or item in MODEL_PRESETS or isinstance(item, (list, tuple)) for item in value]
              if isinstance(value, (list, tuple)) else [])
    if not any(is_set):
        return (_targets(name, value),)
    if not all(is_set):
        sets = ", ".join(repr(i) for i, whole in zip(value, is_set) if whole)
        names = ", ".join(repr(i) for i, whole in zip(value, is_set) if not whole)
        raise ValueError(f"{name} mixes target sets ({sets}) with module names ({names}): give several sets as a "
                         "list of sets, e.g. [['query', 'value'], 'all-linear']")
    return _unique(name, [_targets(f"{name}[{index}]", item) for index, item in enumerate(value)])


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value

    return check


def _device(name: str, value: Any) -> str:
    text = _text(name, value)
    if text not in DEVICES and not text.startswith("cuda:"):
        raise ValueError(f"{name} must be one of {DEVICES} or 'cuda:<index>', got {value!r}")
    return text


def _method_keys(name: str, value: Any) -> Mapping[str, Any]:
    """A non-empty ``{method: ...}``; an unknown method is an error (a typo would otherwise be ignored)."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} must be a non-empty dict of method -> rate(s), got {value!r}")
    unknown = [m for m in value if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"{name} names unknown method(s) {', '.join(map(repr, unknown))}; choose from {METHOD_NAMES}")
    return value


def _lr(name: str, value: Any) -> float | dict[str, float] | str:
    """One rate for every method, ``{method: rate}``, or ``"tune"``."""
    if value == TUNE:
        return TUNE
    if isinstance(value, Mapping):
        return {m: _positive(f"{name}[{m!r}]", r) for m, r in _method_keys(name, value).items()}
    return _positive(name, value)


def _lr_grid(name: str, value: Any) -> dict[str, tuple[float, ...]]:
    """``{method: [rate, ...]}``: at least two distinct rates per method, else there is nothing to choose from."""
    grid = {m: tuple(sorted(_each(_positive)(f"{name}[{m!r}]", r))) for m, r in _method_keys(name, value).items()}
    few = next((m for m, rates in grid.items() if len(rates) < 2), None)
    if few:
        raise ValueError(f"{name}[{few!r}] has {len(grid[few])} rate: give at least two to choose from")
    return grid


def _report_to(name: str, value: Any) -> tuple[str, ...]:
    """``None``, ``""`` or ``"none"``: no tracker; else names of installed trackers (accelerate drops a missing one
    with a debug message only: a misspelt one would train a whole comparison with nothing logged)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers  # on use: it imports torch

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if items in ([], [None], [""], ["none"]):
        return ()
    if not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"{name} must be tracker names, got {value!r}")
    known, installed = sorted(LOGGER_TYPE_TO_CLASS), sorted(map(str, get_available_trackers()))
    wrong = [f"{item!r} is not installed (pip install {item})" if item in known else f"{item!r} is not a tracker"
             for item in items if item not in installed]
    if wrong:
        raise ValueError(f"{name}: {'; '.join(wrong)}; installed: {', '.join(installed) or 'none'} "
                         f"(accelerate supports {', '.join(known)})")
    return tuple(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------------ the parts


class Parameter(NamedTuple):
    """One user-facing setting: the field ``field`` of ExperimentConfig's ``part`` (``""``: of ExperimentConfig)."""

    name: str
    part: str
    field: str
    check: Check
    help: str
    several: bool


def parameter(default: Any, check: Check, help: str, *, name: str = "", several: bool = False) -> Any:
    """A field that users set by name (the field's, unless ``name`` says); ``several``: its flag takes several
    tokens. Its part and field are filled in when :data:`PARAMETERS` collects it."""
    metadata = {"parameter": Parameter(name, "", "", check, help, several)}
    if isinstance(default, dict):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DataConfig:
    """Which rows (``None``: every row of the split). A train size draws a class-balanced subset seeded by the run
    seed; an eval size a fixed subset of dev, so that every run is scored on the same sentences."""

    data_dir: str | None = parameter(None, _optional(_text), "folder holding sst2/ (and gpt2-tokenizer/); None: "
                                     "$PEFT_LAB_DATA, else the hub")
    train_size: int | None = parameter(None, _rows, "train rows (a balanced subset), or 'all'")
    eval_size: int | None = parameter(None, _rows, "dev rows, or 'all'")
    dataset: str = parameter("sst2", _text, "'sst2', a CSV/TSV/JSONL/Parquet file or folder, or a hub dataset")
    dataset_config: str | None = parameter(None, _optional(_text), "a hub dataset's configuration name")
    text_column: tuple[str, ...] | None = parameter(None, _columns, "the text column, or two for sentence pairs "
                                                    "(default: text or sentence)", several=True)
    label_column: str = parameter("label", _text, "the label column (numbers or names)")


# The parameters among core.settings.AdapterSettings' fields (the core declares no checks): field -> (check, help,
# several). ``targets`` is ExperimentConfig's axis and ``rslora`` the sweep's option.
ADAPTER_PARAMETERS = {
    "rank": (_positive_int, "LoRA/DoRA rank r", False),
    "alpha": (_positive, "scaling numerator: the update is (alpha / r) * B A", False),
    "dropout": (_fraction, "dropout on the adapter input, in [0, 1)", False),
    "modules_to_save": (_module_names, "modules trained in full beside adapters and head, e.g. pooler (None: the "
                        "head only)", True),
}


@dataclass(frozen=True)
class TrainConfig:
    """The training loop, the same for every method (rate and seed are per run). ``batch_size`` is the global
    batch (over every process and accumulation step), so a run means the same experiment on one CPU or eight GPUs."""

    epochs: int = parameter(1, _positive_int, "passes over the train rows")
    batch_size: int = parameter(16, _positive_int, "rows per optimiser step, over all processes")
    weight_decay: float = parameter(0.01, _non_negative, "AdamW weight decay (matrices only)")
    warmup_ratio: float = parameter(0.06, _fraction, "share of steps with a linear warm-up")
    max_grad_norm: float | None = parameter(1.0, _optional(_positive), "gradient clipping norm")
    grad_accum_steps: int = parameter(1, _positive_int, "micro-batches per step and process")
    max_length: int = parameter(128, _positive_int, "tokens per sentence (longer ones are cut)")
    eval_every: int | None = parameter(None, _optional(_positive_int), "also evaluate every N optimiser steps "
                                       "(None: at the end of each epoch)")
    gradient_checkpointing: bool = parameter(False, _flag, "recompute activations in backward")
    device: str = parameter("auto", _device, "'auto' (CUDA when available), 'cpu' or 'cuda[:i]'")
    precision: str = parameter("auto", _one_of(("auto", "fp32", "bf16", "fp16")), "'auto' (GPU: bf16, or fp16 + "
                               "loss scaling before Ampere; CPU: fp32) | 'fp32' | 'bf16' | 'fp16'")
    log_every: int = parameter(10, _positive_int, "optimiser steps averaged into one logged loss")
    bucket_by_length: bool = parameter(False, _flag, "batch sentences of similar length")
    eval_batch_size: int | None = parameter(None, _optional(_positive_int), "rows per evaluation batch")
    compile: str = parameter("auto", _one_of(("auto", "on", "off")), "compile the model's repeated blocks: 'auto' "
                             "(on CUDA; off on a CPU, where it was measured slower) | 'on' | 'off'")
    workers: int = parameter(1, _positive_int, "runs at once on this device, each in its own process, splitting "
                             "the plan through the results folder")

    def __post_init__(self) -> None:  # built directly too (tests, bench): every field is a parameter, checked and read
        for item in fields(self):
            check = item.metadata["parameter"].check
            object.__setattr__(self, item.name, check(f"TrainConfig.{item.name}", getattr(self, item.name)))


@dataclass(frozen=True)
class SweepConfig:
    """The LoRA rank x alpha grid in alpha/rank ratios (at a fixed ratio the update keeps its scale), each run on
    ``train_size`` rows (``None``: the comparison's) so that 28 runs fit a CPU budget."""

    enabled: bool = parameter(False, _flag, "also run the LoRA rank x alpha grid", name="sweep")
    ranks: tuple[int, ...] = parameter((2, 8, 32), _each(_positive_int), "the grid's ranks, e.g. 2 4 8 16",
                                       name="sweep_ranks", several=True)
    alpha_ratios: tuple[float, ...] = parameter((1.0,), _each(_positive), "the grid's alpha / r values",
                                                name="sweep_alpha_ratios", several=True)
    train_size: int | None = parameter(None, _optional(_positive_int), "train rows per grid run",
                                       name="sweep_train_size")
    rslora: bool = parameter(False, _flag, "grid with rsLoRA scaling alpha / sqrt(r)", name="sweep_rslora")
    workers: int | None = parameter(None, _optional(_positive_int), "grid runs at once on this device (None: as "
                                    "workers)", name="sweep_workers")


@dataclass(frozen=True)
class TuneConfig:
    """Learning-rate tuning (``lr="tune"``): one fixed rate favours whichever method it suits. Each method trains
    once per rate of its ``grid`` and tuning seed (``None``: the first seed), scored on ``holdout_size`` *other*
    train rows; the best mean rate is used for every seed. The dev split takes no part in the choice."""

    enabled: bool = False
    grid: dict[str, tuple[float, ...]] = parameter({}, _lr_grid, "rates lr 'tune' tries per method, e.g. "
                                                   "lora=1e-3,3e-3", name="lr_grid", several=True)
    train_size: int | None = parameter(None, _optional(_positive_int), "train rows per tuning run",
                                       name="tune_train_size")
    holdout_size: int = parameter(2000, _positive_int, "held-out train rows scoring tuning runs",
                                  name="tune_holdout_size")
    seeds: tuple[int, ...] | None = parameter(None, _optional(_each(_seed)), "tuning seeds; the best mean rate wins",
                                              name="tune_seeds", several=True)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides an experiment's results, validated (see :func:`make_config`)."""

    profile: str
    model: str = parameter(MISSING, _text, "hub id, local folder, 'minilm' or 'random-gpt2-<size>'")
    methods: tuple[str, ...] = parameter(MISSING, _each(lambda name, m: get_method(m).name),
                                         f"methods to compare, of {', '.join(METHOD_NAMES)}", several=True)
    lr: dict[str, float] = parameter(MISSING, _lr, "one rate, per method (lora=2e-4 full=2e-5), or 'tune' (the "
                                     "best of lr_grid)", several=True)
    seeds: tuple[int, ...] = parameter((0,), _each(_seed), "one run per seed and method: 0 1 2 gives error bars",
                                       several=True)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    # An axis of the experiment (None: the model's default): each of ``adapters`` holds one, adapter.targets none.
    targets: tuple[str | tuple[str, ...] | None, ...] = parameter(
        (None,), _target_sets, "layers: a preset ('attn', 'attn-all', 'all-linear'), module-name suffixes or a "
        "regex; several sets compare them: attn all-linear, or query,value all-linear", several=True)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    results_dir: str = parameter("results", _optional(_text), "run records go here; None: results/<profile>")
    imgs_dir: str | None = parameter(None, _optional(_text), "figures go here; None: <results_dir>/imgs")
    report_to: tuple[str, ...] = parameter((), _report_to, "experiment trackers, e.g. tensorboard (logs in "
                                           "<results_dir>/runs), mlflow", several=True)
    sentences: tuple[str, ...] = parameter((
        "A gripping, beautifully acted film.", "The plot is thin and the jokes fall flat.",
        "Not the best film of the year, but far from the worst.",
    ), _each(_text, unique=False), "your own sentences, classified by each run", several=True)
    # The sizes (SIZE_PARAMETERS) left to the profile, which planning fits to the data, and those it draws
    # stratified because no balanced subset meets them. Not part of a result: a run's record holds its row counts.
    adaptable_sizes: frozenset[str] = field(default=frozenset(), compare=False)
    stratified_sizes: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if self.adapter.targets is not None:
            raise ValueError("ExperimentConfig takes its target sets as targets=(...), not adapter.targets: an "
                             "experiment may compare several")

    @property
    def figures_dir(self) -> str:
        """``imgs_dir``, else ``<results_dir>/imgs`` (never the committed ``imgs/`` by accident)."""
        return self.imgs_dir or str(Path(self.results_dir) / "imgs")

    @property
    def adapters(self) -> tuple[AdapterSettings, ...]:
        """The adapter settings of each target set, in the order of ``targets``."""
        return tuple(replace(self.adapter, targets=targets) for targets in self.targets)


# ------------------------------------------------------------------------------------------------ parameters


def _parameters(config: type, part: str = "") -> Iterator[Parameter]:
    """The parameters of ``config``'s fields, each part's (``data``, ``adapter``...) in its place."""
    for item in fields(config):
        if item.default_factory is AdapterSettings:
            yield from (Parameter(name, item.name, name, *spec) for name, spec in ADAPTER_PARAMETERS.items())
        elif is_dataclass(item.default_factory):
            yield from _parameters(item.default_factory, item.name)
        elif "parameter" in item.metadata:
            declared = item.metadata["parameter"]
            yield declared._replace(name=declared.name or item.name, part=part, field=item.name)


PARAMETERS: dict[str, Parameter] = {p.name: p for p in _parameters(ExperimentConfig)}


def check_parameter_names(names: Iterable[str], known: Collection[str] = PARAMETERS) -> None:
    """Refuse every name not in ``known``, suggesting the closest: papermill makes a misspelt name one more unused
    variable, and the profile's value would train instead."""
    close = {name: difflib.get_close_matches(name, known, n=1) for name in dict.fromkeys(names) if name not in known}
    if not close:
        return
    listed = ", ".join(f"{n!r} (did you mean {c[0]!r}?)" if c else repr(n) for n, c in close.items())
    raise ValueError(f"unknown parameter(s) {listed}" + ("" if all(close.values()) else f"; known: {', '.join(known)}"))


# ------------------------------------------------------------------------------------------------ profiles

# ~2e-5 is the usual full fine-tuning rate for GPT-2/BERT-size models; adapters start from a zero update and take
# ~10x more (2e-4: the LoRA and QLoRA papers; DoRA uses LoRA's). The cpu rates are those the all-linear study chose
# on held-out train rows (docs/results.md); the lr="tune" grids sit around each (tuning.widened_grid widens a
# grid whose winner is on its edge).
_GPU_LR = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "qdora": 2e-4}
_CPU_LR = {"full": 1e-4, "lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "qdora": 1e-3}
_ADAPTER_METHODS = tuple(m for m in METHOD_NAMES if get_method(m).adapter)
_GPU_GRID = {"full": (1e-5, 2e-5, 4e-5), **dict.fromkeys(_ADAPTER_METHODS, (1e-4, 2e-4, 4e-4))}
_CPU_GRID = {"full": (5e-5, 1e-4, 2e-4), **dict.fromkeys(_ADAPTER_METHODS, (5e-4, 1e-3, 2e-3, 4e-3))}
_MAP = {"enabled": True, "ranks": (1, 2, 4, 8, 16, 32, 64), "alpha_ratios": (0.5, 1.0, 2.0, 4.0)}  # 28 LoRA runs

PROFILES: dict[str, ExperimentConfig] = {
    # GPT-2 Large on all of SST-2, on a GPU, configured as the CPU study found best: adapters on every linear
    # layer, every rate tuned on held-out train rows (the map and tuning on a quarter of the rows), runs compiled.
    "full": ExperimentConfig(
        profile="full", model="openai-community/gpt2-large", methods=METHOD_NAMES, lr=_GPU_LR,
        targets=("all-linear",), adapter=AdapterSettings(rank=8, alpha=16.0, dropout=0.05),
        train=TrainConfig(batch_size=16, max_length=128, eval_every=1000, device="cuda", log_every=10,
                          bucket_by_length=True),
        sweep=SweepConfig(**_MAP, train_size=16000),
        tune=TuneConfig(enabled=True, grid=_GPU_GRID, train_size=16000),
        results_dir="results/full",
    ),
    # The headline experiment, small: pretrained MiniLM on a balanced 4,000-row subset, one seed, adapters on every
    # linear layer at the study's rates, scored on the whole dev set; the map on 2,000 rows (125 steps) a run.
    "cpu": ExperimentConfig(
        profile="cpu", model="minilm", methods=("full", "lora", "dora", "qlora"), lr=_CPU_LR,
        data=DataConfig(train_size=4000), targets=("all-linear",),
        adapter=AdapterSettings(rank=8, alpha=16.0, dropout=0.05),
        train=TrainConfig(batch_size=16, max_length=64, eval_every=125, device="cpu", log_every=5,
                          bucket_by_length=True),
        sweep=SweepConfig(**_MAP, train_size=2000, workers=2), tune=TuneConfig(grid=_CPU_GRID), results_dir="results/cpu",
    ),
    # A tiny random GPT-2 (real tokenizer) on a few dozen rows: checks the plumbing in seconds.
    "smoke": ExperimentConfig(
        profile="smoke", model="random-gpt2-tiny", methods=METHOD_NAMES, lr=dict.fromkeys(METHOD_NAMES, 1e-3),
        data=DataConfig(train_size=32, eval_size=32), adapter=AdapterSettings(rank=4, alpha=8.0, dropout=0.0),
        train=TrainConfig(batch_size=8, max_length=32, warmup_ratio=0.0, log_every=1),
        sweep=SweepConfig(enabled=True, ranks=(2, 4), alpha_ratios=(1.0, 2.0)),
        tune=TuneConfig(grid=dict.fromkeys(METHOD_NAMES, (1e-3, 1e-2)), holdout_size=16), results_dir="results/smoke",
    ),
}
PROFILE_NAMES = tuple(PROFILES)


def resolve_profile(profile: str = "auto") -> str:
    """``"auto"`` -> ``"full"`` with a CUDA GPU, else ``"cpu"``; any other name is checked and returned."""
    if profile == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose 'auto' or one of {PROFILE_NAMES}")
    return profile


def make_config(profile: str = "auto", **parameters: Any) -> ExperimentConfig:
    """The profile's configuration with ``parameters`` applied, every value checked. ``None`` and ``""`` keep the
    profile's value (the notebook's, papermill's and the CLI's "not set"), and a size kept so is fitted to the data
    when planned; a dict ``lr`` is merged into the profile's rates."""
    base = PROFILES[resolve_profile(profile)]
    check_parameter_names(parameters)
    given = {name: value for name, value in parameters.items() if value is not None and value != ""}
    parts: dict[str, dict[str, Any]] = defaultdict(dict)  # "": ExperimentConfig's own fields
    for name, value in given.items():
        parameter = PARAMETERS[name]
        parts[parameter.part][parameter.field] = parameter.check(name, value)
    top = parts.pop("", {})
    if top.get("lr") == TUNE:
        del top["lr"]
        parts["tune"]["enabled"] = True
    elif "lr" in top:
        top["lr"] = {**base.lr, **top["lr"]} if isinstance(top["lr"], dict) else dict.fromkeys(METHOD_NAMES, top["lr"])
    if "grid" in parts["tune"]:
        parts["tune"]["grid"] = {**base.tune.grid, **parts["tune"]["grid"]}
    config = replace(base, **top, **{part: replace(getattr(base, part), **values) for part, values in parts.items()},
                     adaptable_sizes=frozenset(name for name in SIZE_PARAMETERS if name not in given))
    rates, kind = (config.tune.grid, "lr='tune' but lr_grid") if config.tune.enabled else (config.lr, "lr")
    missing = [m for m in config.methods if m not in rates]
    if missing:
        raise ValueError(f"{kind} has no rate for method(s) {', '.join(missing)}")
    _refuse_settings_without_effect(config, {name: value for name, value in given.items()
                                             if _setting(config, name) != _setting(base, name)})
    return config


def _setting(config: ExperimentConfig, name: str) -> Any:
    """Parameter ``name``'s value in ``config`` as a user writes it: one target set as itself, not as an axis."""
    parameter = PARAMETERS[name]
    value = getattr(getattr(config, parameter.part) if parameter.part else config, parameter.field)
    return value[0] if name == "targets" and len(value) == 1 else value


def _refuse_settings_without_effect(config: ExperimentConfig, changed: Mapping[str, Any]) -> None:
    """Refuse a setting changed from the profile's that ``config`` never reads (``sweep_ranks`` with ``sweep=False``):
    ignored, it would make the results look as if they had used it."""
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
        ignored = [name for name in names if name in changed]
        if ignored and not used:
            raise ValueError(f"{ignored[0]} has no effect {why}; leave it out")
    running = set(config.methods) | ({"lora"} if config.sweep.enabled else set())
    for name in ("lr", "lr_grid"):
        rates = changed.get(name)
        idle = [m for m in rates if m not in running] if isinstance(rates, Mapping) else []
        if idle:
            raise ValueError(f"{name} gives {', '.join(map(repr, idle))} a rate, but only {sorted(running)} run "
                             f"here; leave the others out")


# ------------------------------------------------------------------------------------------------ CLI / notebook


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter (``--rank 8``, ``--lr lora=5e-4``, ``--train-size all``, ``--no-sweep``...)."""
    for p in PARAMETERS.values():
        kind = {"action": argparse.BooleanOptionalAction} if p.check is _flag else {"nargs": "+"} if p.several else {}
        parser.add_argument("--" + p.name.replace("_", "-"), dest=p.name, default=None, help=p.help, **kind)


def cli_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters given on the command line (``None``: not given), shaped as the notebook writes them."""
    given = {name: getattr(args, name) for name in PARAMETERS}
    return {name: _from_tokens(name, value) if isinstance(value, list) else value for name, value in given.items()}


def _from_tokens(name: str, tokens: list[str]) -> Any:
    """One token as itself, several as a list, ``a,b`` as a list in it (``--targets query,value all-linear``) and
    ``k=v`` tokens as a dict (``--lr lora=5e-4 full=2e-5``). Numbers stay text: their checks read it."""
    def item(token: str) -> str | list[str]:
        return [part for part in token.split(",") if part] if "," in token else token

    pairs = [token.partition("=") for token in tokens]
    if all(sep for _, sep, _ in pairs):
        return {key: item(text) for key, _, text in pairs}
    if any(sep for _, sep, _ in pairs):
        raise ValueError(f"{name} takes values or key=value pairs, not both: {' '.join(tokens)}")
    items = [item(token) for token in tokens]
    return items[0] if len(items) == 1 else items


# The notebook's parameters cell, in its order (peft.ipynb): what a reader changes, each a literal value.
NOTEBOOK_PARAMETERS = ("profile", "model", "methods", "targets", "rank", "alpha", "dropout", "lr", "train_size",
                       "epochs", "seeds", "sweep", "data_dir", "results_dir", "imgs_dir")


def notebook_values(profile: str) -> dict[str, Any]:
    """A profile's value of every name of the notebook's parameters cell, written as there (``"all"`` rows, one
    target set as itself): what ``make run`` passes to papermill, so that papermill's cell shows what trains.
    ``data_dir`` and ``imgs_dir`` are left to the caller."""
    config = PROFILES[resolve_profile(profile)]
    values = {name: _setting(config, name) for name in NOTEBOOK_PARAMETERS if name not in ("profile", "data_dir",
                                                                                           "imgs_dir")}
    return {"profile": config.profile, **values, "methods": list(config.methods), "seeds": list(config.seeds),
            "lr": TUNE if config.tune.enabled else {method: config.lr[method] for method in config.methods},
            "train_size": ALL_ROWS if values["train_size"] is None else values["train_size"]}
