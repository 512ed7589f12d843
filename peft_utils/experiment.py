"""The comparison itself: plan every run, check the plan, then build each method's model, train it and record it.

Planning reads the data, the model's config and the results folder once and raises every mistake as one line
before anything trains; the plan (each run's rows, settings and file) is then trained stage by stage, skipping the
runs the folder holds complete. On a shared CPU, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: spinning
OpenMP threads made the ``cpu`` profile up to 10x slower in our measurements.
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
from .config import PROFILE_NAMES, ExperimentConfig, add_cli_arguments, cli_parameters, make_config
from .core.inject import kept_modules, select_targets
from .core.loop import set_seed
from .core.quant import require_bitsandbytes
from .core.settings import AdapterSettings
from .core.targets import meta_skeleton
from .data import Splits, fingerprint, fit_sizes, load_splits, train_and_eval_rows
from .devices import (compute_dtype_for, is_main_process, launched_processes, make_accelerator, per_device_batch_size,
                      resolve_device, same_in_every_process)
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
    """One planned run: ``adapter`` is ``None`` for full fine-tuning, ``lr`` a tuning run's grid point (``None`` for
    the others: their rate, configured or tuned, is in the run's record)."""

    group: str
    method: str
    seed: int
    adapter: AdapterSettings | None
    lr: float | None = None

    @property
    def series(self) -> str:
        return series_name(self.method, self.adapter.targets if self.adapter is not None else None)


def run_id(spec: RunSpec, model: str | Path) -> str:
    """The run's readable file name, e.g. ``tune-lora-all-linear-r8-a16-lr0.003-s0-minilm`` (default targets
    unnamed, the model by the last part of its name)."""
    model_slug = re.sub(r"[^a-z0-9.]+", "-", Path(str(model)).name.lower()).strip("-") or "model"
    adapter = ""
    if spec.adapter is not None:
        slug = targets_slug(spec.adapter.targets)
        adapter = (f"-{slug}" if slug else "") + f"-r{spec.adapter.rank}-a{spec.adapter.alpha:g}"
        adapter += "-rslora" if spec.adapter.rslora else ""
    rate = f"-lr{spec.lr:g}" if spec.lr is not None else ""
    return f"{spec.group}-{spec.method}{adapter}{rate}-s{spec.seed}-{model_slug}"


def _specs(config: ExperimentConfig, comparison: bool, sweep: bool) -> list[RunSpec]:
    """The comparison (every method on every target set, per seed) and the sweep (LoRA over ranks x alpha/rank ratios
    on the first target set: a fixed ratio keeps the update's scale, so a line shows capacity alone), after their
    tuning runs when ``lr="tune"``: one per series, rate of the method's grid and tuning seed."""
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
    """``record``: every setting that changes the result, as its ``config`` event records it (``lr`` is ``None``
    until tuning chooses it); ``run_id`` and ``complete``: its file in the results folder (:func:`_located`)."""

    spec: RunSpec
    record: dict[str, Any]
    train_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    run_id: str = ""
    complete: bool = False

    @property
    def name(self) -> str:
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
    per_device_batch_size(config.train.batch_size, launched_processes(), config.train.grad_accum_steps)
    compute_dtype = compute_dtype_for(resolve_device(config.train.device), config.train.precision)
    splits = load_splits(config.data)
    config, adapted = fit_sizes(config, splits, sweep)
    runs = _planned_runs(config, specs, splits, str(compute_dtype).removeprefix("torch."))
    source = resolve_model_source(config.model, config.data.data_dir)
    _check_model(config, source, specs, len(splits.label_names))
    store = RunStore(config.results_dir)
    store.check_writable()
    if adapted:  # once every check has passed: the one line before anything trains
        _say(f"sizes adapted to the data: {adapted}")
    return _located(Plan(config, store, source, compute_dtype, runs))


