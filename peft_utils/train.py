"""One fine-tuning run: the same loop for every method, so that only the trainable parameters differ.

Full fine-tuning, LoRA, DoRA and QLoRA all go through :func:`train`: the same optimiser (AdamW with decoupled
weight decay), the same warm-up/decay schedule, clipping, accumulation, data order and evaluation. A method's
accuracy, time or memory can then be attributed to the method, not to a different loop.

Devices, precision and processes are `accelerate`'s job (:func:`make_accelerator`): one CPU process, one GPU, or
``accelerate launch --num_processes N`` / ``torchrun`` for data parallel training. What stays ours is what makes
the comparison exact across those set-ups:

- ``batch_size`` is the **global** batch: every process draws the same global batches in the same order (one
  seeded sampler), and each is cut into ``processes x accumulation steps`` micro-batches of
  ``batch_size / (processes x accumulation)`` rows. accelerate's own batch sharding is not used because it assumes
  every batch but the last is full and fills the last one by repeating rows; our length-bucketed batches put the
  one short batch anywhere in the epoch, and a repeated row would make the run differ from a single process.
- Each micro-batch's mean loss is weighted by its share of the global batch's rows (times the process count, which
  DDP's gradient averaging divides out), so the gradient is that of the mean loss over the global batch on any
  number of processes, even for a short last batch.
- Evaluation: each process scores every N-th batch; the per-batch results are gathered
  (``accelerator.gather_object``) and put back in dev-file order, so each dev row is counted exactly once (872, not
  872 rounded up to a multiple of the process count, which ``gather_for_metrics`` would have to trim by assuming
  full batches). Only the main process prints and writes records.

What is measured, and how:

- ``train_time_s``: wall time of the optimisation only; evaluation pauses the clock (its own ``eval_time_s``).
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
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import TrainConfig, compute_dtype_for
from .data import collate, encode, make_loader
from .inject import count_parameters
from .memory_plan import MemoryPlan, to_record
from .models import enable_gradient_checkpointing
from .progress import Progress, bars_enabled
from .store import RunRecorder

Batch = dict[str, torch.Tensor]


@dataclass
class RunResult:
    """What one run produced, in memory (the same numbers are streamed to the recorder as they happen).

    ``losses``: the training loss of every optimiser step (not only the logged ones), for exact comparisons.
    """

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ environment


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): adapter init, new heads and dropout then repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit CUDA request without a GPU is an error.

    A CUDA device always gets its index (``cuda:0``), so it compares equal to the device of a model that
    ``from_pretrained(device_map=...)`` already placed there (4-bit models must not be moved again).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def hardware_name(device: torch.device) -> str:
    """What ran the steps, for the records: the GPU's name, or the CPU's model and the threads torch uses.

    Why recorded: the same run takes different times on different machines (even the CPUs of one fleet differ by
    vendor), so a train time is only comparable with times taken on the same hardware.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


_MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make_accelerator(device: str = "auto"):
    """The ``accelerate.Accelerator`` for ``device`` (``"auto"``, ``"cpu"``, ``"cuda[:i]"``), with the precision of
    :func:`~peft_utils.config.compute_dtype_for`: bf16 autocast on GPUs with native bf16, fp16 autocast with loss
    scaling on older GPUs, float32 on CPU. Under ``accelerate launch`` / ``torchrun`` it joins the process group.
    """
    from accelerate import Accelerator

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)  # "cuda:1" in one process; under a launcher each process has its own GPU
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision=_MIXED_PRECISION[compute_dtype_for(resolved)])


def launched_processes() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (both set ``WORLD_SIZE``); read from the
    environment so that a plan can check the batch split before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is the process that prints and writes (rank 0 of a launch, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def per_device_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """``batch_size / (processes x accumulation)``; an error when it does not divide (a silently different global
    batch would change the experiment)."""
    shares = processes * accumulation
    if batch_size % shares:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not divide into {processes} "
                         f"process(es) x {accumulation} accumulation step(s); choose a multiple of {shares}")
    return batch_size // shares


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ------------------------------------------------------------------------------------------ optimisation


