"""The comparison itself: build each method's model from the same base, train it, record it; resume after a crash.

Three profiles fix every setting, so a result can be reproduced from its profile name:

- ``full``: GPT-2 Large on all of SST-2, on a GPU (the real comparison).
- ``cpu``: the pretrained all-MiniLM-L6-v2 on a balanced SST-2 subset, evaluated on the whole dev set, sized so
  that four methods and a small LoRA sweep finish in about ten minutes on two CPU cores.
- ``smoke``: a tiny random GPT-2 (real tokenizer) on a few dozen rows: checks the plumbing in seconds.

Every run streams to ``<results_dir>/<run_id>.jsonl`` (see :mod:`peft_utils.results`). A run whose file already
holds a ``summary`` is skipped, so re-running a comparison after a crash continues where it stopped. The
``run_id`` is built from group, method, rank, alpha, seed and model; a finished record under the same id but with
other settings is refused rather than silently reused.

On a CPU shared with other processes, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: OpenMP threads
that spin while waiting for a busy core made the ``cpu`` profile up to 10x slower in our measurements.
"""
from __future__ import annotations

import argparse
import gc
import json
import numbers
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .data import load_sst2, subset
from .checkpoints import save_adapters
from .inject import apply_adapters
from .models import GPT2_SHAPES, load_model, save_random_gpt2
from .quant import load_quantized, model_size, prepare_for_kbit_training
from .results import RunRecorder, is_complete, load_results, read_events
from .train import TrainConfig, compute_dtype, resolve_device, set_seed, train

METHODS = ("full", "lora", "dora", "qlora", "qdora")
# Which adapter each method injects, and whether its frozen base is 4-bit.
ADAPTER_OF = {"lora": "lora", "dora": "dora", "qlora": "lora", "qdora": "dora"}
QUANTIZED = ("qlora", "qdora")
# "random-gpt2-<size>" names a randomly initialised GPT-2 written on first use (size: models.GPT2_SHAPES).
RANDOM_GPT2_PREFIX = "random-gpt2-"
EVAL_SUBSET_SEED = 0  # an eval subset must not change with the run seed: every run is scored on the same rows

# Learning rates: ~2e-5 is the usual full fine-tuning rate for GPT-2/BERT-size models; adapters move far fewer
# weights from a zero update and take ~10x more (2e-4: LoRA and QLoRA papers; DoRA uses LoRA's settings).
_GPU_LR = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "qdora": 2e-4}
# MiniLM is small and the CPU runs are short (250 steps): both rates are raised. Measured on this profile:
# full 1e-4 -> 83.4% dev accuracy; LoRA 5e-4 / 1e-3 / 2e-3 -> 78.3% / 80.6% / 83.0%.
_CPU_LR = {"full": 1e-4, "lora": 2e-3, "dora": 2e-3, "qlora": 2e-3, "qdora": 2e-3}

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "model": "openai-community/gpt2-large", "device": "cuda", "methods": METHODS,
        "train_size": None, "eval_size": None, "epochs": 1, "batch_size": 16, "max_length": 128,
        "lr": _GPU_LR, "rank": 8, "alpha": 16, "dropout": 0.05, "targets": None,
        "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "grad_accum_steps": 1,
        "eval_every": 1000, "log_every": 10, "bucket_by_length": True, "gradient_checkpointing": False,
        # Ratios 1 and 4 (not 2): no sweep point repeats the comparison's LoRA run (r=8, alpha=16).
        "sweep_ranks": (2, 8, 32), "sweep_alpha_ratios": (1, 4),
    },
    # Measured on 2 shared CPU cores, 4 methods + the 3-run sweep: 7.5-8.3 min under load from other jobs
    # (about 4.5 min idle); dev accuracy 82-83% (sweep r=2: 80%). See the module docstring for OMP_WAIT_POLICY.
    "cpu": {
        "model": "minilm", "device": "cpu", "methods": ("full", "lora", "dora", "qlora"),
        "train_size": 4000, "eval_size": None, "epochs": 1, "batch_size": 16, "max_length": 64,
        "lr": _CPU_LR, "rank": 8, "alpha": 16, "dropout": 0.05, "targets": None,
        "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "grad_accum_steps": 1,
        "eval_every": 125, "log_every": 5, "bucket_by_length": True, "gradient_checkpointing": False,
        # alpha = r: no point repeats the comparison's LoRA run (r=8, alpha=16).
        "sweep_ranks": (2, 8, 32), "sweep_alpha_ratios": (1,),
    },
    "smoke": {
        "model": "random-gpt2-tiny", "device": "auto", "methods": METHODS,
        "train_size": 32, "eval_size": 32, "epochs": 1, "batch_size": 8, "max_length": 32,
        "lr": 1e-3, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": None,
        "weight_decay": 0.01, "warmup_ratio": 0.0, "max_grad_norm": 1.0, "grad_accum_steps": 1,
        "eval_every": None, "log_every": 1, "bucket_by_length": False, "gradient_checkpointing": False,
        "sweep_ranks": (2, 4), "sweep_alpha_ratios": (1, 2),
    },
}
_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"lr", "seed"}
_RUN_KEYS = {"model", "methods", "train_size", "eval_size", "lr", "rank", "alpha", "dropout", "targets",
             "sweep_ranks", "sweep_alpha_ratios"}