def _planned_runs(config: ExperimentConfig, specs: Sequence[RunSpec], splits: Splits, compute_dtype: str
                  ) -> list[PlannedRun]:
    """Each run with its rows (tuning runs score held-out train rows, the others dev rows) and its record: group,
    method, identity (:data:`~peft_utils.store.IDENTITY_KEYS`, ``rslora`` for the sweep only), the data's source,
    classes and eval labels (for paired tests)."""
    sweep_config = replace(config, data=replace(config.data, train_size=config.sweep.train_size))
    frames = {}
    for group, seed in dict.fromkeys((s.group, s.seed) for s in specs):
        if group == TUNE_GROUP:
            frames[group, seed] = tuning_rows(config, splits.train, seed)
        elif group == SWEEP_GROUP and config.sweep.train_size is not None:
            frames[group, seed] = train_and_eval_rows(sweep_config, splits.train, splits.dev, seed, "sweep_train_size")
        else:
            frames[group, seed] = train_and_eval_rows(config, splits.train, splits.dev, seed)
    data_fingerprint = fingerprint(splits.train, splits.dev)  # what the rows are drawn from
    no_adapter = dict.fromkeys(f.name for f in fields(AdapterSettings))
    runs = []
    for spec in specs:
        train_frame, eval_frame = frames[spec.group, spec.seed]
        lr = spec.lr if spec.lr is not None or config.tune.enabled else config.lr[spec.method]
        values = {"model": config.model, "train_size": len(train_frame), "eval_size": len(eval_frame),
                  "data_fingerprint": data_fingerprint, "lr": lr, "seed": spec.seed, "compute_dtype": compute_dtype,
                  **asdict(config.train), **(asdict(spec.adapter) if spec.adapter else no_adapter)}
        keys = [k for k in IDENTITY_KEYS if k != "rslora" or spec.group == SWEEP_GROUP]
        record = {"group": spec.group, "method": spec.method, **{key: values[key] for key in keys}}
        if spec.group == TUNE_GROUP:
            record["eval_split"] = EVAL_SPLIT
        record |= {"dataset": config.data.dataset, "data_source": splits.source, "dev_split": splits.dev_split,
                   "labels": list(splits.label_names), "eval_labels": eval_frame["label"].tolist()}
        runs.append(PlannedRun(spec, record, train_frame, eval_frame))
    return runs


def _check_model(config: ExperimentConfig, source: str, specs: Sequence[RunSpec], num_labels: int) -> None:
    """Each mistake one line with the numbers, before any model is built: bitsandbytes for 4-bit methods;
    ``max_length`` within the position embeddings; on a weightless skeleton, targets that match layers but not the
    head, ``modules_to_save`` holding no target, and ranks at most the narrowest target's width (a larger rank adds
    parameters but no capacity)."""
    from transformers import AutoConfig

    from .core.layers import base_features

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
    if not adapted:
        return
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
        widest = max((s for s in adapted if s.adapter.targets == targets), key=lambda s: s.adapter.rank, default=None)
        width, name = min((min(base_features(module)), name) for name, module in layers)
        if widest is not None and widest.adapter.rank > width:
            rank = widest.adapter.rank
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
    """Train every run of ``plan`` not already complete, stage by stage (tuning, comparison, grid); one summary row
    per run. Runs are claimed before they train (:meth:`~peft_utils.store.RunStore.claim`), so processes on one
    experiment share them: a run another process is training is passed over, then waited for at the end of its
    stage (the later stages train with the tuning runs' rates). With ``workers`` (``sweep_workers`` for the grid)
    > 1, that many processes on this device share each stage so; under ``accelerate launch`` the main process
    claims and the others follow."""
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
    """Train the tuning runs, then the plan with every other run's rate chosen from their records (a resume picks the
    same rates). A grid whose winner sits on its edge is first widened and its new rates trained."""
    grid = plan.config.tune.grid
    for widenings in range(GRID_WIDENINGS + 1):
        plan = _run_stage(plan, TUNE_GROUP)
        rates = choose_learning_rates(plan.store.summary([r.run_id for r in plan.runs if r.spec.group == TUNE_GROUP]))
        wider = dict(grid)
        for series, rate in rates.items():
            method = series_method(series)
            wider[method] = widened_grid(wider[method], rate) or wider[method]
        if wider == grid or widenings == GRID_WIDENINGS:
            break
        grid = wider
        _say("a tuned rate sits on its grid's edge; grids widened: " + "; ".join(
            f"{method} " + ", ".join(f"{rate:g}" for rate in grid[method]) for method in plan.config.methods))
        # each series' and seed's tuning run at each rate of the wider grid: the same data and settings, the rate aside
        tuning = {replace(run.spec, lr=None): run for run in plan.runs if run.spec.group == TUNE_GROUP}
        runs = [replace(run, spec=replace(spec, lr=rate), record={**run.record, "lr": rate})
                for spec, run in tuning.items() for rate in grid[spec.method]]
        plan = _located(replace(plan, runs=runs + [r for r in plan.runs if r.spec.group != TUNE_GROUP]))
    runs = [replace(run, record={**run.record, "lr": rates[run.spec.series]}) if run.record["lr"] is None
            else run for run in plan.runs]
    chosen = {r.spec.series: r.record["lr"] for r in runs if r.spec.group != TUNE_GROUP}
    _say("learning rates chosen on held-out train rows: " + ", ".join(f"{s} {lr:g}" for s, lr in chosen.items()))
    return _located(replace(plan, runs=runs))


