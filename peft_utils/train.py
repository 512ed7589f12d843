"""One recorded run: the core's training loop with what the lab adds around it (records, trackers, progress, time
and peak memory); only the main process records, logs, prints and saves. ``train_time_s`` is the optimisation alone
(the device synchronised before each reading); ``tokens_per_s`` counts non-pad tokens, not to reward padding.
``peak_memory_bytes``: CUDA's allocator peak, or on a CPU the process's peak resident set size (with the Python
baseline: it compares only with other CPU runs), reset per run on Linux (``/proc/self/clear_refs``, proc(5)) and
sampled after every step elsewhere.
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

from .compilation import PAD_TO_MULTIPLE, compile_blocks, use_compile
from .config import TrainConfig
from .core.batches import StepBatches, encode, make_loader
from .core.inject import count_parameters
from .core.loop import (EvalMetrics, StepMetrics, enable_gradient_checkpointing, prepare_for_training, set_seed,
                        synchronize, train_loop)
from .devices import (accelerator_dtype, hardware_name, is_main_process, make_accelerator, per_device_batch_size,
                      resolve_device)
from .memory_plan import MemoryPlan, to_record
from .progress import Progress
from .store import RunRecorder
from .trackers import RunTrackers

# The libraries whose versions every record names: what a run's numbers depend on besides its settings.
RECORDED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


@dataclass
class RunResult:
    """What one run produced, in memory (the recorder gets the same numbers as they happen)."""

    losses: list[float] = field(default_factory=list)  # every optimiser step's, not only the logged ones
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recording:
    """Where a run's events go: ``recorder`` (``None``: no record), ``run_info`` (the ``config`` event's first fields;
    its ``run_id`` names the run), the progress ``label``, ``on_finish(model)`` (saves what was trained before the
    summary, so that a complete record has its saved result; its fields join the summary), and the plan's
    ``steps_after`` this run (for progress's estimate of the plan's time)."""

    recorder: RunRecorder | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    on_finish: Callable[[nn.Module], dict[str, Any]] | None = None
    steps_after: int = 0

    @property
    def name(self) -> str:
        return self.run_info.get("run_id", "train")


class _PeakMemory:
    """Peak memory of one run (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.kind = device, "cuda" if device.type == "cuda" else "rss"
        self._process, self._sampled, self._kernel_peak = psutil.Process(), 0, False

    def start(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # "5" resets the kernel's peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self._kernel_peak = True
        self.sample()

    def sample(self) -> None:
        if self.kind == "rss" and not self._kernel_peak:
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def peak_bytes(self) -> int:
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._kernel_peak:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        return self._sampled


def installed_versions() -> dict[str, str | None]:
    """Python's and each :data:`RECORDED_PACKAGES`' version (None: not installed): in the record but not the run's
    identity, so a number that moved after an upgrade can be traced to it, and runs still resume across one."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch"] = torch.__version__  # with its build (+cpu, +cu130), which a wheel's metadata may leave out
    return versions


@dataclass(frozen=True)
class _Run:
    """One run's settings and where it computes: ``memory_plan``'s accumulation and checkpointing win over
    ``config``'s, which the record keeps as the run's identity."""

    config: TrainConfig
    accelerator: Any
    device: torch.device  # the accelerator's, with its CUDA index
    memory_plan: MemoryPlan | None

    @property
    def compiled(self) -> bool:
        return use_compile(self.config.compile, self.device)

    def batches(self, model: nn.Module, tokenizer, frames: tuple[pd.DataFrame, pd.DataFrame],
                seed: int) -> tuple[StepBatches, DataLoader]:
        """This process's train steps and evaluation loader: FSDP refused, the memory plan applied, the rows
        tokenised once, the same global batches on every process."""
        config, accelerator, plan = self.config, self.accelerator, self.memory_plan
        if accelerator.distributed_type == "FSDP":  # see the README: sharded saving is not written
            raise ValueError("FSDP is not supported yet (saving would need the shards gathered); launch without "
                             "--use_fsdp: data parallel processes, or QLoRA for a model too large for one GPU")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: run models.configure_padding(tokenizer, model) first")
        accumulation = plan.grad_accum_steps if plan else config.grad_accum_steps
        if plan.gradient_checkpointing if plan else config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        processes, pad = accelerator.num_processes, tokenizer.pad_token_id
        micro_batch = per_device_batch_size(config.batch_size, processes, accumulation)
        train_rows, eval_rows = (encode(f["sentence"].tolist(), f["label"].tolist(), tokenizer, config.max_length,
                                        f["sentence2"].tolist() if "sentence2" in f else None) for f in frames)
        multiple = PAD_TO_MULTIPLE if self.compiled else None  # compiled: few widths, few compilations
        train = make_loader(train_rows, config.batch_size, pad, shuffle=True, seed=seed,
                            bucket_by_length=config.bucket_by_length, padded=False)
        evaluation = make_loader(eval_rows, config.eval_batch_size or 2 * micro_batch, pad, shuffle=False,
                                 seed=seed, bucket_by_length=config.bucket_by_length, pad_to_multiple=multiple)
        return StepBatches(train, processes, accumulation, accelerator.process_index, pad, multiple), evaluation

    def config_event(self, model: nn.Module, steps: StepBatches, evaluation: DataLoader, run_info: dict[str, Any],
                     lr: float, seed: int) -> dict[str, Any]:
        """The ``config`` event: ``run_info``, the settings used and the library versions (which win on a clash)."""
        config, accelerator, counts = self.config, self.accelerator, count_parameters(model)
        return {
            **run_info, **asdict(config), "lr": lr, "seed": seed, "device": str(self.device),
            "hardware": hardware_name(self.device), "compiled": self.compiled,
            "compute_dtype": str(accelerator_dtype(accelerator)).removeprefix("torch."),
            "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
            "per_device_batch_size": config.batch_size // (steps.processes * steps.accumulation),
            "global_batch_size": config.batch_size, "train_size": len(steps.loader.dataset),
            "eval_size": len(evaluation.dataset), "total_steps": len(steps) * config.epochs,
            "trainable_params": counts.trainable, "total_params": counts.total,
            **(to_record(self.memory_plan) if self.memory_plan else {}), "versions": installed_versions(),
        }


def _log(sinks: list[RunRecorder | RunTrackers], event: str, **fields: Any) -> None:
    """One event to every sink: the run's record (the source of truth for tables and figures) and its trackers."""
    for sink in sinks:
        sink.log(event, **fields)


@dataclass
class _Watch:
    """What the lab does with each thing the loop yields: record it, show it, measure it."""

    sinks: list[RunRecorder | RunTrackers]
    progress: Progress
    memory: _PeakMemory
    log_every: int
    total_steps: int
    result: RunResult = field(default_factory=RunResult)
    rows: int = 0
    tokens: int = 0
    skipped: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # read, not yet logged
    unread: list[torch.Tensor] = field(default_factory=list)  # step losses still on the device
    started: float = 0.0
    evaluating: float = 0.0  # seconds spent evaluating: not training time

    def elapsed(self, exact: bool = False) -> float:
        """Training time so far; the device is waited for only when ``exact`` (progress needs no precision)."""
        if exact:
            synchronize(self.memory.device)
        return time.perf_counter() - self.started - self.evaluating

    def follow(self, events: Iterator[StepMetrics | EvalMetrics]) -> float:
        """Follow the loop to its end; returns the training time."""
        self.memory.start()
        synchronize(self.memory.device)
        self.started = time.perf_counter()
        try:
            for event in events:
                if isinstance(event, EvalMetrics):
                    self._evaluated(event)
                else:
                    self._stepped(event)
            return self.elapsed(exact=True)
        finally:
            self.progress.close()

    def _stepped(self, event: StepMetrics) -> None:
        self.rows, self.tokens, self.skipped = (self.rows + event.rows, self.tokens + event.tokens,
                                                self.skipped + event.skipped)
        self.memory.sample()
        self.unread.append(event.loss)
        if event.step % self.log_every == 0 or event.step == self.total_steps:
            self._read_losses()
            # the mean loss since the last step event: less noise in the curves
            _log(self.sinks, "step", step=event.step, epoch=event.epoch, loss=sum(self.window) / len(self.window),
                 lr=event.lr, elapsed_s=self.elapsed())
            self.window = []
        self.progress.update(event.step, self.result.losses[-1] if self.result.losses else None)

    def _read_losses(self) -> None:
        """Read the step losses still on the device at once: one wait for the device per logged window."""
        if self.unread:
            losses = torch.stack(self.unread).tolist()
            self.result.losses += losses
            self.epoch_losses += losses
            self.window += losses
            self.unread = []

    def _evaluated(self, event: EvalMetrics) -> None:
        evaluation = event.evaluation
        self.evaluating += evaluation.seconds
        record = {"step": event.step, "epoch": event.epoch, "accuracy": evaluation.accuracy,
                  "loss": evaluation.loss, "n": evaluation.n, "eval_time_s": evaluation.seconds}
        if event.epoch.is_integer():  # an epoch's end: its mean training loss, to read overfitting beside dev loss
            self._read_losses()
            record["train_loss"] = sum(self.epoch_losses) / len(self.epoch_losses)
            self.epoch_losses = []
        self.result.evals.append({**record, "predictions": evaluation.predictions,
                                  "probabilities": evaluation.probabilities})
        _log(self.sinks, "eval", **record)
        self.progress.write(f"step {event.step}: dev accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")

    def summary(self, train_time: float, peak_memory: int) -> dict[str, Any]:
        final = self.result.evals[-1]
        return {
            "train_time_s": train_time, "eval_time_s": self.evaluating,
            "samples_per_s": self.rows / train_time if train_time > 0 else None,
            "tokens_per_s": self.tokens / train_time if train_time > 0 else None,
            "peak_memory_bytes": peak_memory, "memory_kind": self.memory.kind,
            "final_accuracy": final["accuracy"], "final_eval_loss": final["loss"], "n_eval": final["n"],
            "steps": len(self.result.losses),
            "skipped_steps": self.skipped,  # fp16 loss scaling skips the steps whose gradients overflowed
            # per dev row, in the eval frame's order: paired tests from the records alone
            "dev_predictions": final["predictions"], "dev_probabilities": final["probabilities"],
        }


def train(model: nn.Module, tokenizer, train_frame: pd.DataFrame, eval_frame: pd.DataFrame, config: TrainConfig, *,
          lr: float, seed: int, recording: Recording = Recording(), accelerator=None,
          memory_plan: MemoryPlan | None = None) -> RunResult:
    """Fine-tune ``model`` on ``train_frame``, evaluate on ``eval_frame`` and record it (:class:`Recording`): a
    ``config`` event, ``step``/``eval`` events as they happen, and a ``summary``, which marks the run complete; an
    ``accelerator`` made with trackers gets the same events. ``lr``: the peak rate; ``seed`` fixes the data order
    and dropout masks (the same for every method)."""
    accelerator = accelerator or make_accelerator(config.device, config.precision)
    run = _Run(config, accelerator, resolve_device(accelerator.device), memory_plan)
    steps, evaluation = run.batches(model, tokenizer, (train_frame, eval_frame), seed)
    main, total_steps = is_main_process(), len(steps) * config.epochs
    # only the main process records; its trackers are those the accelerator was made with
    trackers = RunTrackers(accelerator, recording.name) if main and accelerator.log_with else None
    sinks = [sink for sink in (recording.recorder if main else None, trackers) if sink is not None]
    try:
        if sinks:
            _log(sinks, "config", **run.config_event(model, steps, evaluation, recording.run_info, lr, seed))
        if next(model.parameters()).device != run.device:  # before the optimiser picks its kernel
            model.to(run.device)
        if run.compiled:
            compile_blocks(model)
        set_seed(seed + accelerator.process_index)  # dropout masks: the same for every method, per process
        model, optimizer, scheduler = prepare_for_training(model, accelerator, lr=lr, weight_decay=config.weight_decay,
                                                           warmup_ratio=config.warmup_ratio, total_steps=total_steps)
        progress = Progress(total_steps, recording.label or recording.name, mode=None if main else "off",
                            steps_after=recording.steps_after)
        watch = _Watch(sinks, progress, _PeakMemory(run.device), config.log_every, total_steps)
        train_time = watch.follow(train_loop(model, steps, evaluation, optimizer, scheduler, accelerator,
                                             epochs=config.epochs, max_grad_norm=config.max_grad_norm,
                                             eval_every=config.eval_every))
        # the peak of the process that needed the most
        peak = accelerator.gather(torch.tensor([watch.memory.peak_bytes()], device=accelerator.device)).max()
        result = watch.result
        result.summary = watch.summary(train_time, int(peak))
        if recording.on_finish is not None and main:
            result.summary.update(recording.on_finish(accelerator.unwrap_model(model)))
        _log(sinks, "summary", **result.summary)
    finally:
        if trackers is not None:
            trackers.close()
    accelerator.wait_for_everyone()  # the record is complete before any process plans or trains what follows
    accelerator.free_memory()  # the accelerator's references to this run's model and optimiser
    return result
