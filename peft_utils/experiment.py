"""The comparison itself: plan every run, check the plan, then build each method's model, train it and record it.

An experiment is an :class:`~peft_utils.config.ExperimentConfig` (a profile plus the user's parameters). Running
it has two phases, so that a mistake costs a one-line error and not a finished full fine-tuning run:

1. **plan** (:func:`plan_experiment`): the runs (learning-rate tuning when ``lr="tune"``, methods x target sets x
   seeds, and the LoRA rank x alpha grid), their data rows, and
   checks that need the data or the model — sizes that fit the splits, targets that match a layer of the model,
   bitsandbytes for 4-bit methods, and the results folder (a run found there complete, by its settings, is
   skipped; a new setting trains beside the folder's other settings, see :class:`~peft_utils.store.RunStore`).
2. **run** (:func:`run_plan`): every run not already complete is built from the same base weights, trained with
   the same seed, data and schedule, and streamed to ``<results_dir>/<run_id>.jsonl``; a re-run resumes at the first
   unfinished run.

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: OpenMP threads
that spin while waiting for a busy core made the ``cpu`` profile up to 10x slower in our measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .checkpoints import save_trained
from .config import (PROFILE_NAMES, AdapterSettings, ExperimentConfig, TuneConfig, add_cli_arguments, cli_parameters,
                     make_config)
from .core.inject import kept_modules, select_targets
from .core.loop import set_seed
from .core.quant import require_bitsandbytes
from .core.targets import meta_skeleton
from .data import (CARVED_DEV_FRACTION, Splits, balance_problem, class_counts, eval_rows, fingerprint, load_splits,
                   rows_per_class, subset)
from .devices import (compute_dtype_for, is_main_process, launched_processes, make_accelerator,
                      per_device_batch_size, resolve_device, same_in_every_process)
from .memory_plan import plan_for_device, with_micro_batch_at_most
from .methods import get_method, series_method, series_name, targets_label
from .models import build_model, materialize_model, resolve_model_source
from .report import settings_text
from .sizes import model_size
from .store import COMPARISON_GROUP, IDENTITY_KEYS, SWEEP_GROUP, TUNE_GROUP, Claim, RunInProgress, RunStore
from .train import train
from .tuning import EVAL_SPLIT, choose_learning_rates, tuning_rows



# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One planned run. ``adapter`` is ``None`` for full fine-tuning (it has none); ``lr`` is set for a tuning
    run (its grid point) and ``None`` otherwise (the configured rate, or the tuned one)."""

    group: str
    method: str
    seed: int
    adapter: AdapterSettings | None
    lr: float | None = None


def model_slug(model: str | Path) -> str:
    """A short file-name-safe name: ``openai-community/gpt2-large`` -> ``gpt2-large``."""
    return re.sub(r"[^a-z0-9.]+", "-", Path(str(model)).name.lower()).strip("-") or "model"


def targets_slug(targets: object) -> str:
    """A target set in a file name: its label (:func:`~peft_utils.methods.targets_label`: ``all-linear``,
    ``query+value``) where that is one, else (a regex) ``re-`` and the first 8 hex digits of the label's SHA-1."""
    label = targets_label(targets)
    if re.fullmatch(r"[A-Za-z0-9_.+-]*", label):
        return label
    return "re-" + hashlib.sha1(label.encode()).hexdigest()[:8]


def run_id(spec: RunSpec, model: str | Path) -> str:
    """``<group>-<method>[-<targets>][-r<rank>-a<alpha>[-rslora]][-lr<rate>]-s<seed>-<model>``, e.g.
    ``comparison-lora-r8-a16-s0-minilm``, ``comparison-lora-all-linear-r8-a16-s0-minilm`` or
    ``tune-lora-r8-a16-lr0.003-s0-minilm``; the model's default targets are not named. The name of the run's
    file, unless another setting's run holds it: then this name and the setting's hash
    (:meth:`~peft_utils.store.RunStore.find`)."""
    adapter = ""
    if spec.adapter is not None:
        slug = targets_slug(spec.adapter.targets)
        adapter = (f"-{slug}" if slug else "") + f"-r{spec.adapter.rank}-a{spec.adapter.alpha:g}"
        adapter += "-rslora" if spec.adapter.rslora else ""
    rate = f"-lr{spec.lr:g}" if spec.lr is not None else ""
    return f"{spec.group}-{spec.method}{adapter}{rate}-s{spec.seed}-{model_slug(model)}"