_SIZE_KEYS = ("train_size", "eval_size")


def _row_count(key: str, value: Any) -> int | None:
    """A subset size override: a positive int, or ``"all"`` -> ``None`` (every row of the split)."""
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{key} must be a positive number of rows or 'all', got {value!r}")
    return int(value)


def resolve_profile(profile: str = "auto") -> str:
    """``"auto"`` -> ``"full"`` with a CUDA GPU, else ``"cpu"``; any other name is checked and returned."""
    if profile == "auto":
        return "full" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose 'auto' or one of {tuple(PROFILES)}")
    return profile


def profile_settings(profile: str = "auto", **overrides: Any) -> dict[str, Any]:
    """The profile's settings with ``overrides`` applied (``None`` values are ignored, to ease CLI use).

    ``lr`` may be one float for every method or a ``{method: lr}`` dict (merged into the profile's).
    ``train_size`` / ``eval_size`` take a positive row count or ``"all"``: since ``None`` already means
    "keep the profile's value", "every row" needs a spelling of its own (stored as ``None`` in the settings).
    """
    name = resolve_profile(profile)
    unknown = sorted(set(overrides) - _TRAIN_KEYS - _RUN_KEYS)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(_TRAIN_KEYS | _RUN_KEYS)}")
    settings = {**PROFILES[name], "profile": name}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "lr" and isinstance(value, dict) and isinstance(settings["lr"], dict):
            value = {**settings["lr"], **value}
        if key in _SIZE_KEYS:
            value = _row_count(key, value)
        settings[key] = value
    return settings


# --------------------------------------------------------------------------------------------- models


def check_method(method: str) -> str:
    """``method`` itself, or a ValueError naming every known method (typos fail before any training)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return method


def build_model(
    method: str,
    model_source: str | Path,
    rank: int | None = 8,
    alpha: float | None = 16,
    dropout: float = 0.0,
    targets: str | Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A fresh ``(model, tokenizer)`` for ``method``, from the pretrained base every method shares.

    - ``full``: the base in float32 (the optimiser's master weights), every parameter trainable.
    - ``lora`` / ``dora``: the frozen base stored in ``dtype`` (the autocast dtype: bf16 on a GPU, where a
      float32 copy of a frozen weight would only cost memory), adapters + head trainable in float32.
    - ``qlora`` / ``qdora``: the base's linear layers in NF4 (double quantisation), computing in ``dtype``,
      then the same LoRA / DoRA adapters on top of the 4-bit layers.

    ``targets``: layers to adapt (``None``: the model's default, see ``inject.default_targets``).
    ``rank``, ``alpha``, ``dropout`` and ``targets`` are ignored by ``full``.
    """
    check_method(method)
    if method == "full":
        model, tokenizer = load_model(model_source)
        model.requires_grad_(True)
        return model, tokenizer
    if method in QUANTIZED:
        model, tokenizer = load_quantized(model_source, compute_dtype=dtype)
        prepare_for_kbit_training(model)
    else:
        model, tokenizer = load_model(model_source, dtype=dtype)
    apply_adapters(model, ADAPTER_OF[method], targets, rank, alpha, dropout)
    _upcast_trainable(model)
    return model, tokenizer


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable tensors in float32: Adam updates of ~lr x 1e-3 vanish when added to bf16 weights."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def size_report(model: torch.nn.Module, method: str) -> dict[str, Any]:
    """``quant.model_size`` with, for adapter methods, the real bytes ``save_adapters`` writes."""
    if method == "full":
        return model_size(model, method)
    with tempfile.TemporaryDirectory() as folder:
        return model_size(model, method, adapter_bytes=save_adapters(model, folder))


