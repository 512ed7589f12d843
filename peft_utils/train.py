"""One recorded run: the core's training loop, wrapped with what the lab adds around it.

:func:`train` builds the batches (the global batch cut for this process and the memory plan's accumulation),
prepares the model with accelerate, runs :func:`~peft_utils.core.loop.train_loop`, and around every step and
evaluation it yields: streams ``config``/``step``/``eval``/``summary`` events to the run's record (and to the
experiment trackers the accelerator was made with, :mod:`peft_utils.trackers`), shows progress, times the
optimisation and measures peak memory. Only the main process records, logs, prints and saves.

What is measured, and how:

- ``train_time_s``: wall time of the optimisation only; evaluation is not counted (its own ``eval_time_s``).
  On CUDA the device is synchronised before each reading, otherwise queued kernels would be missed.
- ``tokens_per_s`` counts non-pad tokens, so it does not reward padding.
- ``peak_memory_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only: weights, optimiser state,
  activations). On CPU the peak resident set size (RSS) of the process, which *includes the Python process
  baseline* (interpreter, torch, tokenizer, data: a few hundred MB), so CPU numbers are only comparable with
  each other. On Linux the kernel's high-water mark is reset at the start of each run (``/proc/self/clear_refs``),
  so every run of a comparison reports its own peak; elsewhere RSS is sampled after every optimiser step.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .core.batches import StepBatches, encode, make_loader
from .core.inject import count_parameters
from .core.loop import (EvalMetrics, enable_gradient_checkpointing, prepare_for_training, set_seed, synchronize,
                        train_loop)
from .devices import (accelerator_device, compute_dtype_for, hardware_name, is_main_process, make_accelerator,
                      per_device_batch_size)
from .memory_plan import MemoryPlan, to_record
from .progress import Progress
from .store import RunRecorder
from .trackers import RunTrackers


@dataclass
class RunResult:
    """What one run produced, in memory (the same numbers are streamed to the recorder as they happen).

    ``losses``: the training loss of every optimiser step (not only the logged ones), for exact comparisons.
    """

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class _PeakMemory:
    """Peak memory of one run: CUDA allocator peak on GPU, resident set size on CPU (see the module docstring)."""

    _CLEAR_REFS = Path("/proc/self/clear_refs")
    _STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss"
        self._process = psutil.Process()
        self._sampled = 0
        self._kernel_peak = False

    def start(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)
            self._CLEAR_REFS.write_text("5")
            self._kernel_peak = True
        except OSError:
            self._kernel_peak = False
        self.sample()

    def sample(self) -> None:
        """Fallback for systems without a resettable kernel peak: remember the largest RSS seen."""
        if self.kind == "rss" and not self._kernel_peak:
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def peak_bytes(self) -> int:
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._kernel_peak:
            for line in self._STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        return self._sampled


@dataclass(frozen=True)
class _Batches:
    """A run's data, batched for this process: the train steps, the evaluation loader and the batch arithmetic."""

    train: StepBatches
    eval: DataLoader
    micro_batch: int
    train_rows: int
    eval_rows: int


def _batches(frames: tuple[pd.DataFrame, pd.DataFrame], tokenizer, config: TrainConfig, seed: int, accelerator,
             accumulation: int) -> _Batches:
    """Tokenised once; the train order depends only on ``seed``, the same global batches on every process."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: run models.configure_padding(tokenizer, model) first")
    processes, pad = accelerator.num_processes, tokenizer.pad_token_id
    micro_batch = per_device_batch_size(config.batch_size, processes, accumulation)
    train_rows, eval_rows = (encode(f["sentence"].tolist(), f["label"].tolist(), tokenizer, config.max_length,
                                    f["sentence2"].tolist() if "sentence2" in f else None) for f in frames)
    train = make_loader(train_rows, config.batch_size, pad, shuffle=True, seed=seed,
                        bucket_by_length=config.bucket_by_length, padded=False)
    evaluation = make_loader(eval_rows, config.eval_batch_size or 2 * micro_batch, pad, shuffle=False, seed=seed,
                             bucket_by_length=config.bucket_by_length)
    steps = StepBatches(train, processes, accumulation, accelerator.process_index, pad)
    return _Batches(steps, evaluation, micro_batch, len(train_rows), len(eval_rows))


# The libraries whose versions every record names: what a run's numbers depend on besides its settings.
RECORDED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def installed_versions() -> dict[str, str | None]:
    """Python's and each :data:`RECORDED_PACKAGES`' installed version (None when not installed).

    Why in the record but not in the run's identity (``store.IDENTITY_KEYS``): a time, a memory peak or an accuracy
    that moved after an upgrade can then be traced to it, while a folder's runs can still be resumed and compared
    across an upgrade.
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch"] = torch.__version__  # with its build (+cpu, +cu130), which a wheel's metadata may leave out
    return versions