def _method_adapters(config: ExperimentConfig, method: str) -> tuple[AdapterSettings | None, ...]:
    """The adapter of each target set for an adapter method; full fine-tuning has one run and no adapter."""
    return config.adapters if get_method(method).adapter else (None,)


def comparison_specs(config: ExperimentConfig) -> list[RunSpec]:
    """Every method on every target set (adapter methods) for every seed."""
    return [RunSpec(COMPARISON_GROUP, m, s, adapter)
            for s in config.seeds for m in config.methods for adapter in _method_adapters(config, m)]


def sweep_specs(config: ExperimentConfig) -> list[RunSpec]:
    """LoRA over ranks x alpha/rank ratios on the first target set: a fixed ratio keeps the update's scale, so a
    line shows capacity alone."""
    return [RunSpec(SWEEP_GROUP, "lora", s,
                    replace(config.adapters[0], rank=r, alpha=ratio * r, rslora=config.sweep.rslora))
            for s in config.seeds for ratio in config.sweep.alpha_ratios for r in config.sweep.ranks]


def tune_specs(config: ExperimentConfig, series: Sequence[tuple[str, AdapterSettings | None]]) -> list[RunSpec]:
    """One run per (method, adapter) series, rate of the method's grid and tuning seed (default the first seed;
    see :mod:`peft_utils.tuning`)."""
    return [RunSpec(TUNE_GROUP, m, seed, adapter, lr=rate)
            for seed in config.tune.seeds or config.seeds[:1] for m, adapter in series for rate in config.tune.grid[m]]


def spec_series(spec: RunSpec) -> str:
    """The series a run belongs to (:func:`~peft_utils.methods.series_name`): its method and target set."""
    return series_name(spec.method, spec.adapter.targets if spec.adapter is not None else None)


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    name: str  # its readable run id (:func:`run_id`)
    run_id: str  # its file's: ``name``, or with its setting's hash where another setting holds ``name``
    # Every setting that changes the result, as the run's config event records it. Its "lr" is None while it
    # waits for learning-rate tuning (see ``_with_tuned_rates``).
    record: dict[str, Any]
    train_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    complete: bool


@dataclass(frozen=True)
class Plan:
    config: ExperimentConfig
    model_source: str  # where the model loads from (the cache folder of a random GPT-2, a hub id, a folder)
    runs: list[PlannedRun]  # tuning runs first: the others' rates come from them
    comparison: bool = True  # what was planned, so that a widened tuning grid can plan the same again
    sweep: bool = False


def _planned_record(config: ExperimentConfig, spec: RunSpec, frames: tuple[pd.DataFrame, pd.DataFrame],
                    data: tuple[str, Splits], lr: float | None, compute_dtype: str) -> dict:
    """The run's identity (:data:`~peft_utils.store.IDENTITY_KEYS`, ``rslora`` for the sweep only) after its group
    and method: every setting that changes its result, as its ``config`` event records it; then its data: where it
    was read from, its classes, and the labels of the rows it is scored on (what paired tests compare predictions
    with). ``data``: (the fingerprint of the splits its rows are drawn from, the splits)."""
    adapter = spec.adapter
    values = {"model": config.model, "train_size": len(frames[0]), "eval_size": len(frames[1]),
              "data_fingerprint": data[0], "lr": lr, "seed": spec.seed, "compute_dtype": compute_dtype,
              **asdict(config.train),
              **{key: getattr(adapter, key) if adapter else None for key in ("rank", "alpha", "dropout", "targets",
                                                                            "modules_to_save",
                                                                            "rslora")}}
    keys = [k for k in IDENTITY_KEYS if k != "rslora" or spec.group == SWEEP_GROUP]
    record = {"group": spec.group, "method": spec.method, **{key: values[key] for key in keys}}
    if spec.group == TUNE_GROUP:
        record["eval_split"] = EVAL_SPLIT
    splits = data[1]
    return {**record, "dataset": config.data.dataset, "data_source": splits.source, "dev_split": splits.dev_split,
            "labels": list(splits.label_names), "eval_labels": frames[1]["label"].tolist()}