def _located(plan: Plan) -> Plan:
    """The plan with each run's file and completion read from the folder again: runs finish in other processes too."""
    places = plan.store.find([(run.name, run.record) for run in plan.runs])
    return replace(plan, runs=[replace(run, run_id=found, complete=complete)
                               for run, (found, complete) in zip(plan.runs, places)])


def _say(line: str) -> None:
    if is_main_process():
        print(line, flush=True)


def _run_stage(plan: Plan, group: str) -> Plan:
    """The plan after training the runs of ``group``, with the stage's workers beside this process (no more than it
    has runs to train); the records say how many ran at once."""
    config = plan.config
    asked = config.sweep.workers if group == SWEEP_GROUP and config.sweep.workers else config.train.workers
    workers = max(1, min(asked, sum(run.spec.group == group and not run.complete for run in plan.runs)))
    staged = replace(plan, config=replace(config, train=replace(config.train, workers=workers)))
    with workers_beside(functools.partial(_train_stage, staged, group), workers,
                        resolve_device(config.train.device).type):
        staged = _train_stage(staged, group)
    return replace(staged, config=config)


def _train_stage(plan: Plan, group: str) -> Plan:
    """Train the runs of ``group``, passing over those another process is training, then wait for those."""
    stage = [index for index, run in enumerate(plan.runs) if run.spec.group == group]
    done = [plan.runs[index].run_id for index in stage if plan.runs[index].complete]
    if done:  # named while they fit on a line
        names = ": " + ", ".join(done) if len(done) <= 4 else ""
        _say(f"{len(done)} of {len(stage)} runs already complete in {plan.store.folder}, skipped{names}")
    passed_over = [index for index in stage if not _run_unless_busy(plan, index, wait=False)]
    for index in passed_over:
        _run_unless_busy(plan, index, wait=True)
    return _located(plan)


# What the main process decided for a run, which the other processes of a launch follow: its claim's run id, or these.
COMPLETE, BUSY = "<complete>", "<busy>"


def _run_unless_busy(plan: Plan, index: int, wait: bool) -> bool:
    """Train run ``index`` unless it is complete or another process trains it (``False``; with ``wait``, waited for,
    and trained here if that process died first)."""
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
    with claim or contextlib.nullcontext():  # released when the run ends, trained or failed
        steps_after = sum(planned_steps(plan, later) for later in plan.runs[index + 1:] if not later.complete)
        _train_and_record(plan, replace(run, run_id=decision), f"{position} {run.spec.method}",
                          steps_after // plan.config.train.workers)
    return True


def planned_steps(plan: Plan, run: PlannedRun) -> int:
    """The optimiser steps ``run`` will train."""
    return math.ceil(len(run.train_frame) / plan.config.train.batch_size) * plan.config.train.epochs


def _train_and_record(plan: Plan, run: PlannedRun, label: str, steps_after: int) -> None:
    """Build the run's model and train it; on a GPU with the memory plan that fits it, retried with half the
    micro-batch after an out-of-memory error rather than lost."""
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
    """Train the configuration's methods for every seed (resuming), one summary row per comparison run."""
    return _run_group(config, COMPARISON_GROUP)


def run_sweep(config: ExperimentConfig) -> pd.DataFrame:
    """Train LoRA over the configuration's rank x alpha/rank grid (group ``"sweep"``), one summary row per run."""
    return _run_group(config, SWEEP_GROUP)


def _run_group(config: ExperimentConfig, group: str) -> pd.DataFrame:
    """Train the plan of ``group`` alone (and the tuning it needs); the summary rows of ``group``'s runs."""
    table = run_plan(plan_experiment(config, comparison=group == COMPARISON_GROUP, sweep=group == SWEEP_GROUP))
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