def _config_event(model: nn.Module, config: TrainConfig, batches: _Batches, accelerator, *, lr: float, seed: int,
                  run_info: dict[str, Any], memory_plan: MemoryPlan | None) -> dict[str, Any]:
    """The record's ``config`` event: ``run_info`` first, then the settings actually used (device resolved, sizes
    after encoding) and the library versions, which win on a clash."""
    device, counts = accelerator_device(accelerator), count_parameters(model)
    return {
        **run_info, **asdict(config), "lr": lr, "seed": seed, "device": str(device), "hardware": hardware_name(device),
        "compute_dtype": str(compute_dtype_for(device, config.precision)).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
        "per_device_batch_size": batches.micro_batch, "global_batch_size": config.batch_size,
        "train_size": batches.train_rows, "eval_size": batches.eval_rows,
        "total_steps": len(batches.train) * config.epochs,
        "trainable_params": counts.trainable, "total_params": counts.total,
        **(to_record(memory_plan) if memory_plan else {}), "versions": installed_versions(),
    }


class _Clock:
    """Optimisation wall time: the time since :meth:`start` less the evaluations' own time."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.evaluating, self.started = device, 0.0, 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def elapsed(self, exact: bool = False) -> float:
        """Training time so far; the device is waited for only when ``exact`` (progress needs no precision)."""
        if exact:
            synchronize(self.device)
        return time.perf_counter() - self.started - self.evaluating


@dataclass(frozen=True)
class _Outputs:
    """Where the main process sends a run's events: its record (the source of truth for tables and figures) and its
    experiment trackers (dashboards); the other processes of a launch send them nowhere."""

    sinks: tuple[RunRecorder | RunTrackers, ...]

    def log(self, event: str, **fields: Any) -> None:
        for sink in self.sinks:
            sink.log(event, **fields)


@contextlib.contextmanager
def _outputs(recorder: RunRecorder | None, accelerator, run_id: str, main: bool) -> Iterator[_Outputs]:
    """The run's :class:`_Outputs`; its trackers (those the accelerator was made with) finished however it ends."""
    trackers = RunTrackers(accelerator, run_id) if main and accelerator.log_with else None
    try:
        yield _Outputs(tuple(sink for sink in (recorder if main else None, trackers) if sink is not None))
    finally:
        if trackers is not None:
            trackers.close()


@dataclass
class _Watch:
    """What the lab does with each thing the loop yields: record it, show it, measure it."""

    outputs: _Outputs
    progress: Progress
    memory: _PeakMemory
    clock: _Clock
    log_every: int
    total_steps: int
    result: RunResult = field(default_factory=RunResult)
    rows: int = 0
    tokens: int = 0
    skipped: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    def follow(self, events) -> None:
        window: list[float] = []
        for event in events:
            if isinstance(event, EvalMetrics):
                self._evaluated(event)
                continue
            self.rows, self.tokens = self.rows + event.rows, self.tokens + event.tokens
            self.skipped += event.skipped
            self.memory.sample()
            self.result.losses.append(event.loss)
            self.epoch_losses.append(event.loss)
            window.append(event.loss)
            self.progress.update(event.step, event.loss)
            if event.step % self.log_every == 0 or event.step == self.total_steps:
                # the mean loss since the last step event: less noise in the curves
                self.outputs.log("step", step=event.step, epoch=event.epoch, loss=sum(window) / len(window),
                                 lr=event.lr, elapsed_s=self.clock.elapsed())
                window = []

    def _evaluated(self, event: EvalMetrics) -> None:
        evaluation = event.evaluation
        self.clock.evaluating += evaluation.seconds
        record = {"step": event.step, "epoch": event.epoch, "accuracy": evaluation.accuracy,
                  "loss": evaluation.loss, "n": evaluation.n, "eval_time_s": evaluation.seconds}
        if event.epoch.is_integer():  # an epoch's end: its mean training loss, to read overfitting beside dev loss
            record["train_loss"] = sum(self.epoch_losses) / len(self.epoch_losses)
            self.epoch_losses = []
        self.result.evals.append({**record, "predictions": evaluation.predictions,
                                  "probabilities": evaluation.probabilities})
        self.outputs.log("eval", **record)
        self.progress.write(f"step {event.step}: dev accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")

    def summary(self, train_time: float, accelerator) -> dict[str, Any]:
        final = self.result.evals[-1]
        return {
            "train_time_s": train_time,
            "eval_time_s": self.clock.evaluating,
            "samples_per_s": self.rows / train_time if train_time > 0 else None,
            "tokens_per_s": self.tokens / train_time if train_time > 0 else None,
            "peak_memory_bytes": _largest(accelerator, self.memory.peak_bytes()),
            "memory_kind": self.memory.kind,
            "final_accuracy": final["accuracy"],
            "final_eval_loss": final["loss"],
            "n_eval": final["n"],
            "steps": len(self.result.losses),
            "skipped_steps": self.skipped,  # fp16 loss scaling skips the steps whose gradients overflowed
            # per dev row, in the eval frame's order: paired tests from the records alone
            "dev_predictions": final["predictions"],
            "dev_probabilities": final["probabilities"],
        }