def _no_decay(parameter: nn.Parameter) -> bool:
    """Biases, LayerNorm gains and DoRA magnitudes are vectors: decaying them towards 0 only hurts
    (a magnitude of 0 switches an output off), so decay applies to matrices only."""
    return parameter.ndim < 2


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the trainable parameters, with no decay on vectors.

    The fused kernel (one pass over all parameters, CPU and CUDA) where torch has one for every parameter's
    device and dtype, else the multi-tensor ``foreach`` version; never torch's CPU default, a Python loop
    over parameters that took 160 ms of a full fine-tuning step on MiniLM where fused takes 25 ms. All three
    compute the same update; they differ by floating-point rounding only (see tests/test_train.py).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing to train")
    groups = [
        {"params": [p for p in trainable if not _no_decay(p)], "weight_decay": weight_decay},
        {"params": [p for p in trainable if _no_decay(p)], "weight_decay": 0.0},
    ]
    implementation = "fused" if all(_has_fused_adamw(p) for p in trainable) else "foreach"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **{implementation: True})


def _has_fused_adamw(parameter: nn.Parameter) -> bool:
    """Whether torch has a fused AdamW kernel for this parameter: a plain floating-point tensor on a device with
    fused optimiser kernels. This is the test ``AdamW(fused=True)`` applies, but only at its first ``step``
    (too late to fall back), and torch offers no public query, hence its device list from ``torch.optim``."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return (type(parameter) in (torch.Tensor, nn.Parameter) and torch.is_floating_point(parameter)
            and parameter.device.type in _get_fused_kernels_supported_devices())


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak learning rate, then linear decay to 0 at ``total_steps``.

    Warm-up keeps the first Adam steps (whose second-moment estimates are still noisy) small.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loader(frame: pd.DataFrame, tokenizer, config: TrainConfig, seed: int, batch_size: int,
            shuffle: bool, padded: bool = True) -> DataLoader:
    """Tokenised once; the order depends only on ``seed``. ``padded=False``: batches as lists of rows."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: run models.configure_padding(tokenizer, model) first")
    rows = encode(frame, tokenizer, config.max_length)
    return make_loader(rows, batch_size, tokenizer.pad_token_id, shuffle=shuffle, seed=seed,
                       bucket_by_length=config.bucket_by_length, padded=padded)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class Evaluation:
    """One pass over the evaluation rows. ``predictions`` (predicted label) and ``probabilities`` (of label 1) are
    per row in the order of the evaluated frame, so paired tests between methods can be recomputed from records."""

    accuracy: float
    loss: float
    n: int
    predictions: list[int]
    probabilities: list[float]


def _row_order(loader: DataLoader) -> list[int]:
    """Frame positions in the order ``loader`` yields rows (length bucketing reorders them even without shuffling)."""
    return [index for batch in loader.batch_sampler for index in batch]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str,
             dtype: torch.dtype | None = None, accelerator=None) -> Evaluation:
    """Accuracy, mean cross-entropy and per-row predictions over ``loader`` (not shuffled), in eval mode.

    The caller's train/eval mode is restored afterwards, so this can be called in the middle of training. With an
    ``accelerator`` of several processes, each scores every N-th batch and every process gets the whole result.
    """
    device = torch.device(device)
    dtype = dtype or compute_dtype_for(device)
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    was_training = model.training
    model.eval()
    scored = []  # (batch number, summed loss, probabilities, labels) of this process's batches
    try:
        batches = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not bars_enabled())
        for number, batch in enumerate(batches):
            if number % processes != rank:
                continue
            batch = _to_device(batch, device)
            with _autocast(device, dtype):
                logits = _logits(model, batch)
            logits = logits.float()
            loss = F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            scored.append((number, loss, logits.softmax(dim=-1).cpu(), batch["labels"].cpu()))
    finally:
        model.train(was_training)
    if processes > 1:
        from accelerate.utils import gather_object

        scored = sorted(gather_object(scored), key=lambda item: item[0])  # every process's lists, concatenated
    if not scored:
        raise ValueError("evaluation loader is empty")
    loss_sum = 0.0
    for _, loss, _, _ in scored:  # in batch order: the same sum on any number of processes
        loss_sum += loss
    probabilities_ = torch.cat([item[2] for item in scored])
    labels_ = torch.cat([item[3] for item in scored])
    predicted = probabilities_.argmax(dim=-1)
    n = len(labels_)
    order = torch.empty(n, dtype=torch.long)
    order[torch.tensor(_row_order(loader))] = torch.arange(n)  # loader position of each frame row
    return Evaluation(
        accuracy=int((predicted == labels_).sum()) / n, loss=loss_sum / n, n=n,
        predictions=predicted[order].tolist(), probabilities=probabilities_[order, -1].tolist(),
    )