def _train_and_eval_rows(config: ExperimentConfig, train: pd.DataFrame, dev: pd.DataFrame, seed: int,
                         size_name: str = "train_size") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows (a balanced subset drawn with the run seed, stratified where planning found no balanced one:
    :func:`_fitted_sizes`) and eval rows (a fixed subset, or all of dev). ``size_name``: the parameter that set
    ``config.data.train_size``, as an error names it (the sweep's is ``sweep_train_size``)."""
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
    return train_frame, eval_rows(dev, eval_size)


class _SizeFitter:
    """Fits the sizes a user left to the profile (``adaptable``) to the data, one note per size it changes."""

    def __init__(self, adaptable: frozenset[str]) -> None:
        self.adaptable = adaptable
        self.seen: set[str] = set()
        self.notes: list[str] = []
        self.stratified: set[str] = set()

    def fit(self, name: str, size: int | None, counts: np.ndarray, asked: int | None = None, balanced: bool = True,
            count_all: bool = False) -> int | None:
        """Size ``name`` (``size`` rows) drawn from a split of ``counts`` rows per class: every row when it asks for
        as many or more (``None``, or their count with ``count_all``: where ``None`` means the comparison's size);
        stratified (``balanced`` draws) where no balanced subset exists. ``asked``: the size as the profile set it,
        for the note (a held-out slice :meth:`tuning` shrank)."""
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
        """Learning-rate tuning's sizes: a held-out slice too large to leave its train rows shrinks to the share of
        train a carved dev split takes (at least a row per class); its train rows (``tune_train_size``, else the
        comparison's) are then fitted to the train rows not held out."""
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


def _fitted_sizes(config: ExperimentConfig, splits: Splits, sweep: bool) -> tuple[ExperimentConfig, str]:
    """``config`` with each size the user left to the profile (``config.adaptable_sizes``) and the planned runs
    use fitted to the data, and what changed, for one line (``""``: nothing).

    Why: a profile's sizes are chosen for SST-2 (4,000 balanced rows of 2 classes); a user's own 240-row, 3-class
    file should train with them rather than be refused over numbers the user never chose. A size beyond its split
    takes every row; one no balanced subset meets (a size K classes do not divide, a rare class) is drawn
    stratified. A size the user set is left as set: :func:`_train_and_eval_rows` and
    :func:`~peft_utils.tuning.tuning_rows` refuse it in one line if the data cannot meet it. The plan keeps the
    fitted config, so planning it again (a widened tuning grid) fits nothing more and says nothing.
    """
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


def _check_model(config: ExperimentConfig, source: str, specs: Sequence[RunSpec], num_labels: int) -> None:
    """Before any run's model is built, each mistake one line with the numbers:

    - the results folder is a folder that can be written (:meth:`~peft_utils.store.RunStore.check_writable`);
    - bitsandbytes for 4-bit methods;
    - ``max_length`` within the model's position embeddings (``max_position_embeddings`` / ``n_positions``): a
      longer sentence would index past them in the middle of training;
    - adapter targets that match a layer of the model, and none of its classification head or embeddings;
    - ``modules_to_save`` that match modules of the model holding no target;
    - every planned rank at most the narrowest target layer's width (the smaller of its input and output
      features). Refused, not warned: a layer's update ``B A`` has rank at most that width, so a larger rank adds
      parameters and memory but no capacity, and a sweep would draw as different ranks what is one experiment.
      (``apply_adapters`` itself accepts such a rank, as peft does.)
    """
    from transformers import AutoConfig

    RunStore(config.results_dir).check_writable()
    if any(get_method(s.method).quantized for s in specs):
        require_bitsandbytes()
    try:
        model_config = AutoConfig.from_pretrained(resolve_model_source(source), num_labels=num_labels)
    except OSError as error:  # not found, offline: transformers' message spans lines
        raise ValueError(f"model {config.model!r}: cannot read its config: {str(error).splitlines()[0]}") from None
    setting, positions = _positions(model_config)
    if positions is not None and config.train.max_length > positions:
        raise ValueError(f"max_length={config.train.max_length} is more tokens than {config.model} has positions for "
                         f"({setting}); ask for at most {positions}")
    adapted = [s for s in specs if s.adapter is not None]
    if adapted:
        _check_adapters(config, model_config, adapted)


def _check_adapters(config: ExperimentConfig, model_config, adapted: Sequence[RunSpec]) -> None:
    """The adapter settings of each target set against the model's layers (on a weightless skeleton): see
    :func:`_check_model`."""
    skeleton = meta_skeleton(model_config)
    for targets in config.targets:
        try:
            layers = select_targets(skeleton, targets)
        except (ValueError, TypeError) as error:
            raise type(error)(f"targets={targets!r} for {config.model}: {error}") from None
        try:
            kept_modules(skeleton, config.adapter.modules_to_save or (), {name for name, _ in layers})
        except ValueError as error:
            raise ValueError(f"modules_to_save={list(config.adapter.modules_to_save or ())} for {config.model}: "
                             f"{str(error).removeprefix('keep_trainable').lstrip(': ')}") from None
        _check_rank(config, layers, [s for s in adapted if s.adapter.targets == targets])


def _check_rank(config: ExperimentConfig, layers: Sequence[tuple[str, torch.nn.Module]],
                adapted: Sequence[RunSpec]) -> None:
    """Every planned rank at most the narrowest of ``layers``, the layers its runs' target set selects."""
    from .core.layers import base_features

    if not adapted:
        return
    width, name = min((min(base_features(module)), name) for name, module in layers)
    widest = max(adapted, key=lambda s: s.adapter.rank)
    if widest.adapter.rank > width:
        rank = widest.adapter.rank
        asked = f"sweep_ranks include {rank}" if widest.group == SWEEP_GROUP else f"rank={rank}"
        raise ValueError(f"{asked} but the narrowest target layer of {config.model}, {name}, is {width} wide, which "
                         f"caps its update's rank at {width}; ask for a rank of at most {width}")


# Families whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens).
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet",
                            "longformer", "ibert")