def materialize_model(model: str, results_dir: str | Path, data_dir: str | Path | None) -> str:
    """The path or hub id to load ``model`` from; ``random-gpt2-<size>`` is written once under ``results_dir``.

    The random GPT-2 gets the real GPT-2 tokenizer from the data folder (``gpt2-tokenizer/``), so tokenisation,
    padding and the last-token classifier behave exactly as with the pretrained model.
    """
    if not model.startswith(RANDOM_GPT2_PREFIX):
        return model
    size = model.removeprefix(RANDOM_GPT2_PREFIX)
    if size not in GPT2_SHAPES:
        raise ValueError(f"unknown random GPT-2 size in {model!r}; choose one of {sorted(GPT2_SHAPES)}")
    folder = Path(results_dir) / "_models" / model
    if not (folder / "config.json").is_file():
        save_random_gpt2(folder, tokenizer_dir(data_dir), size)
    return str(folder)


def tokenizer_dir(data_dir: str | Path | None) -> Path:
    """``gpt2-tokenizer/`` beside the SST-2 folder: in ``data_dir``, its parent, or ``$PEFT_LAB_DATA``."""
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


# --------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One planned run. ``rank``/``alpha`` are ``None`` for full fine-tuning (it has no adapter)."""

    group: str
    method: str
    rank: int | None
    alpha: float | None
    seed: int


def model_slug(model: str | Path) -> str:
    """A short file-name-safe name: ``openai-community/gpt2-large`` -> ``gpt2-large``."""
    return re.sub(r"[^a-z0-9.]+", "-", Path(str(model)).name.lower()).strip("-") or "model"


def run_id(spec: RunSpec, model: str | Path) -> str:
    """``<group>-<method>[-r<rank>-a<alpha>]-s<seed>-<model>``, e.g. ``comparison-lora-r8-a16-s0-minilm``."""
    adapter = f"-r{spec.rank}-a{spec.alpha:g}" if spec.rank is not None else ""
    return f"{spec.group}-{spec.method}{adapter}-s{spec.seed}-{model_slug(model)}"


def _spec(group: str, method: str, rank: int, alpha: float, seed: int) -> RunSpec:
    check_method(method)
    if method == "full":
        return RunSpec(group, method, None, None, seed)
    return RunSpec(group, method, int(rank), float(alpha), seed)


def _method_lr(lr: float | dict[str, float], method: str) -> float:
    if isinstance(lr, dict):
        if method not in lr:
            raise ValueError(f"no learning rate for method {method!r} in {lr}")
        return float(lr[method])
    return float(lr)