# ------------------------------------------------------------------------------------------ training


class _Clock:
    """Training wall time with pauses (for evaluation), synchronised with the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self._since: float | None = None

    def resume(self) -> None:
        _sync(self.device)
        self._since = time.perf_counter()

    def pause(self) -> float:
        _sync(self.device)
        self.total += time.perf_counter() - self._since
        self._since = None
        return self.total

    def elapsed(self) -> float:
        """Training time so far; the running interval is read without synchronising (for progress only)."""
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)


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
    """Fine-tune ``model`` on ``train_frame`` and evaluate on ``eval_frame``; returns a :class:`RunResult`.

    ``lr`` is the peak learning rate; ``seed`` fixes the data order and dropout masks (the same for every method).

    Only parameters with ``requires_grad`` are optimised, so the method (full, LoRA, ...) is decided entirely by
    how the model was built. With a ``recorder``, a ``config`` event (``run_info`` plus this run's settings,
    sizes, device, precision, processes and parameter counts) is written first, then ``step``/``eval`` events as
    they happen and a ``summary`` at the end — which marks the run complete. ``progress_label`` names the run in the
    progress display (e.g. ``run 2/5 lora``; default: ``run_info``'s ``run_id``). ``on_finish(model)`` runs after
    the last evaluation and before the summary (e.g. to save what was trained, so a complete record always has its
    saved result); the fields it returns join the summary. ``accelerator``: default :func:`make_accelerator`
    (``config.device``); under several processes only the main one records, prints and calls ``on_finish``.
    ``memory_plan`` (:func:`~peft_utils.memory_plan.plan_for_device`): the accumulation steps and gradient
    checkpointing that fit the GPU, used instead of ``config``'s (which the record keeps as the run's identity).
    """
    accelerator = accelerator or make_accelerator(config.device)
    if accelerator.distributed_type == "FSDP":  # see the README: sharded saving is not written
        raise ValueError("FSDP is not supported yet (saving would need the shards gathered); launch without "
                         "--use_fsdp: data parallel processes, or QLoRA for a model too large for one GPU")
    device, main = _indexed(accelerator.device), accelerator.is_main_process
    processes, rank = accelerator.num_processes, accelerator.process_index
    dtype = compute_dtype_for(device)
    accumulation = memory_plan.grad_accum_steps if memory_plan else config.grad_accum_steps
    micro_batch = per_device_batch_size(config.batch_size, processes, accumulation)
    if memory_plan.gradient_checkpointing if memory_plan else config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    train_loader = _loader(train_frame, tokenizer, config, seed, config.batch_size, shuffle=True, padded=False)
    eval_loader = _loader(eval_frame, tokenizer, config, seed, config.eval_batch_size or 2 * micro_batch,
                          shuffle=False)
    train_rows, eval_rows = train_loader.dataset, eval_loader.dataset
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    recorder = recorder if main else None

    if recorder is not None:
        counts = count_parameters(model)
        # run_info first: the settings actually used (device resolved, sizes after encoding) win on a clash.
        recorder.log("config", **{
            **(run_info or {}), **asdict(config), "lr": lr, "seed": seed, "device": str(device),
            "hardware": hardware_name(device),
            "compute_dtype": str(dtype).removeprefix("torch."), "mixed_precision": accelerator.mixed_precision,
            "num_processes": processes, "per_device_batch_size": micro_batch, "global_batch_size": config.batch_size,
            "train_size": len(train_rows), "eval_size": len(eval_rows), "total_steps": total_steps,
            "trainable_params": counts.trainable, "total_params": counts.total,
            **(to_record(memory_plan) if memory_plan else {}),
        })

    if next(model.parameters()).device != device:  # before the optimiser, which picks its kernel by device
        model.to(device)
    set_seed(seed + rank)  # dropout masks: the same for every method and repeat; each process draws its own
    model, optimizer = accelerator.prepare(model, make_optimizer(model, lr, config.weight_decay))
    scheduler = linear_schedule(optimizer.optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    memory, clock, result = _PeakMemory(device), _Clock(device), RunResult()
    progress = Progress(mode=None if main else "off")  # closed in `finally`, even on a crash
    progress.start(total_steps, progress_label or (run_info or {}).get("run_id", "train"))
    samples = tokens = step = 0
    eval_time = 0.0
    window: list[float] = []
    step_setup = _StepSetup(accelerator, model, optimizer, scheduler, config.max_grad_norm, accumulation,
                            tokenizer.pad_token_id)

    last_predictions: dict[str, list] = {}  # of the latest evaluation: the final one ends up in the summary

    def run_eval(epoch: float) -> None:
        nonlocal eval_time
        clock.pause()
        start = time.perf_counter()
        # A private RNG state: evaluating (how often, or at all) must not shift the training's dropout masks.
        # The unwrapped model: a DDP forward in eval mode could wait on processes that have fewer batches to score.
        with torch.random.fork_rng(devices=[]):
            evaluation = evaluate(accelerator.unwrap_model(model), eval_loader, device, dtype, accelerator)
        seconds = time.perf_counter() - start
        eval_time += seconds
        record = {"step": step, "epoch": epoch, "accuracy": evaluation.accuracy, "loss": evaluation.loss,
                  "n": evaluation.n, "eval_time_s": seconds}
        result.evals.append(record)
        last_predictions["dev_predictions"] = evaluation.predictions
        last_predictions["dev_probabilities"] = evaluation.probabilities
        if recorder is not None:
            recorder.log("eval", **record)
        progress.write(f"step {step}: dev accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}")
        clock.resume()

    model.train()
    memory.start()
    clock.resume()
    try:
        for epoch in range(config.epochs):
            for rows in train_loader:  # one global batch: the same rows on every process
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                loss = _optimizer_step(step_setup, rows)
                step += 1
                samples += len(rows)
                tokens += sum(len(row["input_ids"]) for row in rows)
                memory.sample()
                result.losses.append(loss)
                window.append(loss)
                progress.update(step, loss)
                if step % config.log_every == 0 or step == total_steps:
                    if recorder is not None:  # the mean loss since the last step event: less noise in the curves
                        recorder.log("step", step=step, epoch=step / steps_per_epoch,
                                     loss=sum(window) / len(window), lr=lr, elapsed_s=clock.elapsed())
                    window = []
                if config.eval_every and step % config.eval_every == 0 and step % steps_per_epoch:
                    run_eval(step / steps_per_epoch)
            run_eval(float(epoch + 1))
        train_time = clock.pause()
    finally:
        progress.close()

    final = result.evals[-1]
    result.summary = {
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "samples_per_s": samples / train_time if train_time > 0 else None,
        "tokens_per_s": tokens / train_time if train_time > 0 else None,
        "peak_memory_bytes": _largest(accelerator, memory.peak_bytes()),
        "memory_kind": memory.kind,
        "final_accuracy": final["accuracy"],
        "final_eval_loss": final["loss"],
        "n_eval": final["n"],
        "steps": step,
        **last_predictions,  # per dev row, in the eval frame's order: paired tests from the records alone
    }
    if on_finish is not None and main:
        result.summary.update(on_finish(accelerator.unwrap_model(model)))
    if recorder is not None:
        recorder.log("summary", **result.summary)
    accelerator.wait_for_everyone()  # the record is complete before any process plans or trains what follows
    accelerator.free_memory()  # the accelerator's references to this run's model and optimiser
    return result


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: accelerate names a single GPU without its index, and a 4-bit model placed by
    ``from_pretrained`` reports ``cuda:0``; the two must compare equal, or the model would be moved again."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _largest(accelerator, value: int) -> int:
    """The largest of every process's ``value`` (peak memory: the process that needed the most)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


