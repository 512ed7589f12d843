"""The comparison itself: plan every run, check the plan, then build each method's model, train it and record it.

An experiment is an :class:`~peft_utils.config.ExperimentConfig`. It runs in two phases, so that a mistake costs a
one-line error and not a finished full fine-tuning run:

1. **plan** (:func:`plan_experiment`): the runs (learning-rate tuning when ``lr="tune"``, methods x target sets x
   seeds, the LoRA rank x alpha grid), their data rows, and every check that needs the data, the model or the
   results folder (a run found there complete, by its settings, is skipped: :class:`~peft_utils.store.RunStore`).
2. **run** (:func:`run_plan`): the tuning runs first, then, with each series' rate chosen from their records, every
   other run not already complete: built from the same base weights, trained with the same seed, data and
   schedule, and streamed to ``<results_dir>/<run_id>.jsonl``; a re-run resumes.

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: OpenMP threads
that spin while waiting for a busy core made the ``cpu`` profile up to 10x slower in our measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .checkpoints import save_trained
from .config import PROFILE_NAMES, AdapterSettings, ExperimentConfig, add_cli_arguments, cli_parameters, make_config
from .core.inject import kept_modules, select_targets
from .core.loop import set_seed
from .core.quant import require_bitsandbytes
from .core.targets import meta_skeleton
from .data import Splits, fingerprint, fit_sizes, load_splits, train_and_eval_rows
from .devices import (is_main_process, launched_processes, make_accelerator, planned_compute, resolve_device,
                      same_in_every_process)
from .memory_plan import plan_for_device, with_micro_batch_at_most
from .methods import get_method, series_method, series_name, targets_slug
from .models import build_model, resolve_model_source
from .report import settings_text
from .sizes import model_size
from .store import COMPARISON_GROUP, IDENTITY_KEYS, SWEEP_GROUP, TUNE_GROUP, RunInProgress, RunStore
from .trackers import accelerator_arguments
from .train import Recording, train
from .tuning import EVAL_SPLIT, choose_learning_rates, tuning_rows, widened_grid
from .workers import worker_label, workers_beside


@dataclass(frozen=True)
class RunSpec:
    """One planned run. ``adapter`` is ``None`` for full fine-tuning (it has none); ``lr`` is set for a tuning
    run (its grid point) and ``None`` otherwise (the configured rate, or the tuned one)."""

    group: str
    method: str
    seed: int
    adapter: AdapterSettings | None
    lr: float | None = None

    @property
    def series(self) -> str:
        """The series the run belongs to (:func:`~peft_utils.methods.series_name`): its method and target set."""
        return series_name(self.method, self.adapter.targets if self.adapter is not None else None)


def run_id(spec: RunSpec, model: str | Path) -> str:
    """``<group>-<method>[-<targets>][-r<rank>-a<alpha>[-rslora]][-lr<rate>]-s<seed>-<model>``, e.g.
    ``tune-lora-all-linear-r8-a16-lr0.003-s0-minilm`` (default targets unnamed; the model by the last part of its
    name): the run's file name, unless another setting's run holds it (then with the setting's hash:
    :meth:`~peft_utils.store.RunStore.find`)."""
    model_slug = re.sub(r"[^a-z0-9.]+", "-", Path(str(model)).name.lower()).strip("-") or "model"
    adapter = ""
    if spec.adapter is not None:
        slug = targets_slug(spec.adapter.targets)
        adapter = (f"-{slug}" if slug else "") + f"-r{spec.adapter.rank}-a{spec.adapter.alpha:g}"
        adapter += "-rslora" if spec.adapter.rslora else ""
    rate = f"-lr{spec.lr:g}" if spec.lr is not None else ""
    return f"{spec.group}-{spec.method}{adapter}{rate}-s{spec.seed}-{model_slug}"


def _specs(config: ExperimentConfig, comparison: bool, sweep: bool) -> list[RunSpec]:
    """The comparison (every method on every target set, or once without an adapter for full fine-tuning, for
    every seed) and the sweep (LoRA over ranks x alpha/rank ratios on the first target set: a fixed ratio keeps
    the update's scale, so a line shows capacity alone), after their tuning runs when ``lr="tune"``: one per
    series, rate of the method's grid and tuning seed (:mod:`peft_utils.tuning`)."""
    specs = [RunSpec(COMPARISON_GROUP, m, s, adapter) for s in config.seeds for m in config.methods
             for adapter in (config.adapters if get_method(m).adapter else (None,))] if comparison else []
    specs += [RunSpec(SWEEP_GROUP, "lora", s, replace(config.adapters[0], rank=r, alpha=ratio * r,
                                                      rslora=config.sweep.rslora))
              for s in config.seeds for ratio in config.sweep.alpha_ratios for r in config.sweep.ranks] if sweep else []
    if not specs:
        raise ValueError("nothing to run: neither the comparison nor the sweep was asked for")
    if not config.tune.enabled:
        return specs
    # the sweep's LoRA runs use the rate tuned for LoRA on their target set
    series = dict.fromkeys((s.method, s.adapter) if s.group == COMPARISON_GROUP else ("lora", config.adapters[0])
                           for s in specs)
    return [RunSpec(TUNE_GROUP, m, seed, adapter, lr=rate) for seed in config.tune.seeds or config.seeds[:1]
            for m, adapter in series for rate in config.tune.grid[m]] + specs


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    # Every setting that changes the result, as the run's config event records it. Its "lr" is None while it
    # waits for learning-rate tuning (see ``_tuned``).
    record: dict[str, Any]
    train_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    # Read from the results folder (``_located``): its file's run id (``name``, or with its setting's hash where
    # another setting holds ``name``) and whether it is complete there.
    run_id: str = ""
    complete: bool = False

    @property
    def name(self) -> str:
        """Its readable run id (:func:`run_id`)."""
        return run_id(self.spec, self.record["model"])


@dataclass(frozen=True)
class Plan:
    config: ExperimentConfig
    store: RunStore  # the results folder
    model_source: str  # where the model loads from (the cache folder of a random GPT-2, a hub id, a folder)
    compute_dtype: torch.dtype  # every run's autocast dtype
    runs: list[PlannedRun]  # tuning runs first: the others' rates come from them


def plan_experiment(config: ExperimentConfig, comparison: bool = True, sweep: bool | None = None) -> Plan:
    """Every run of the experiment with its data, checked against the data, the model and the results folder:
    every error is raised here, before anything trains. ``sweep``: ``None`` follows ``config.sweep.enabled``."""
    sweep = config.sweep.enabled if sweep is None else sweep
    specs = _specs(config, comparison, sweep)
    if config.train.workers > 1 and launched_processes() > 1:
        raise ValueError(f"workers={config.train.workers} runs several runs at once on one device, and accelerate "
                         "launch spreads each run over several: give one of them")
    compute_dtype = planned_compute(config.train)
    splits = load_splits(config.data)
    config, adapted = fit_sizes(config, splits, sweep)
    # Which rows a run draws follows from its seed and sizes; what it draws them from is the splits' fingerprint.
    data = (fingerprint(splits.train, splits.dev), splits)
    frames = {key: _rows(config, splits, *key) for key in dict.fromkeys((s.group, s.seed) for s in specs)}
    source = resolve_model_source(config.model, config.data.data_dir)
    _check_model(config, source, specs, len(splits.label_names))
    store = RunStore(config.results_dir)
    store.check_writable()
    dtype = str(compute_dtype).removeprefix("torch.")
    runs = [PlannedRun(spec, _planned_record(config, spec, frames[spec.group, spec.seed], data, dtype),
                       *frames[spec.group, spec.seed]) for spec in specs]
    if adapted:  # once every check has passed: the one line before anything trains
        _say(f"sizes adapted to the data: {adapted}")
    return _located(Plan(config, store, source, compute_dtype, runs))


def _rows(config: ExperimentConfig, splits: Splits, group: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's (train rows, evaluation rows): tuning scores on held-out train rows, the others on dev."""
    if group == TUNE_GROUP:
        return tuning_rows(config, splits.train, seed)
    if group == SWEEP_GROUP and config.sweep.train_size is not None:
        config = replace(config, data=replace(config.data, train_size=config.sweep.train_size))
        return train_and_eval_rows(config, splits.train, splits.dev, seed, "sweep_train_size")
    return train_and_eval_rows(config, splits.train, splits.dev, seed)


def _planned_record(config: ExperimentConfig, spec: RunSpec, frames: tuple[pd.DataFrame, pd.DataFrame],
                    data: tuple[str, Splits], compute_dtype: str) -> dict:
    """Group, method and the run's identity (:data:`~peft_utils.store.IDENTITY_KEYS`, ``rslora`` for the sweep
    only) as its ``config`` event records it; then where its data was read from, its classes, and the labels of
    its eval rows (for paired tests). ``data``: (the fingerprint of the splits, the splits). The rate is ``None``
    while it waits for tuning."""
    adapter = asdict(spec.adapter) if spec.adapter else dict.fromkeys(f.name for f in fields(AdapterSettings))
    lr = spec.lr if spec.lr is not None or config.tune.enabled else config.lr[spec.method]
    values = {"model": config.model, "train_size": len(frames[0]), "eval_size": len(frames[1]),
              "data_fingerprint": data[0], "lr": lr, "seed": spec.seed, "compute_dtype": compute_dtype,
              **asdict(config.train), **adapter}
    keys = [k for k in IDENTITY_KEYS if k != "rslora" or spec.group == SWEEP_GROUP]
    record = {"group": spec.group, "method": spec.method, **{key: values[key] for key in keys}}
    if spec.group == TUNE_GROUP:
        record["eval_split"] = EVAL_SPLIT
    splits = data[1]
    return {**record, "dataset": config.data.dataset, "data_source": splits.source, "dev_split": splits.dev_split,
            "labels": list(splits.label_names), "eval_labels": frames[1]["label"].tolist()}


def _check_model(config: ExperimentConfig, source: str, specs: Sequence[RunSpec], num_labels: int) -> None:
    """Before any model is built, each mistake one line with the numbers: bitsandbytes for 4-bit methods;
    ``max_length`` within the position embeddings (a longer sentence would index past them mid-training); and the
    adapters' settings (:func:`_check_adapters`)."""
    from transformers import AutoConfig

    if any(get_method(s.method).quantized for s in specs):
        require_bitsandbytes()
    try:
        model_config = AutoConfig.from_pretrained(source, num_labels=num_labels)
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
    """On a weightless skeleton: targets that match layers of the model but not its head or embeddings;
    ``modules_to_save`` holding no target; and every rank at most the narrowest target layer's width (a larger rank
    adds parameters but no capacity, so a sweep would draw as different ranks what is one experiment)."""
    from .core.layers import base_features

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
                             f"{str(error).removeprefix('modules_to_save').lstrip(': ')}") from None
        on_these = [s for s in adapted if s.adapter.targets == targets]
        if not on_these:
            continue
        width, name = min((min(base_features(module)), name) for name, module in layers)
        widest = max(on_these, key=lambda s: s.adapter.rank)
        rank = widest.adapter.rank
        if rank > width:
            asked = f"sweep_ranks include {rank}" if widest.group == SWEEP_GROUP else f"rank={rank}"
            raise ValueError(f"{asked} but the narrowest target layer of {config.model}, {name}, is {width} wide, "
                             f"which caps its update's rank at {width}; ask for a rank of at most {width}")


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


def run_plan(plan: Plan) -> pd.DataFrame:
    """Train every run of ``plan`` not already complete, in order; one summary row per run of the plan.

    Each run is claimed before it trains (:meth:`~peft_utils.store.RunStore.claim`), so processes started on the
    same experiment share its runs: a run another process is training is passed over, and waited for at the end of
    its stage (the tuning runs, whose rates the others need; then the comparison; then the grid). Under
    ``accelerate launch`` every process executes the same plan (the runs' data parallel halves): the main process
    claims and the others follow its decisions; only the main process prints and writes. With ``workers`` (or
    ``sweep_workers``, for the grid) > 1, that many processes share a stage this way on this device
    (:func:`~peft_utils.workers.workers_beside`), this one among them."""
    todo = [run for run in plan.runs if not run.complete]
    if todo:
        _say(f"to train: {len(todo)} of the plan's {len(plan.runs)} runs, {sum(planned_steps(plan, r) for r in todo):,} "
             "optimiser steps (progress lines estimate the time left: plan ETA)")
    if plan.config.tune.enabled:
        plan = _tuned(plan)
    plan = _run_stage(plan, COMPARISON_GROUP)
    plan = _run_stage(plan, SWEEP_GROUP)
    return plan.store.summary([run.run_id for run in plan.runs])


# How often a tuning grid may be widened past an edge that a winner sits on (per experiment, both sides together).
GRID_WIDENINGS = 3


def _tuned(plan: Plan) -> Plan:
    """Train the tuning runs, then the plan with every other run's rate chosen from their records (so that a resumed
    experiment picks the same rates without training again). A grid whose winner sits on its edge is first widened
    (:func:`~peft_utils.tuning.widened_grid`) and its new rates trained, at most :data:`GRID_WIDENINGS` times."""
    for widenings in range(GRID_WIDENINGS + 1):
        plan = _run_stage(plan, TUNE_GROUP)
        rates = choose_learning_rates(plan.store.summary([r.run_id for r in plan.runs if r.spec.group == TUNE_GROUP]))
        grid = dict(plan.config.tune.grid)
        for series, rate in rates.items():
            method = series_method(series)
            grid[method] = widened_grid(grid[method], rate) or grid[method]
        if grid == plan.config.tune.grid or widenings == GRID_WIDENINGS:
            break
        _say("a tuned rate sits on its grid's edge; grids widened: " + "; ".join(
            f"{method} " + ", ".join(f"{rate:g}" for rate in grid[method]) for method in plan.config.methods))
        plan = _with_grid(plan, grid)
    runs = [replace(run, record={**run.record, "lr": rates[run.spec.series]}) if run.record["lr"] is None
            else run for run in plan.runs]
    chosen = {r.spec.series: r.record["lr"] for r in runs if r.spec.group != TUNE_GROUP}
    _say("learning rates chosen on held-out train rows: " + ", ".join(f"{s} {lr:g}" for s, lr in chosen.items()))
    return _located(replace(plan, runs=runs))


def _with_grid(plan: Plan, grid: dict[str, tuple[float, ...]]) -> Plan:
    """The plan with a tuning run per rate of ``grid``: each series' and seed's tuning run at each rate (its data
    and settings are the same, the rate aside), read from the folder as it is now."""
    templates = {replace(run.spec, lr=None): run for run in plan.runs if run.spec.group == TUNE_GROUP}
    runs = [replace(run, spec=replace(template, lr=rate), record={**run.record, "lr": rate})
            for template, run in templates.items() for rate in grid[template.method]]
    config = replace(plan.config, tune=replace(plan.config.tune, grid=grid))
    return _located(replace(plan, config=config, runs=runs + [r for r in plan.runs if r.spec.group != TUNE_GROUP]))


def _located(plan: Plan) -> Plan:
    """The plan with each run's file and completion read from the folder again: since it was planned, runs have
    finished, here or in another process, perhaps under their setting's hashed name."""
    places = plan.store.find([(run.name, run.record) for run in plan.runs])
    return replace(plan, runs=[replace(run, run_id=found, complete=complete)
                               for run, (found, complete) in zip(plan.runs, places)])


def _say(line: str) -> None:
    if is_main_process():
        print(line, flush=True)


def _run_stage(plan: Plan, group: str) -> Plan:
    """The plan after training the runs of ``group``, with the stage's workers (``sweep_workers`` for the grid,
    else ``workers``) beside this process; the runs' records say how many ran at once."""
    config = plan.config
    asked = config.sweep.workers if group == SWEEP_GROUP and config.sweep.workers else config.train.workers
    to_train = sum(run.spec.group == group and not run.complete for run in plan.runs)
    workers = max(1, min(asked, to_train))  # no process started for a run that is not there
    staged = replace(plan, config=replace(config, train=replace(config.train, workers=workers)))
    job = functools.partial(_train_stage, staged, group)
    with workers_beside(job, workers, resolve_device(config.train.device).type):
        staged = _train_stage(staged, group)
    return replace(staged, config=config)


def _train_stage(plan: Plan, group: str) -> Plan:
    """Train the runs of ``group``, passing over those another process is training, then wait for those; the plan
    as the folder now holds it. The runs already complete are named in one line: a re-run of a finished experiment
    says so once."""
    stage = [index for index, run in enumerate(plan.runs) if run.spec.group == group]
    done = [plan.runs[index].run_id for index in stage if plan.runs[index].complete]
    if done:  # named while they fit on a line
        names = ": " + ", ".join(done) if len(done) <= 4 else ""
        _say(f"{len(done)} of {len(stage)} runs already complete in {plan.store.folder}, skipped{names}")
    passed_over = [index for index in stage if not _run_unless_busy(plan, index, wait=False)]
    for index in passed_over:
        _run_unless_busy(plan, index, wait=True)
    return _located(plan)


# What the main process decided for a run, which the other processes of a launch follow: the file to train it in
# (its claim's run id), or one of these.
COMPLETE, BUSY = "<complete>", "<busy>"


def _run_unless_busy(plan: Plan, index: int, wait: bool) -> bool:
    """Train run ``index`` unless it is complete or another process trains it (``False``; with ``wait``, it is
    waited for instead, and trained here if that process died first)."""
    run, store = plan.runs[index], plan.store
    position = f"{worker_label()}run {index + 1}/{len(plan.runs)}"
    if run.complete:  # named by _train_stage
        store.mark_asked(run.run_id)  # the folder's default view shows the setting asked for last
        return True
    if wait and not store.is_complete(run.run_id):
        _say(f"[{position}] {run.run_id}: waiting for the process training it to finish")
    decision, claim = BUSY, None
    if is_main_process():
        with contextlib.suppress(RunInProgress):
            claim = store.claim(run.name, run.record, wait=wait)
            decision = COMPLETE if claim is None else claim.run_id
    decision = same_in_every_process(decision, plan.config.train.device)
    if decision == BUSY:
        _say(f"[{position}] {run.run_id}: being trained by another process; passed over for now")
        return False
    if decision == COMPLETE:
        _say(f"[{position}] {run.run_id}: completed by another process in {store.folder}, skipped")
        return True
    _say(f"[{position}] {decision}: training ({plan.config.profile} profile)")
    try:
        steps_after = sum(planned_steps(plan, later) for later in plan.runs[index + 1:] if not later.complete)
        _train_and_record(plan, replace(run, run_id=decision), f"{position} {run.spec.method}",
                          steps_after // plan.config.train.workers)
    finally:
        if claim is not None:
            claim.release()
    return True


def planned_steps(plan: Plan, run: PlannedRun) -> int:
    """The optimiser steps ``run`` will train."""
    return math.ceil(len(run.train_frame) / plan.config.train.batch_size) * plan.config.train.epochs


def _train_and_record(plan: Plan, run: PlannedRun, label: str, steps_after: int) -> None:
    """Build the run's model and train it; on a GPU, with the memory plan that fits it, retried with half the
    micro-batch after an out-of-memory error (accelerate's ``find_executable_batch_size``) rather than lost."""
    from accelerate.utils import find_executable_batch_size, release_memory

    config, store, method = plan.config, plan.store, run.spec.method
    accelerator = make_accelerator(config.train.device, config.train.precision,
                                   **accelerator_arguments(config.report_to, store.folder, run.run_id))
    adapter = run.spec.adapter or config.adapter
    memory_plan = plan_for_device(plan.model_source, method, config.train, adapter, accelerator, name=config.model)
    if memory_plan is not None:
        _say(f"memory plan: {memory_plan.reason}")
    run_info = {**run.record, "run_id": run.run_id, "profile": config.profile}
    if config.tune.enabled and run.spec.group != TUNE_GROUP:
        run_info["lr_source"] = TUNE_GROUP  # chosen by the tuning runs of this results folder

    def attempt(per_device_batch: int) -> None:
        fitted = with_micro_batch_at_most(memory_plan, per_device_batch) if memory_plan is not None else None
        set_seed(run.spec.seed)  # adapter and head initialisation
        model, tokenizer = build_model(method, plan.model_source, adapter, plan.compute_dtype, run.record["labels"])

        def keep_what_was_trained(trained: torch.nn.Module) -> dict[str, Any]:
            """Saved before the summary event, so every complete run has its result on disk; sizes from those files."""
            saved = save_trained(trained, tokenizer, store.saved_dir(run.run_id), method)
            return {"saved_to": store.saved_dir(run.run_id).name, "size": model_size(trained, method, saved)}

        # a tuning run's model is only a score: nothing worth keeping on disk
        on_finish = None if run.spec.group == TUNE_GROUP else keep_what_was_trained
        try:
            with store.recorder(run.run_id) if accelerator.is_main_process else contextlib.nullcontext() as recorder:
                train(model, tokenizer, run.train_frame, run.eval_frame, config.train, lr=run.record["lr"],
                      seed=run.spec.seed, recording=Recording(recorder, run_info, label, on_finish, steps_after),
                      accelerator=accelerator, memory_plan=fitted)
        finally:
            del model, tokenizer
            release_memory()  # the finished run's model and optimiser, before the next is built

    if memory_plan is None:
        attempt(0)
    else:
        find_executable_batch_size(attempt, starting_batch_size=memory_plan.per_device_batch)()


def run_comparison(config: ExperimentConfig) -> pd.DataFrame:
    """Train the configuration's methods for every seed (resuming; with ``lr="tune"`` after their tuning runs), one
    summary row per comparison run."""
    return _rows_of(run_plan(plan_experiment(config, comparison=True, sweep=False)), COMPARISON_GROUP)


def run_sweep(config: ExperimentConfig) -> pd.DataFrame:
    """Train LoRA over the configuration's rank x alpha/rank grid (group ``"sweep"``), one summary row per run."""
    return _rows_of(run_plan(plan_experiment(config, comparison=False, sweep=True)), SWEEP_GROUP)


def _rows_of(table: pd.DataFrame, group: str) -> pd.DataFrame:
    return table[table["group"] == group].reset_index(drop=True)


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
