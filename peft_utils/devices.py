"""Where a run computes: accelerate's device, precision and processes (:func:`make_accelerator`), the precision
rule every method shares, and what the records say about the machine."""
from __future__ import annotations

import contextlib
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}
# "bf16" and "bfloat16" alike: the precision names and torch's own.
_DTYPE_NAMES = {**PRECISION_DTYPES, **{str(dtype).removeprefix("torch."): dtype for dtype in _MIXED_PRECISION}}


def checked_dtype(dtype: torch.dtype | str, name: str = "compute_dtype") -> torch.dtype:
    """``dtype`` (or its name) when the methods can compute or store in it; else one line naming ``name``."""
    resolved = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in _MIXED_PRECISION:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: a model placed by ``device_map`` reports ``cuda:0``, and the two must compare
    equal, or a 4-bit model (which must not move) would be moved again."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU, with its CUDA index; CUDA without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return _with_index(resolved)


def compute_dtype_for(device: Any, precision: str = "auto") -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device``, the same for every method (QLoRA's 4-bit compute too).
    ``"auto"``: bfloat16 (no loss scaling) on a GPU of compute capability >= 8.0 (``torch.cuda.is_bf16_supported()``
    also says yes where it is slowly emulated), float16 with loss scaling on older GPUs, float32 on a CPU (the
    committed CPU records; ask for ``"bf16"`` where the CPU has avx512_bf16 or amx_bf16: native, so fast). Refused:
    bf16 on a GPU without native bfloat16; fp16 on a CPU, where accelerate neither autocasts nor scales losses in it."""
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if precision == "bf16" and device.type == "cuda" and not _native_bf16(device):
        raise ValueError(f"precision='bf16' needs a GPU with native bfloat16 (compute capability >= 8.0); "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}: "
                         "use precision='fp16' (with loss scaling) or 'auto'")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a GPU (on a CPU accelerate neither autocasts nor scales losses "
                         "in fp16); use 'bf16' (fast on CPUs with avx512_bf16 or amx_bf16) or 'fp32'")
    if device.type == "cpu":
        warn_if_emulated_on_cpu(PRECISION_DTYPES[precision])
    return PRECISION_DTYPES[precision]


def _native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _cpuinfo(key: str) -> str | None:
    """The value of ``key`` in ``/proc/cpuinfo`` (Linux), else ``None``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (``avx512_bf16`` or ``amx_bf16`` among its flags)."""
    return bool({"avx512_bf16", "amx_bf16"} & set((_cpuinfo("flags") or "").split()))


def warn_if_emulated_on_cpu(dtype: torch.dtype) -> None:
    """Warn when half-precision matmuls on this CPU would be emulated: fp16 always, bf16 without native support."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_native_bf16()):
        warnings.warn(
            f"{dtype} compute on a CPU without native support for it (lscpu: no avx512_bf16 / amx_bf16 for bf16): "
            "the matmuls are emulated and training can be an order of magnitude slower (~30x has been reported); "
            "float32 is the CPU default", UserWarning, stacklevel=3)


def make_accelerator(device: str = "auto", precision: str = "auto", **trackers: Any):
    """The run's ``accelerate.Accelerator``, with :func:`compute_dtype_for`'s autocast; ``trackers``:
    ``trackers.accelerator_arguments`` (accelerate fixes them when it is made, hence one accelerator per run)."""
    from accelerate import Accelerator

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # "cuda:1" in one process; under a launcher each process has its own GPU
    mixed_precision = _MIXED_PRECISION[compute_dtype_for(resolved, precision)]
    _start_afresh_for_other_settings(resolved, mixed_precision)
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision=mixed_precision, **trackers)


def _start_afresh_for_other_settings(device: torch.device, mixed_precision: str) -> None:
    """accelerate keeps one device and mixed precision per process: it refuses another precision, or the CPU after
    a GPU, and silently keeps the first device. A kernel or test session that changes either starts its state
    afresh. ``_reset_state`` is private: ``tests/test_precision.py`` fails loudly if it changes."""
    from accelerate.state import AcceleratorState, PartialState

    ran_on = PartialState._shared_state.get("device")
    if ran_on is not None and _with_index(ran_on) != device and launched_processes() == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    elif AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def accelerator_dtype(accelerator) -> torch.dtype:
    """The autocast dtype the accelerator was made with: what its run computes in."""
    return PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32)


def launched_processes() -> int:
    """How many processes a launcher started (``WORLD_SIZE``): known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process prints and writes: rank 0 of a launch, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def same_in_every_process(value: str, device: str = "auto") -> str:
    """The main process's ``value`` in every process of a launch (joining its process group on ``device``)."""
    if launched_processes() == 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=resolve_device(device).type == "cpu")
    return broadcast_object_list([value], from_process=0)[0]


def per_device_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """``batch_size / (processes x accumulation)``; an error when it does not divide (a silently different global
    batch would change the experiment)."""
    shares = processes * accumulation
    if batch_size % shares:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not divide into {processes} "
                         f"process(es) x {accumulation} accumulation step(s); choose a multiple of {shares}")
    return batch_size // shares


def hardware_name(device: torch.device) -> str:
    """What ran the steps (times compare only on the same hardware): the GPU, or the CPU's model and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"
