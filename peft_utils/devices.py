"""Where a run computes: the device, its precision, the processes of a launch, and the hardware behind them.

Devices, precision and processes are accelerate's job (:func:`make_accelerator`): one CPU process, one GPU, or
``accelerate launch --num_processes N`` / ``torchrun`` for data parallel training. What is decided here is the
precision rule every method shares, and what the records say about the machine.
"""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

_MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: a model that ``from_pretrained(device_map=...)`` placed reports ``cuda:0``,
    and the two must compare equal, or a 4-bit model (which must not move) would be moved again."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit CUDA request without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return _with_index(resolved)


def compute_dtype_for(device: Any) -> torch.dtype:
    """The autocast dtype for a device: the same rule for every method, QLoRA's 4-bit compute included.

    - CUDA with native bfloat16 (compute capability >= 8.0: A100, H100, RTX 30xx+): bfloat16, which keeps
      float32's exponent range, so no loss scaling is needed.
    - Older CUDA GPUs (T4, V100): float16 with loss scaling (``torch.cuda.is_bf16_supported()`` says yes on some of
      them, through slow emulation, hence the capability test).
    - CPU: float32.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def make_accelerator(device: str = "auto"):
    """The ``accelerate.Accelerator`` for ``device`` (``"auto"``, ``"cpu"``, ``"cuda[:i]"``), with the precision of
    :func:`compute_dtype_for`. Under ``accelerate launch`` / ``torchrun`` it joins the process group."""
    from accelerate import Accelerator

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # "cuda:1" in one process; under a launcher each process has its own GPU
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision=_MIXED_PRECISION[compute_dtype_for(resolved)])


def accelerator_device(accelerator) -> torch.device:
    """The accelerator's device with its CUDA index (accelerate names a single GPU ``cuda``)."""
    return _with_index(accelerator.device)


def launched_processes() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (both set ``WORLD_SIZE``); read from the
    environment so that a plan can check the batch split before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is the process that prints and writes: rank 0 of a launch (both launchers set ``RANK``), or the
    only process."""
    return int(os.environ.get("RANK", "0")) == 0


def per_device_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """``batch_size / (processes x accumulation)``; an error when it does not divide (a silently different global
    batch would change the experiment)."""
    shares = processes * accumulation
    if batch_size % shares:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not divide into {processes} "
                         f"process(es) x {accumulation} accumulation step(s); choose a multiple of {shares}")
    return batch_size // shares


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