@dataclass(frozen=True)
class _StepSetup:
    """What every optimiser step needs, prepared once per run."""

    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_grad_norm: float | None
    accumulation: int
    pad_token_id: int


def micro_batches(rows: Sequence[Any], processes: int, accumulation: int, rank: int) -> list[tuple[list, float]]:
    """This process's ``accumulation`` micro-batches of one global batch, each with its share of the batch's rows.

    The batch is cut into ``accumulation x processes`` contiguous near-equal parts; micro-step ``a`` of process
    ``p`` is part ``a * processes + p``, so one process with one step takes the whole batch unchanged. A part left
    empty (a last batch with fewer rows than parts) is stood in for by the batch's first row with weight 0: every
    process must run the same number of backward passes, or the gradient all-reduce would wait forever.
    """
    parts = accumulation * processes
    bounds = [len(rows) * k // parts for k in range(parts + 1)]
    chosen = []
    for micro_step in range(accumulation):
        k = micro_step * processes + rank
        part = list(rows[bounds[k]:bounds[k + 1]])
        chosen.append((part, len(part) / len(rows)) if part else ([rows[0]], 0.0))
    return chosen


def _optimizer_step(setup: _StepSetup, rows: Sequence[Any]) -> float:
    """Forward/backward over this process's micro-batches of one global batch, then clip, step and schedule.

    Each micro-batch's mean loss is weighted by its share of the global batch's rows, so the accumulated gradient
    is that of the mean loss over all rows, even when the last batch is short. DDP averages gradients over the
    processes, so each process scales its share by the process count. Returns the global batch's mean loss.
    """
    accelerator, model = setup.accelerator, setup.model
    processes = accelerator.num_processes
    chosen = micro_batches(rows, processes, setup.accumulation, accelerator.process_index)
    losses = []
    for number, (part, weight) in enumerate(chosen):
        batch = _to_device(collate(part, setup.pad_token_id), accelerator.device)
        # Only the last micro-batch's backward all-reduces the gradients (the others accumulate locally).
        synced = accelerator.no_sync(model) if number < len(chosen) - 1 else contextlib.nullcontext()
        with synced:
            logits = _logits(model, batch)
            loss = F.cross_entropy(logits.float(), batch["labels"])  # float32 loss, whatever the autocast dtype
            accelerator.backward(loss * (weight * processes))
        losses.append(loss.detach())
    if setup.max_grad_norm is not None:
        trainable = [p for group in setup.optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(trainable, setup.max_grad_norm)
    setup.optimizer.step()
    if not setup.optimizer.step_was_skipped:  # fp16 loss scaling skips steps whose gradients overflowed
        setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    # The step's only host read, once all its work is queued (on a GPU a read waits for the device to catch up).
    local = sum(value * weight for value, (_, weight) in zip(torch.stack(losses).tolist(), chosen))
    if processes == 1:
        return local
    return float(accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum"))


__all__ = ["RunResult", "Evaluation", "set_seed", "resolve_device", "make_accelerator", "launched_processes", "is_main_process",
           "per_device_batch_size",
           "make_optimizer", "linear_schedule", "micro_batches", "evaluate", "train"]