def _positions(model_config) -> tuple[str, int | None]:
    """(the config's position setting, as said in an error; how many tokens its position embeddings hold), or
    ``("", None)`` where the config names no limit."""
    for key in ("n_positions", "max_position_embeddings"):  # GPT-2's n_positions is also its max_position_embeddings
        limit = getattr(model_config, key, None)
        if isinstance(limit, int):
            if getattr(model_config, "model_type", "") not in _POSITIONS_AFTER_PADDING:
                return f"{key}={limit}", limit
            offset = (getattr(model_config, "pad_token_id", None) or 0) + 1
            return f"{key}={limit}, less {offset} before the first position", limit - offset
    return "", None


def plan_experiment(config: ExperimentConfig, comparison: bool = True, sweep: bool | None = None) -> Plan:
    """Every run of the experiment with its data, checked against the data, the model and the results folder.

    ``sweep``: ``None`` follows ``config.sweep.enabled``. Nothing is trained here; every error is raised here
    (with ``lr="tune"``, the rates of the later runs are known once their tuning runs are complete: see
    :func:`run_plan`).
    """
    sweep = config.sweep.enabled if sweep is None else sweep
    specs = (comparison_specs(config) if comparison else []) + (sweep_specs(config) if sweep else [])
    if not specs:
        raise ValueError("nothing to run: neither the comparison nor the sweep was asked for")
    if config.tune.enabled:  # the sweep's LoRA runs use the rate tuned for LoRA on their target set
        series = [(s.method, s.adapter) for s in specs if s.group == COMPARISON_GROUP]
        series += [("lora", config.adapters[0])] if sweep else []
        specs = tune_specs(config, list(dict.fromkeys(series))) + specs
    device = resolve_device(config.train.device)  # a GPU asked for and absent, or a precision it lacks: refused here
    compute_dtype = str(compute_dtype_for(device, config.train.precision)).removeprefix("torch.")
    splits = load_splits(config.data)
    config, adapted = _fitted_sizes(config, splits, sweep)
    # Which rows a run draws follows from its seed and sizes; what it draws them from is the splits' fingerprint.
    data = (fingerprint(splits.train, splits.dev), splits)
    frames = {(group, seed): _rows(config, splits, group, seed) for group, seed in {(s.group, s.seed) for s in specs}}
    per_device_batch_size(config.train.batch_size, launched_processes(), config.train.grad_accum_steps)
    source = materialize_model(config.model, config.data.data_dir)
    _check_model(config, source, specs, len(splits.label_names))
    store = RunStore(config.results_dir)
    runs = []
    for spec in specs:
        name = run_id(spec, config.model)
        rows = frames[spec.group, spec.seed]
        lr = spec.lr if spec.lr is not None or config.tune.enabled else config.method_lr(spec.method)
        record = _planned_record(config, spec, rows, data, lr, compute_dtype)
        found, complete = store.find(name, record)
        runs.append(PlannedRun(spec, name, found, record, *rows, complete=complete))
    if adapted and is_main_process():  # once every check has passed: the one line before anything trains
        print(f"sizes adapted to the data: {adapted}", flush=True)
    plan = Plan(config, source, runs, comparison, sweep)
    return _with_tuned_rates(plan) if config.tune.enabled else plan