def _frames(settings: dict[str, Any], splits: dict[str, pd.DataFrame], seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows (balanced subset, picked by the run seed) and eval rows (a fixed subset, or all of dev)."""
    train_size, eval_size = settings["train_size"], settings["eval_size"]
    train_frame = splits["train"] if train_size is None else subset(splits["train"], train_size, seed, balanced=True)
    eval_frame = splits["dev"] if eval_size is None else subset(splits["dev"], eval_size, EVAL_SUBSET_SEED)
    return train_frame, eval_frame


def _planned_record(spec: RunSpec, settings: dict[str, Any], config: TrainConfig,
                    frames: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, Any]:
    """The settings a finished record must match to be reused (as they appear in its ``config`` event)."""
    train_config = {k: v for k, v in vars(config).items() if k != "device"}  # "auto" is recorded resolved
    adapter = spec.rank is not None  # full fine-tuning has no adapter dropout or targets
    planned = {
        "group": spec.group, "method": spec.method, "model": str(settings["model"]), "rank": spec.rank,
        "alpha": spec.alpha, "dropout": settings["dropout"] if adapter else None,
        "targets": settings["targets"] if adapter else None, "train_size": len(frames[0]),
        "eval_size": len(frames[1]), **train_config,
    }
    return json.loads(json.dumps(planned))  # tuples -> lists, as read back from JSON


def _check_recorded(path: Path, planned: dict[str, Any]) -> None:
    config = next((e for e in read_events(path) if e.get("event") == "config"), {})
    differ = {k: (config.get(k), v) for k, v in planned.items() if config.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: recorded {old!r}, now {new!r}" for k, (old, new) in sorted(differ.items()))
        raise ValueError(
            f"{path} is a finished run with other settings ({details}); use another results_dir or group, "
            "or delete that file to run it again"
        )


def _free_memory() -> None:
    """Drop the finished run's model and optimiser before the next one is built (peak memory is per run)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _execute(spec: RunSpec, settings: dict[str, Any], splits: dict[str, pd.DataFrame],
             data_dir: str | Path | None, results_dir: Path) -> str:
    """Train and record one run unless an identical one is already complete; returns its run_id."""
    rid = run_id(spec, settings["model"])
    config = TrainConfig(**{k: settings[k] for k in _TRAIN_KEYS if k in settings},
                         lr=_method_lr(settings["lr"], spec.method), seed=spec.seed)
    frames = _frames(settings, splits, spec.seed)
    planned = _planned_record(spec, settings, config, frames)
    if is_complete(results_dir, rid):
        _check_recorded(results_dir / f"{rid}.jsonl", planned)
        print(f"[{rid}] already complete in {results_dir}: skipped")
        return rid
    dtype = compute_dtype(resolve_device(config.device))
    source = materialize_model(str(settings["model"]), results_dir, data_dir)
    print(f"[{rid}] training ({settings['profile']} profile)")
    set_seed(spec.seed)  # adapter and head initialisation
    model, tokenizer = build_model(spec.method, source, spec.rank, spec.alpha, settings["dropout"],
                                   settings["targets"], dtype)
    try:
        run_info = {**planned, "run_id": rid, "profile": settings["profile"], "size": size_report(model, spec.method)}
        with RunRecorder(results_dir, rid) as recorder:
            train(model, tokenizer, *frames, config, recorder=recorder, run_info=run_info)
    finally:
        del model, tokenizer
        _free_memory()
    return rid


def _run_specs(specs: Sequence[RunSpec], settings: dict[str, Any], data_dir: str | Path | None,
               results_dir: str | Path) -> pd.DataFrame:
    results_dir = Path(results_dir)
    splits = load_sst2(data_dir)
    ids = [_execute(spec, settings, splits, data_dir, results_dir) for spec in specs]
    return summary_table(results_dir, ids)


SUMMARY_COLUMNS = ("run_id", "group", "method", "rank", "alpha", "seed", "final_accuracy", "final_eval_loss",
                   "train_time_s", "samples_per_s", "peak_memory_bytes", "memory_kind", "trainable_params",
                   "total_params", "size.disk_bytes")


