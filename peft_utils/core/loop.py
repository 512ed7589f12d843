"""One training and evaluation loop for every method: only which parameters require grad differs.

Every method gets the same AdamW, schedule, clipping, accumulation, data order and evaluation, so a difference in
accuracy, time or memory belongs to the method, not to the loop. Devices, precision and processes are accelerate's
job (autocast, loss scaling, data-parallel gradients); the loop yields metrics and its caller decides what to keep.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .batches import Batch, StepBatches, row_order


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): adapter init, new heads and dropout then repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward instead of storing them: less memory for ~30% more compute. Non-reentrant:
    behind a frozen embedding the reentrant variant sees inputs without grad and drops the adapters' gradients.
    The KV cache, useless in training, conflicts with checkpointing: off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False


# ------------------------------------------------------------------------------------------ optimiser, schedule


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _no_decay(parameter: nn.Parameter) -> bool:
    """Biases, LayerNorm gains and DoRA magnitudes are vectors: decaying them towards 0 only hurts
    (a magnitude of 0 switches an output off), so decay applies to matrices only."""
    return parameter.ndim < 2


def _has_fused_adamw(parameter: nn.Parameter) -> bool:
    """Whether ``AdamW(fused=True)`` takes this parameter: a floating-point tensor on a CPU or CUDA device, the two
    devices torch (>= 2.4) has fused AdamW kernels for. ``AdamW`` itself checks only at its first ``step``."""
    return torch.is_floating_point(parameter) and parameter.device.type in FUSED_ADAMW_DEVICES


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the trainable parameters, no decay on vectors; the fused kernel where
    every parameter allows it, else ``foreach``, never torch's CPU default (a Python loop over parameters: 160 ms
    of a MiniLM full fine-tuning step where fused takes 25 ms). All three differ by rounding only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing to train")
    groups = [
        {"params": [p for p in trainable if not _no_decay(p)], "weight_decay": weight_decay},
        {"params": [p for p in trainable if _no_decay(p)], "weight_decay": 0.0},
    ]
    implementation = "fused" if all(_has_fused_adamw(p) for p in trainable) else "foreach"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **{implementation: True})


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak rate, then linear decay to 0 at ``total_steps``: warm-up keeps the first
    Adam steps, whose second-moment estimates are still noisy, small."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_for_training(model: nn.Module, accelerator, *, lr: float, weight_decay: float, warmup_ratio: float,
                         total_steps: int):
    """``(model, optimizer, scheduler)`` ready for :func:`train_loop`: AdamW and the schedule, wrapped by accelerate
    (autocast around the forward, loss scaling for fp16, data parallel gradients over several processes)."""
    model, optimizer = accelerator.prepare(model, make_optimizer(model, lr, weight_decay))
    scheduler = linear_schedule(optimizer.optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
    return model, optimizer, scheduler


# ------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class Evaluation:
    """One pass over the evaluation rows. ``predictions`` (predicted label) and ``probabilities`` (of the last
    label) are per row in the order of the rows given to the loader, so paired tests between methods can be
    recomputed from them; ``seconds``: its wall time."""

    accuracy: float
    loss: float
    n: int
    predictions: list[int]
    probabilities: list[float]
    seconds: float = field(compare=False)  # wall time differs between two identical evaluations


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def _score_batches(model: nn.Module, loader: DataLoader, device: torch.device, processes: int, rank: int,
                   autocast) -> list[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """(batch number, summed loss, probabilities, labels) of every ``processes``-th batch, from ``rank`` on."""
    scored = []
    for number, batch in enumerate(loader):
        if number % processes != rank:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            logits = _logits(model, batch).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        scored.append((number, loss, logits.softmax(dim=-1).cpu(), batch["labels"].cpu()))
    return scored


def evaluate(model: nn.Module, loader: DataLoader, accelerator=None) -> Evaluation:
    """Accuracy, mean cross-entropy and per-row predictions over ``loader`` (not shuffled), in eval mode; the
    caller's mode and random state are restored, so evaluating changes nothing in the training around it. Over
    several processes each scores every N-th batch and all get the whole result, each row once (accelerate's
    ``gather_for_metrics`` trims padding by assuming full batches, which bucketed ones are not)."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    autocast = accelerator.autocast if accelerator else contextlib.nullcontext
    was_training = model.training
    synchronize(device)
    start = time.perf_counter()
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            scored = _score_batches(model, loader, device, processes, rank, autocast)
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
    probabilities, labels = torch.cat([item[2] for item in scored]), torch.cat([item[3] for item in scored])
    predicted, n = probabilities.argmax(dim=-1), len(labels)
    order = torch.empty(n, dtype=torch.long)
    order[torch.tensor(row_order(loader))] = torch.arange(n)  # loader position of each row
    synchronize(device)
    return Evaluation(int((predicted == labels).sum()) / n, loss_sum / n, n, predicted[order].tolist(),
                      probabilities[order, -1].tolist(), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class StepMetrics:
    """One optimiser step: its number, the epoch reached, the global batch's mean loss (a float64 tensor left on
    the device), the rate it used, the global batch's rows and non-pad tokens, and whether fp16 loss scaling
    skipped the update (an overflow). Reading ``loss`` is a host read (on a GPU it waits for the step to finish):
    read it when you log, many steps at once."""

    step: int
    epoch: float
    loss: torch.Tensor
    lr: float
    rows: int
    tokens: int
    skipped: bool = False


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    epoch: float
    evaluation: Evaluation


def _loss_scale(accelerator) -> float | None:
    """fp16's current loss scale (``None`` without loss scaling). ``GradScaler`` lowers it exactly when it skips
    a step, which is how a skip is seen: accelerate's ``step_was_skipped`` misses the skips that a fused optimizer
    makes inside its own kernel."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None


def _global_mean_loss(accelerator, losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The global batch's mean loss, kept on the device so the step reads nothing back to the host: each
    micro-batch's mean weighted by its share, summed in float64 in micro-batch order, then over processes."""
    total = losses[0].double() * weights[0]
    for loss, weight in zip(losses[1:], weights[1:]):
        total = total + loss.double() * weight
    return accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total


def train_loop(model: nn.Module, train_batches: StepBatches, eval_loader: DataLoader, optimizer, scheduler,
               accelerator, *, epochs: int = 1, max_grad_norm: float | None = 1.0,
               eval_every: int | None = None) -> Iterator[StepMetrics | EvalMetrics]:
    """Train for ``epochs`` passes over ``train_batches``; yield every step's metrics and every evaluation's.

    Each micro-batch's mean loss is weighted by its share of the global batch's rows, so the accumulated gradient
    is that of the mean loss over all rows, even for a short last batch; DDP averages gradients over processes, so
    each process scales its share by their number. Evaluation runs every ``eval_every`` steps and after each epoch.
    """
    steps_per_epoch, processes, step = len(train_batches), accelerator.num_processes, 0
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    for epoch in range(epochs):
        for batch in train_batches:  # one global batch: this process's micro-batches of it
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            losses = []
            for number, (micro, weight) in enumerate(batch.micro_batches):
                micro = {k: v.to(accelerator.device, non_blocking=True) for k, v in micro.items()}
                last = number == len(batch.micro_batches) - 1  # only its backward all-reduces the gradients
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = F.cross_entropy(_logits(model, micro).float(), micro["labels"])  # float32 loss
                    accelerator.backward(loss * (weight * processes))
                losses.append(loss.detach())
            if max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, max_grad_norm)
            scale = _loss_scale(accelerator)
            optimizer.step()  # with fp16 loss scaling, skipped when the gradients overflowed...
            skipped = scale is not None and _loss_scale(accelerator) < scale
            if not skipped:  # ... and then the schedule waits for the next real update
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = _global_mean_loss(accelerator, losses, [weight for _, weight in batch.micro_batches])
            yield StepMetrics(step, step / steps_per_epoch, loss, lr, batch.rows, batch.tokens, skipped)
            if eval_every and step % eval_every == 0 and step % steps_per_epoch:
                yield EvalMetrics(step, step / steps_per_epoch, evaluate(accelerator.unwrap_model(model),
                                                                         eval_loader, accelerator))
        yield EvalMetrics(step, float(epoch + 1), evaluate(accelerator.unwrap_model(model), eval_loader, accelerator))