def _rows(config: ExperimentConfig, splits: Splits, group: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's (train rows, evaluation rows): tuning scores on held-out train rows, the others on dev."""
    if group == TUNE_GROUP:
        return tuning_rows(config, splits.train, seed)
    if group == SWEEP_GROUP and config.sweep.train_size is not None:
        config = replace(config, data=replace(config.data, train_size=config.sweep.train_size))
        return _train_and_eval_rows(config, splits.train, splits.dev, seed, "sweep_train_size")
    return _train_and_eval_rows(config, splits.train, splits.dev, seed)


def _with_tuned_rates(plan: Plan) -> Plan:
    """The plan with each waiting run's rate filled in, once every tuning run is complete (else unchanged).

    The rates are chosen from the tuning runs' records (:func:`~peft_utils.tuning.choose_learning_rates`), so a
    resumed experiment picks the same ones without training again. ``plan``: as the folder is now (just planned, or
    :func:`_located`), so that its tuning runs' files and completion are those on disk.
    """
    if not all(r.complete for r in plan.runs if r.spec.group == TUNE_GROUP):
        return plan
    rates = _chosen_rates(plan)
    return _located(replace(plan, runs=[
        replace(run, record={**run.record, "lr": rates[spec_series(run.spec)]}) if run.record["lr"] is None else run
        for run in plan.runs]))


def _located(plan: Plan) -> Plan:
    """The plan with each run's file and completion read from the folder again
    (:meth:`~peft_utils.store.RunStore.find`): since it was planned, runs have finished, here or in another process,
    and one may have trained under its setting's hashed name, another setting having taken its readable one."""
    store = RunStore(plan.config.results_dir)
    runs = []
    for run in plan.runs:
        found, complete = store.find(run.name, run.record)
        runs.append(replace(run, run_id=found, complete=complete))
    return replace(plan, runs=runs)


def _chosen_rates(plan: Plan) -> dict[str, float]:
    """Each series' rate, chosen from the plan's complete tuning runs."""
    tuning = [r.run_id for r in plan.runs if r.spec.group == TUNE_GROUP]
    return choose_learning_rates(RunStore(plan.config.results_dir).summary(tuning))


# How often a tuning grid may be widened past an edge that a winner sits on (per experiment, both sides together).
GRID_WIDENINGS = 3


def widened_grid(grid: Sequence[float], chosen: float) -> tuple[float, ...] | None:
    """The grid with one more rate past the edge ``chosen`` sits on, a step of the grid's own ratio there (x2 in a
    grid of factors of 2; three significant digits), or ``None`` when ``chosen`` lies inside it.

    Why: a best rate at the edge of its grid is only "the best of those tried"; the true optimum may lie beyond,
    and a method compared at a rate short of its optimum is compared unfairly. Only a grid of three rates or more
    is widened: with fewer, every rate is an edge, and the grid was meant as a short list, not a bracket."""
    rates = sorted(grid)
    if len(rates) < 3 or rates[0] < chosen < rates[-1]:
        return None
    if chosen == rates[0]:
        return (float(f"{rates[0] * rates[0] / rates[1]:.3g}"), *rates)
    return (*rates, float(f"{rates[-1] * rates[-1] / rates[-2]:.3g}"))


def _widened_config(plan: Plan) -> ExperimentConfig | None:
    """The configuration with every method whose tuned rate sits on its grid's edge given one rate more, or
    ``None`` when every winner lies inside its grid (the plan's tuning runs must be complete)."""
    grid = dict(plan.config.tune.grid)
    for series, rate in _chosen_rates(plan).items():
        method = series_method(series)
        wider = widened_grid(grid[method], rate)
        grid[method] = wider or grid[method]
    if grid == dict(plan.config.tune.grid):
        return None
    return replace(plan.config, tune=replace(plan.config.tune, grid=grid))


# --------------------------------------------------------------------------------------------- execution


def _free_memory() -> None:
    """Drop the finished run's model and optimiser before the next one is built (peak memory is per run).

    On Linux, glibc keeps freed heap pages (a saved checkpoint's serialisation buffers, the last model) in the process;
    ``malloc_trim`` hands them back, so the next run's peak resident size starts from the same baseline as the first.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # another C library (musl): nothing to trim
            pass


def _train_and_record(plan: Plan, run: PlannedRun, store: RunStore, label: str) -> None:
    """Build the run's model and train it; on a GPU, with the memory plan that fits it, retried with half the
    micro-batch after an out-of-memory error (accelerate's ``find_executable_batch_size``) rather than lost."""
    from accelerate.utils import find_executable_batch_size

    config = plan.config
    accelerator = make_accelerator(config.train.device, config.train.precision, config.report_to, store.folder,
                                   run.run_id)
    adapter = run.spec.adapter or config.adapter
    memory_plan = plan_for_device(plan.model_source, run.spec.method, config.train, adapter,
                                  accelerator.num_processes, accelerator.device, name=config.model)
    if memory_plan is not None and accelerator.is_main_process:
        print(f"memory plan: {memory_plan.reason}")

    def keep_what_was_trained(trained: torch.nn.Module, tokenizer) -> dict[str, Any]:
        """Saved before the summary event, so every complete run has its result on disk; sizes from those files."""
        saved = save_trained(trained, tokenizer, store.saved_dir(run.run_id), run.spec.method)
        return {"saved_to": store.saved_dir(run.run_id).name, "size": model_size(trained, run.spec.method, saved)}

    def attempt(per_device_batch: int) -> None:
        fitted = with_micro_batch_at_most(memory_plan, per_device_batch) if memory_plan is not None else None
        set_seed(run.spec.seed)  # adapter and head initialisation
        model, tokenizer = build_model(run.spec.method, plan.model_source, adapter,
                                       compute_dtype_for(accelerator.device, config.train.precision),
                                       run.record["labels"])
        try:
            run_info = {**run.record, "run_id": run.run_id, "profile": config.profile}
            if config.tune.enabled and run.spec.group != TUNE_GROUP:
                run_info["lr_source"] = TUNE_GROUP  # chosen by the tuning runs of this results folder
            # a tuning run's model is only a score: nothing worth keeping on disk
            on_finish = None if run.spec.group == TUNE_GROUP else functools.partial(keep_what_was_trained,
                                                                                  tokenizer=tokenizer)
            with contextlib.ExitStack() as stack:
                recorder = stack.enter_context(store.recorder(run.run_id)) if accelerator.is_main_process else None
                train(model, tokenizer, run.train_frame, run.eval_frame, config.train, lr=run.record["lr"],
                      seed=run.spec.seed, recorder=recorder, run_info=run_info, progress_label=label,
                      on_finish=on_finish, accelerator=accelerator, memory_plan=fitted)
        finally:
            del model, tokenizer
            _free_memory()

    if memory_plan is None:
        attempt(0)
    else:
        find_executable_batch_size(attempt, starting_batch_size=memory_plan.per_device_batch)()


def run_plan(plan: Plan) -> pd.DataFrame:
    """Train every run of ``plan`` not already complete, in order; one summary row per run.

    Each run is claimed before it trains (:meth:`~peft_utils.store.RunStore.claim`), so processes started on the
    same experiment share its runs: a run another process is training is passed over, and waited for at the end of
    its stage (the tuning runs, whose rates the others need; then the rest). Under ``accelerate launch`` every
    process executes the same plan (the runs' data parallel halves): the main process claims and the others follow
    its decisions; only the main process prints and writes. Runs of other settings in the folder are neither
    trained nor shown: the table holds the plan's runs."""
    store = RunStore(plan.config.results_dir)
    say = print if is_main_process() else (lambda *args, **kwargs: None)
    tuning_runs = sum(r.spec.group == TUNE_GROUP for r in plan.runs)
    _run_stage(plan, range(tuning_runs), store, say)
    for _ in range(GRID_WIDENINGS if tuning_runs else 0):  # a winner on its grid's edge: try one rate beyond it
        wider = _widened_config(_located(plan))
        if wider is None:
            break
        say("a tuned rate sits on its grid's edge; grids widened: " + _grids(wider))
        plan = plan_experiment(wider, plan.comparison, plan.sweep)
        tuning_runs = sum(r.spec.group == TUNE_GROUP for r in plan.runs)
        _run_stage(plan, range(tuning_runs), store, say)
    if tuning_runs:  # every tuning run is complete: choose the rates
        plan = _with_tuned_rates(_located(plan))
        say(_tuned_rates(plan))
    _run_stage(plan, range(tuning_runs, len(plan.runs)), store, say)
    return store.summary([run.run_id for run in _located(plan).runs])


def _run_stage(plan: Plan, stage: range, store: RunStore, say) -> None:
    """Train the stage's runs, passing over those another process is training, then wait for those. The runs
    already complete are named in one line, not one each: a re-run of a finished experiment says so once."""
    done = [plan.runs[index].run_id for index in stage if plan.runs[index].complete]
    if done:  # named while they fit on a line
        names = ": " + ", ".join(done) if len(done) <= 4 else ""
        say(f"{len(done)} of {len(stage)} runs already complete in {store.folder}, skipped{names}")
    passed_over = [index for index in stage if not _run_unless_busy(plan, index, store, say, wait=False)]
    for index in passed_over:
        _run_unless_busy(plan, index, store, say, wait=True)


def _grids(config: ExperimentConfig) -> str:
    return "; ".join(f"{method} " + ", ".join(f"{rate:g}" for rate in sorted(config.tune.grid[method]))
                     for method in dict.fromkeys(get_method(m).name for m in config.methods))


def _run_unless_busy(plan: Plan, index: int, store: RunStore, say, wait: bool) -> bool:
    """Train run ``index`` if it is neither complete nor being trained by another process; ``False`` when it is
    being trained (with ``wait``, it is waited for instead, and trained here if that process died first)."""
    run = plan.runs[index]
    position = f"run {index + 1}/{len(plan.runs)}"
    if run.complete:  # named by _run_stage
        store.mark_asked(run.run_id)  # the folder's default view shows the setting asked for last
        return True
    if wait and not store.is_complete(run.run_id):
        say(f"[{position}] {run.run_id}: waiting for the process training it to finish")
    decision, claim = _claim_in_every_process(store, run, plan.config.train.device, wait)
    if decision == BUSY:
        say(f"[{position}] {run.run_id}: being trained by another process; passed over for now")
        return False
    if decision == COMPLETE:
        say(f"[{position}] {run.run_id}: completed by another process in {store.folder}, skipped")
        return True
    run = replace(run, run_id=decision.partition(" ")[2])  # its file as claimed: see RunStore.claim
    say(f"[{position}] {run.run_id}: training ({plan.config.profile} profile)")
    try:
        _train_and_record(plan, run, store, f"{position} {run.spec.method}")
    finally:
        if claim is not None:
            claim.release()
    return True


# What the main process decided for a run, shared with the other processes of a launch: "train <run id>" names the
# file it trains in (its claim's).
TRAIN, COMPLETE, BUSY = "train", "complete", "busy"


def _claim_in_every_process(store: RunStore, run: PlannedRun, device: str,
                            wait: bool) -> tuple[str, Claim | None]:
    """(decision, the claim when this process holds it): the main process claims the run, and under a launch the
    others follow its decision, the run's file included."""
    decision, claim = BUSY, None
    if is_main_process():
        try:
            claim = store.claim(run.name, run.record, wait=wait)
            decision = f"{TRAIN} {claim.run_id}" if claim is not None else COMPLETE
        except RunInProgress:
            decision = BUSY
    return same_in_every_process(decision, device), claim


def _tuned_rates(plan: Plan) -> str:
    rates = {spec_series(r.spec): r.record["lr"] for r in plan.runs if r.spec.group != TUNE_GROUP}
    return "learning rates chosen on held-out train rows: " + ", ".join(f"{s} {lr:g}" for s, lr in rates.items())


def run_comparison(config: ExperimentConfig) -> pd.DataFrame:
    """Train the configuration's methods for every seed (resuming; with ``lr="tune"`` after their tuning runs), one
    summary row per comparison run."""
    table = run_plan(plan_experiment(config, comparison=True, sweep=False))
    return table[table["group"] == COMPARISON_GROUP].reset_index(drop=True)


def run_sweep(config: ExperimentConfig) -> pd.DataFrame:
    """Train LoRA over the configuration's rank x alpha/rank grid (group ``"sweep"``), one summary row per run."""
    table = run_plan(plan_experiment(config, comparison=False, sweep=True))
    return table[table["group"] == SWEEP_GROUP].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", choices=("auto", *PROFILE_NAMES),
                        help="a profile fixes every setting; the flags below override it")
    parser.add_argument("--sweep-only", action="store_true", help="run only the LoRA rank x alpha grid")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="train and print the table only; draw later with python -m peft_utils.plots RESULTS IMGS")
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:  # a mistake in the user's input is one line, never a traceback
        if args.sweep_only and args.sweep is False:
            raise ValueError("--sweep-only runs only the sweep and --no-sweep turns it off: give one of them")
        config = make_config(args.profile, **cli_parameters(args))
        plan = plan_experiment(config, comparison=not args.sweep_only, sweep=True if args.sweep_only else None)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = run_plan(plan)
    if not is_main_process():  # the other processes trained their halves; the main one reports
        return 0
    columns = [c for c in ("run_id", "final_accuracy", "train_time_s", "peak_memory_bytes", "trainable_params",
                           "size.disk_bytes") if c in table.columns]
    print(table[columns].to_string(index=False))
    several = settings_text(config.results_dir)  # the folder's other settings: the table shows those asked for now
    if several:
        print(f"\n{several}")
    if args.figures:
        from .plots import plot_all  # matplotlib only once there is something to draw

        plot_all(config.results_dir, config.figures_dir, run_ids=list(table["run_id"]))
        print(f"figures: {config.figures_dir}")
    if args.sentences:  # only when asked: it loads every run's saved result again
        from .inference import predict_runs

        print(predict_runs(config.results_dir, list(table["run_id"]), config.sentences).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