def _largest(accelerator, value: int) -> int:
    """The largest of every process's ``value`` (peak memory: the process that needed the most)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def train(
    model: nn.Module,
    tokenizer,
    train_frame: pd.DataFrame,
    eval_frame: pd.DataFrame,
    config: TrainConfig,
    *,
    lr: float,
    seed: int,
    recorder: RunRecorder | None = None,
    run_info: dict[str, Any] | None = None,
    progress_label: str | None = None,
    on_finish: Callable[[nn.Module], dict[str, Any]] | None = None,
    accelerator=None,
    memory_plan: MemoryPlan | None = None,
) -> RunResult:
    """Fine-tune ``model`` on ``train_frame``, evaluate on ``eval_frame`` and record it; returns a :class:`RunResult`.

    ``lr`` is the peak learning rate; ``seed`` fixes the data order and dropout masks (the same for every method).
    With a ``recorder``: a ``config`` event (``run_info`` plus this run's settings, sizes, device, precision,
    processes and parameter counts), then ``step``/``eval`` events as they happen and a ``summary`` at the end,
    which marks the run complete. ``on_finish(model)`` runs after the last evaluation and before the summary (to
    save what was trained, so that a complete record always has its saved result); the fields it returns join the
    summary. ``memory_plan``: the accumulation and gradient checkpointing that fit the GPU, used instead of
    ``config``'s (which the record keeps as the run's identity). An ``accelerator`` made with trackers
    (``make_accelerator(report_to=...)``) receives the same events, the run named after ``run_info``'s run id.
    """
    accelerator = accelerator or make_accelerator(config.device, config.precision)
    batches = _setup(model, tokenizer, (train_frame, eval_frame), config, seed, accelerator, memory_plan)
    main, total_steps = is_main_process(), len(batches.train) * config.epochs
    name = (run_info or {}).get("run_id", "train")
    with _outputs(recorder, accelerator, name, main) as outputs:
        if outputs.sinks:
            outputs.log("config", **_config_event(model, config, batches, accelerator, lr=lr, seed=seed,
                                                   run_info=run_info or {}, memory_plan=memory_plan))
        model, optimizer, scheduler = _prepared(model, config, accelerator, lr, seed, total_steps)
        device = accelerator_device(accelerator)
        progress = Progress(mode=None if main else "off")
        progress.start(total_steps, progress_label or name)
        watch = _Watch(outputs, progress, _PeakMemory(device), _Clock(device), config.log_every, total_steps)
        watch.memory.start()
        watch.clock.start()
        try:
            watch.follow(train_loop(model, batches.train, batches.eval, optimizer, scheduler, accelerator,
                                    epochs=config.epochs, max_grad_norm=config.max_grad_norm,
                                    eval_every=config.eval_every))
            train_time = watch.clock.elapsed(exact=True)
        finally:
            progress.close()
        result = watch.result
        result.summary = watch.summary(train_time, accelerator)
        if on_finish is not None and main:
            result.summary.update(on_finish(accelerator.unwrap_model(model)))
        outputs.log("summary", **result.summary)
    accelerator.wait_for_everyone()  # the record is complete before any process plans or trains what follows
    accelerator.free_memory()  # the accelerator's references to this run's model and optimiser
    return result


def _setup(model: nn.Module, tokenizer, frames: tuple[pd.DataFrame, pd.DataFrame], config: TrainConfig, seed: int,
           accelerator, memory_plan: MemoryPlan | None) -> _Batches:
    """Refuse FSDP, apply the memory plan (or ``config``'s accumulation and checkpointing), batch the data."""
    if accelerator.distributed_type == "FSDP":  # see the README: sharded saving is not written
        raise ValueError("FSDP is not supported yet (saving would need the shards gathered); launch without "
                         "--use_fsdp: data parallel processes, or QLoRA for a model too large for one GPU")
    accumulation = memory_plan.grad_accum_steps if memory_plan else config.grad_accum_steps
    if memory_plan.gradient_checkpointing if memory_plan else config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return _batches(frames, tokenizer, config, seed, accelerator, accumulation)


def _prepared(model: nn.Module, config: TrainConfig, accelerator, lr: float, seed: int, total_steps: int):
    """The model on its device, dropout seeded, and :func:`~peft_utils.core.loop.prepare_for_training`'s triple."""
    if next(model.parameters()).device != accelerator_device(accelerator):  # before the optimiser picks its kernel
        model.to(accelerator_device(accelerator))
    set_seed(seed + accelerator.process_index)  # dropout masks: the same for every method; each process its own
    return prepare_for_training(model, accelerator, lr=lr, weight_decay=config.weight_decay,
                                warmup_ratio=config.warmup_ratio, total_steps=total_steps)