def summary_table(results_dir: str | Path, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per complete run (all recorded fields, the main ones first), in ``run_ids`` order if given."""
    runs = load_results(results_dir).runs
    if runs.empty:
        return runs
    if run_ids is not None:
        runs = runs.set_index("run_id").loc[list(run_ids)].reset_index()
    first = [c for c in SUMMARY_COLUMNS if c in runs.columns]
    return runs[first + [c for c in runs.columns if c not in first]].reset_index(drop=True)


def run_comparison(
    methods: Sequence[str] | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
    results_dir: str | Path = "results",
    profile: str = "auto",
    group: str = "comparison",
    seeds: Sequence[int] = (0,),
    sweep: bool = False,
    **overrides: Any,
) -> pd.DataFrame:
    """Train ``methods`` (default: the profile's) one after another and return one summary row per run.

    Every method starts from the same base weights with the same seed, data and schedule. Runs already complete
    in ``results_dir`` are skipped (resume). ``model`` and ``overrides`` (any profile key: ``epochs``,
    ``train_size``, ``lr``, ``rank``...) replace the profile's values. ``sweep=True`` also runs the profile's
    LoRA rank/alpha grid (see :func:`run_sweep`).
    """
    settings = profile_settings(profile, model=model, **overrides)
    methods = tuple(methods or settings["methods"])
    specs = [_spec(group, m, settings["rank"], settings["alpha"], s) for s in seeds for m in methods]
    if sweep:
        specs += _sweep_specs(settings["sweep_ranks"], settings["sweep_alpha_ratios"], seeds)
    return _run_specs(specs, settings, data_dir, results_dir)


def _sweep_specs(ranks: Sequence[int], alpha_ratios: Sequence[float], seeds: Sequence[int]) -> list[RunSpec]:
    if not ranks or not alpha_ratios:
        raise ValueError("a sweep needs at least one rank and one alpha/rank ratio")
    return [_spec("sweep", "lora", r, ratio * r, s) for s in seeds for ratio in alpha_ratios for r in ranks]


def run_sweep(
    ranks: Sequence[int] | None = None,
    alpha_ratios: Sequence[float] | None = None,
    model: str | None = None,
    data_dir: str | Path | None = None,
    results_dir: str | Path = "results",
    profile: str = "auto",
    seeds: Sequence[int] = (0,),
    **overrides: Any,
) -> pd.DataFrame:
    """LoRA over a grid of ranks x alpha/rank ratios (group ``"sweep"``; default grid: the profile's).

    The grid is in alpha/rank ratios because LoRA scales its update by alpha/r: a fixed ratio keeps the update's
    scale, so a line over ranks shows the effect of capacity alone.
    """
    settings = profile_settings(profile, model=model, **overrides)
    specs = _sweep_specs(ranks or settings["sweep_ranks"], alpha_ratios or settings["sweep_alpha_ratios"], seeds)
    return _run_specs(specs, settings, data_dir, results_dir)


# --------------------------------------------------------------------------------------------- command line


def _size_arg(text: str) -> int | str:
    """``--train-size`` / ``--eval-size``: a row count, or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'all', got {text!r}") from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", help="auto | " + " | ".join(PROFILES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: the profile's methods")
    parser.add_argument("--model", help="hub id, local folder, 'minilm' or 'random-gpt2-<size>'")
    parser.add_argument("--data-dir", help="folder with sst2/ (and gpt2-tokenizer/), or the sst2 folder itself")
    parser.add_argument("--results", default="results", help="folder for the run records (default: results)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--sweep", action="store_true", help="also run the profile's LoRA rank/alpha sweep")
    parser.add_argument("--sweep-only", action="store_true", help="run only the LoRA rank/alpha sweep")
    parser.add_argument("--train-size", type=_size_arg, help="train rows, or 'all' (67,349)")
    parser.add_argument("--eval-size", type=_size_arg, help="dev rows, or 'all' (872)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--lr", type=float, help="one learning rate for every method")
    parser.add_argument("--eval-every", type=int, help="also evaluate every N optimizer steps (default: the profile's)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {"train_size": args.train_size, "eval_size": args.eval_size, "epochs": args.epochs,
                 "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
                 "eval_every": args.eval_every}
    common = {"model": args.model, "data_dir": args.data_dir, "results_dir": args.results, "profile": args.profile,
              "seeds": args.seeds, **overrides}
    if args.sweep_only:
        table = run_sweep(**common)
    else:
        table = run_comparison(args.methods, sweep=args.sweep, **common)
    columns = [c for c in ("run_id", "final_accuracy", "train_time_s", "peak_memory_bytes", "trainable_params",
                           "size.disk_bytes") if c in table.columns]
    print(table[columns].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
