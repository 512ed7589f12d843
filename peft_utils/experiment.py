"""The comparison itself: plan every run, check the plan, then build each method's model, train it and record it.

An experiment is an :class:`~peft_utils.config.ExperimentConfig` (a profile plus the user's parameters). Running
it has two phases, so that a mistake costs a one-line error and not a finished full fine-tuning run:

1. **plan** (:func:`plan_experiment`): the runs (methods x seeds, and the LoRA sweep grid), their data rows, and
   checks that need the data or the model — sizes that fit the splits, targets that match a layer of the model,
   bitsandbytes for 4-bit methods, and the results folder (a run whose settings differ from a finished run of its
   series is refused, see :class:`~peft_utils.store.RunStore`).
2. **execute** (:func:`execute`): every run not already complete is built from the same base weights, trained with
   the same seed, data and schedule, and streamed to ``<results_dir>/<run_id>.jsonl``; a re-run resumes at the first
   unfinished run.

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: OpenMP threads
that spin while waiting for a busy core made the ``cpu`` profile up to 10x slower in our measurements.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import (
    PROFILE_NAMES,
    AdapterSettings,
    ExperimentConfig,
    add_cli_arguments,
    cli_parameters,
    compute_dtype_for,
    make_config,
)
from .checkpoints import save_trained
from .data import load_sst2, subset
from .inject import apply_adapters, select_targets
from .methods import get_method
from .models import load_model, materialize_model, resolve_model_source
from .quant import load_quantized, prepare_for_kbit_training, require_bitsandbytes
from .sizes import model_size
from .store import SWEEP_GROUP, RunStore
from .train import resolve_device, set_seed, train

COMPARISON_GROUP = "comparison"
EVAL_SUBSET_SEED = 0  # an eval subset must not change with the run seed: every run is scored on the same rows


# --------------------------------------------------------------------------------------------- models


def build_model(method: str, model_source: str | Path, adapter: AdapterSettings = AdapterSettings(),
                dtype: torch.dtype = torch.float32):
    """A fresh ``(model, tokenizer)`` for ``method``, from the pretrained base every method shares.

    - ``full``: the base in float32 (the optimiser's master weights), every parameter trainable.
    - ``lora`` / ``dora``: the frozen base stored in ``dtype`` (the autocast dtype: bf16 on a GPU, where a
      float32 copy of a frozen weight would only cost memory), adapters + head trainable in float32.
    - ``qlora`` / ``qdora``: the base's linear layers in NF4 (double quantisation), computing in ``dtype``,
      then the same LoRA / DoRA adapters on top of the 4-bit layers.

    ``adapter`` (rank, alpha, dropout, targets) is ignored by ``full``.
    """
    kind = get_method(method)
    if kind.adapter is None:
        model, tokenizer = load_model(model_source)
        model.requires_grad_(True)
        return model, tokenizer
    if kind.quantized:
        model, tokenizer = load_quantized(model_source, compute_dtype=dtype)
        prepare_for_kbit_training(model)
    else:
        model, tokenizer = load_model(model_source, dtype=dtype)
    apply_adapters(model, kind.adapter, targets=adapter.targets, rank=adapter.rank, alpha=adapter.alpha,
                   dropout=adapter.dropout)
    _upcast_trainable(model)
    return model, tokenizer


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable tensors in float32: Adam updates of ~lr x 1e-3 vanish when added to bf16 weights."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One planned run. ``adapter`` is ``None`` for full fine-tuning (it has none)."""

    group: str
    method: str
    seed: int
    adapter: AdapterSettings | None


def model_slug(model: str | Path) -> str:
    """A short file-name-safe name: ``openai-community/gpt2-large`` -> ``gpt2-large``."""
    return re.sub(r"[^a-z0-9.]+", "-", Path(str(model)).name.lower()).strip("-") or "model"


def run_id(spec: RunSpec, model: str | Path) -> str:
    """``<group>-<method>[-r<rank>-a<alpha>]-s<seed>-<model>``, e.g. ``comparison-lora-r8-a16-s0-minilm``."""
    adapter = f"-r{spec.adapter.rank}-a{spec.adapter.alpha:g}" if spec.adapter is not None else ""
    return f"{spec.group}-{spec.method}{adapter}-s{spec.seed}-{model_slug(model)}"


def comparison_specs(config: ExperimentConfig) -> list[RunSpec]:
    """Every method for every seed, all with the configuration's adapter settings."""
    return [RunSpec(COMPARISON_GROUP, m, s, config.adapter if get_method(m).adapter else None)
            for s in config.seeds for m in config.methods]


def sweep_specs(config: ExperimentConfig) -> list[RunSpec]:
    """LoRA over ranks x alpha/rank ratios: a fixed ratio keeps the update's scale, so a line shows capacity alone."""
    return [RunSpec(SWEEP_GROUP, "lora", s, replace(config.adapter, rank=r, alpha=ratio * r))
            for s in config.seeds for ratio in config.sweep.alpha_ratios for r in config.sweep.ranks]


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    run_id: str
    record: dict[str, Any]  # every setting that changes the result, as the run's config event records it
    train_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    complete: bool


@dataclass(frozen=True)
class Plan:
    config: ExperimentConfig
    model_source: str  # where the model loads from (the cache folder of a random GPT-2, a hub id, a folder)
    runs: list[PlannedRun]


def _planned_record(config: ExperimentConfig, spec: RunSpec, frames: tuple[pd.DataFrame, pd.DataFrame]) -> dict:
    train_settings = {k: v for k, v in asdict(config.train).items() if k != "device"}  # "auto" is recorded resolved
    adapter = spec.adapter
    return {
        "group": spec.group, "method": spec.method, "model": config.model,
        "rank": adapter.rank if adapter else None, "alpha": adapter.alpha if adapter else None,
        "dropout": adapter.dropout if adapter else None, "targets": adapter.targets if adapter else None,
        "train_size": len(frames[0]), "eval_size": len(frames[1]), "lr": config.method_lr(spec.method),
        "seed": spec.seed, **train_settings,
    }


def _train_and_eval_rows(config: ExperimentConfig, splits: dict[str, pd.DataFrame],
                         seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows (a balanced subset drawn with the run seed) and eval rows (a fixed subset, or all of dev)."""
    train_size, eval_size = config.data.train_size, config.data.eval_size
    for name, size, split in (("train_size", train_size, "train"), ("eval_size", eval_size, "dev")):
        if size is not None and size > len(splits[split]):
            raise ValueError(f"{name}={size} is more than the {len(splits[split]):,} rows of the {split} split; "
                             f"ask for at most {len(splits[split]):,} or 'all'")
    try:
        train_frame = splits["train"] if train_size is None else subset(splits["train"], train_size, seed, balanced=True)
    except ValueError as error:
        raise ValueError(f"train_size={train_size}: {error}") from None
    eval_frame = splits["dev"] if eval_size is None else subset(splits["dev"], eval_size, EVAL_SUBSET_SEED)
    return train_frame, eval_frame


def _check_model(config: ExperimentConfig, source: str, specs: Sequence[RunSpec]) -> None:
    """Before anything trains: bitsandbytes for 4-bit methods; adapter targets that match a layer of the model."""
    kinds = [get_method(s.method) for s in specs]
    if any(k.quantized for k in kinds):
        require_bitsandbytes()
    if any(k.adapter for k in kinds):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        model_config = AutoConfig.from_pretrained(resolve_model_source(source), num_labels=2)
        with torch.device("meta"):  # the layer names only: no weights are read or allocated
            skeleton = AutoModelForSequenceClassification.from_config(model_config)
        try:
            select_targets(skeleton, config.adapter.targets)
        except (ValueError, TypeError) as error:
            raise type(error)(f"targets={config.adapter.targets!r} for {config.model}: {error}") from None


def plan_experiment(config: ExperimentConfig, comparison: bool = True, sweep: bool | None = None) -> Plan:
    """Every run of the experiment with its data, checked against the data, the model and the results folder.

    ``sweep``: ``None`` follows ``config.sweep.enabled``. Nothing is trained here; every error is raised here.
    """
    sweep = config.sweep.enabled if sweep is None else sweep
    specs = (comparison_specs(config) if comparison else []) + (sweep_specs(config) if sweep else [])
    if not specs:
        raise ValueError("nothing to run: neither the comparison nor the sweep was asked for")
    splits = load_sst2(config.data.data_dir)
    frames = {seed: _train_and_eval_rows(config, splits, seed) for seed in config.seeds}
    source = materialize_model(config.model, config.data.data_dir)
    _check_model(config, source, specs)
    store = RunStore(config.results_dir)
    runs = []
    for spec in specs:
        rid = run_id(spec, config.model)
        record = _planned_record(config, spec, frames[spec.seed])
        runs.append(PlannedRun(spec, rid, record, *frames[spec.seed], complete=store.check(rid, record)))
    return Plan(config, source, runs)


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
    config = plan.config
    dtype = compute_dtype_for(resolve_device(config.train.device))
    set_seed(run.spec.seed)  # adapter and head initialisation
    model, tokenizer = build_model(run.spec.method, plan.model_source, run.spec.adapter or config.adapter, dtype)
    def keep_what_was_trained(trained: torch.nn.Module) -> dict[str, Any]:
        """Saved before the summary event, so every complete run has its result on disk; sizes from those files."""
        saved = save_trained(trained, tokenizer, store.saved_dir(run.run_id), run.spec.method)
        return {"saved_to": store.saved_dir(run.run_id).name, "size": model_size(trained, run.spec.method, saved)}

    try:
        run_info = {**run.record, "run_id": run.run_id, "profile": config.profile}
        with store.recorder(run.run_id) as recorder:
            train(model, tokenizer, run.train_frame, run.eval_frame, config.train, lr=run.record["lr"],
                  seed=run.spec.seed, recorder=recorder, run_info=run_info, progress_label=label,
                  on_finish=keep_what_was_trained)
    finally:
        del model, tokenizer
        _free_memory()


def execute(plan: Plan) -> pd.DataFrame:
    """Train every run of ``plan`` not already complete, in order; one summary row per run."""
    store = RunStore(plan.config.results_dir)
    for index, run in enumerate(plan.runs, start=1):
        position = f"run {index}/{len(plan.runs)}"
        if run.complete:
            print(f"[{position}] {run.run_id}: already complete in {store.folder}, skipped")
            continue
        print(f"[{position}] {run.run_id}: training ({plan.config.profile} profile)")
        _train_and_record(plan, run, store, f"{position} {run.spec.method}")
    return store.summary([run.run_id for run in plan.runs])


def run_comparison(config: ExperimentConfig) -> pd.DataFrame:
    """Train the configuration's methods for every seed (resuming), one summary row per run."""
    return execute(plan_experiment(config, comparison=True, sweep=False))


def run_sweep(config: ExperimentConfig) -> pd.DataFrame:
    """Train LoRA over the configuration's rank x alpha/rank grid (group ``"sweep"``), one summary row per run."""
    return execute(plan_experiment(config, comparison=False, sweep=True))


# --------------------------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", choices=("auto", *PROFILE_NAMES),
                        help="a profile fixes every setting; the flags below override it")
    parser.add_argument("--sweep-only", action="store_true", help="run only the LoRA rank x alpha grid")
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:  # a mistake in the user's input is one line, never a traceback
        config = make_config(args.profile, **cli_parameters(args))
        plan = plan_experiment(config, comparison=not args.sweep_only, sweep=True if args.sweep_only else None)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = execute(plan)
    columns = [c for c in ("run_id", "final_accuracy", "train_time_s", "peak_memory_bytes", "trainable_params",
                           "size.disk_bytes") if c in table.columns]
    print(table[columns].to_string(index=False))
    from .plots import plot_all  # matplotlib only once there is something to draw

    plot_all(config.results_dir, config.figures_dir)
    print(f"figures: {config.figures_dir}")
    if args.sentences:  # only when asked: it loads every run's saved result again
        from .inference import predict_runs

        print(predict_runs(config.results_dir, list(table["run_id"]), config.sentences).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
