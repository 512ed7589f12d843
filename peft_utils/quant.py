"""QLoRA / QDoRA support: an NF4 loader on bitsandbytes, k-bit training preparation and honest size accounting.

Loading goes through transformers' ``BitsAndBytesConfig``: every ``nn.Linear`` / GPT-2 ``Conv1D`` outside the
classification head and the embeddings becomes a bitsandbytes ``Linear4bit`` whose packed weight encodes the
(out, in) matrix (transformers transposes ``Conv1D`` weights before quantising), so the hand-written LoRA / DoRA
layers wrap it like any ``nn.Linear``. The base forward stays the 4-bit kernel.

4-bit on CPU: bitsandbytes >= 0.48 ships a CPU backend, and transformers' 4-bit quantizer accepts
``device_map={"": "cpu"}`` (it only refuses a *mixed* CPU/GPU map without fp32 offload). The un-quantised share
(embeddings, layer norms, biases, head) is stored in float32; ``compute_dtype`` is the dtype of the 4-bit
matmuls only. One CPU-specific trap is disabled on load: on AVX512-BF16 CPUs bitsandbytes 0.50 repacks a
``Linear4bit`` weight in place at its first eval-mode forward (see ``adapters.pin_4bit_layout``).
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapters import LoRALayer, is_conv1d, is_linear4bit, pin_4bit_layout

BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
QUANT_TYPES = ("nf4", "fp4")
# Never quantised: classification heads (GPT-2 ``score``, BERT ``classifier``) and embeddings. transformers
# matches these as module-name prefixes or suffixes; embeddings are not linear layers, listed to be explicit.
SKIP_MODULES = ("score", "classifier", "wte", "wpe", "embeddings", "lm_head")
SIZE_KEYS = (
    "quantized_bytes", "quant_state_bytes", "frozen_bytes", "trainable_bytes", "total_bytes", "fp32_bytes",
    "disk_bytes", "disk_kind", "nf4_bound_bytes",
)
DISK_KINDS = {
    "full": "full checkpoint",
    "lora": "adapter",
    "dora": "adapter",
    "qlora": "4-bit base + adapter",
    "qdora": "4-bit base + adapter",
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class _DropMissingKernelsNotice(logging.Filter):
    """bitsandbytes logs a warning at import when the optional ``kernels`` package is absent; the fused CPU kernel
    it would load serves the repacked inference layout, which ``load_quantized`` turns off anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def require_bitsandbytes():
    """Import bitsandbytes, or raise an ImportError that says how to install it (missing or failing to load)."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice_filter = _DropMissingKernelsNotice()
    bnb_logger.addFilter(notice_filter)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (loads the native library)
    except ModuleNotFoundError as error:
        raise ImportError(f"4-bit models need bitsandbytes, which is not installed: pip install {BITSANDBYTES_PIN}") from error
    except Exception as error:  # a broken install or native library: ImportError, OSError, RuntimeError...
        raise ImportError(
            f"4-bit models need bitsandbytes, which failed to load ({type(error).__name__}: {error}); "
            f"reinstall it: pip install {BITSANDBYTES_PIN}"
        ) from error
    finally:
        bnb_logger.removeFilter(notice_filter)
    return bitsandbytes


def _resolve_compute_dtype(compute_dtype, device_type: str) -> torch.dtype:
    """bf16 on CUDA and float32 on CPU unless given; half precision on a CPU is allowed but warned about."""
    if compute_dtype is None:
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    dtype = _DTYPES.get(compute_dtype, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype!r}")
    if device_type == "cpu" and dtype != torch.float32:
        warnings.warn(
            f"4-bit compute in {dtype} requested on a CPU; float32 is the CPU default. Half-precision speed on a CPU "
            "depends on native support (AVX512-BF16 / AMX): without it the matmuls are emulated and training can be "
            "an order of magnitude slower (~30x has been reported), and half precision rounds every activation of the "
            "4-bit matmuls. Pass compute_dtype=torch.float32 unless you have timed this CPU.",
            UserWarning,
            stacklevel=3,
        )
    return dtype


def _quantizable_layers(source: str, num_labels: int, skip: list[str]) -> list[str]:
    """Names of the layers transformers would turn into ``Linear4bit``, found on a weightless (meta) copy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    return [
        name for name, module in skeleton.named_modules()
        if (type(module) is nn.Linear or is_conv1d(module)) and should_convert_module(name, skip)
    ]


def load_quantized(
    model_name_or_path: str | Path,
    num_labels: int = 2,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = True,
    quant_type: str = "nf4",
    device_map=None,
    skip_modules=(),
):
    """Load a sequence-classification model with its linear layers in 4-bit (NF4 by default). Returns ``(model, tokenizer)``.

    ``compute_dtype``: dtype of the 4-bit matmuls (default bf16 on CUDA, float32 on CPU). ``device_map``: default
    the current CUDA device, else ``{"": "cpu"}``. ``skip_modules``: extra module names to keep un-quantised, on top
    of the head and embeddings. The un-quantised share is loaded in float32 (exact pretrained values; no bf16 round
    trip). Then call ``prepare_for_kbit_training`` and ``apply_adapters``.
    """
    from .models import configure_padding, load_tokenizer, resolve_model_source
    from .quiet import from_pretrained_noting_new_head

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {QUANT_TYPES}")
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    on_cpu = not torch.cuda.is_available() or all(str(d) == "cpu" for d in devices)
    dtype = _resolve_compute_dtype(compute_dtype, "cpu" if on_cpu else "cuda")
    require_bitsandbytes()
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    source = resolve_model_source(model_name_or_path)
    skip = list(SKIP_MODULES) + list(skip_modules)
    if not _quantizable_layers(source, num_labels, skip):
        raise ValueError(
            f"{model_name_or_path!s} has no layer to quantise to 4-bit (no nn.Linear / Conv1D outside {skip}); "
            "load it with peft_utils.models.load_model instead"
        )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )
    tokenizer = load_tokenizer(source)
    model = from_pretrained_noting_new_head(
        AutoModelForSequenceClassification, source, num_labels=num_labels, quantization_config=quantization,
        device_map=device_map, dtype=torch.float32,
    )
    layers = [module for module in model.modules() if is_linear4bit(module)]
    if not layers:
        raise ValueError(f"{model_name_or_path!s}: transformers quantised no layer; nothing is 4-bit")
    for layer in layers:
        pin_4bit_layout(layer)
    configure_padding(tokenizer, model)
    return model, tokenizer


def _is_quantized(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "quant_state", None) is not None


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters an ``apply_adapters`` call made trainable (adapter tensors and kept modules), if any."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRALayer):
            keep.update(id(p) for n, p in module.named_parameters() if not n.startswith("base."))
    config = getattr(model, "adapter_config", None)
    for name in getattr(config, "keep_trainable", []):
        keep.update(id(p) for p in model.get_submodule(name).parameters())
    return keep


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Get a 4-bit model ready for adapter training, without touching its packed weights.

    - freezes the base (adapter tensors and modules kept trainable by an earlier ``apply_adapters`` stay as they are);
    - casts every *un-quantised* floating parameter still in fp16/bf16 — layer norms, head, embeddings, biases — to
      float32 (as peft does, so the residual stream stays float32), skipping bitsandbytes' packed weights and their
      quant state, which a blanket ``model.float()`` / peft's helper could upcast when the packed storage is a float;
    - with ``gradient_checkpointing``: turns it on (non-reentrant) and makes the embedding output require grad, so
      a reentrant checkpoint also back-propagates into adapters when every base weight is frozen.
    """
    keep = _adapter_parameter_ids(model)
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)
        if _is_quantized(parameter) or not parameter.is_floating_point():
            continue
        if parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    for module in model.modules():
        if is_linear4bit(module):
            pin_4bit_layout(module)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        enable({"use_reentrant": False})
        model.enable_input_require_grads()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return model


def nf4_bits_per_weight(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage bits per weight of blockwise 4-bit quantisation.

    4 bits of code, plus one absmax per block of ``blocksize``: a float32 (32/64 = 0.5 bit) without double
    quantisation; with it, an 8-bit absmax plus one float32 per ``nested_blocksize`` absmaxes:
    4 + 8/64 + 32/(64·256) ≈ 4.127 bits. Lookup tables (16 + 256 floats per layer) are not included.
    """
    for name, value in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)]
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    if nested is not None:
        tensors += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _logical_numel(parameter: torch.Tensor) -> int:
    return int(torch.Size(parameter.quant_state.shape).numel()) if _is_quantized(parameter) else parameter.numel()


def _persistent_buffers(model: nn.Module):
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


def _adapter_tensor_bytes(model: nn.Module) -> int:
    from .inject import adapter_state_dict

    try:
        state = adapter_state_dict(model)
    except ValueError as error:
        raise ValueError(f"an adapter method's size needs a model with adapters: {error}") from error
    return sum(_nbytes(t) for t in state.values())


def model_size(model: nn.Module, method: str, adapter_bytes: int | None = None) -> dict:
    """Where a model's bytes are, and what ``method`` must ship. Keys: see ``SIZE_KEYS``.

    In memory: ``quantized_bytes`` (packed 4-bit weights) + ``quant_state_bytes`` (absmax, nested absmax, offset
    and lookup tables) + ``frozen_bytes`` (other frozen parameters and all buffers) + ``trainable_bytes`` =
    ``total_bytes``. ``fp32_bytes``: the same model with every parameter and floating buffer in float32, 4-bit
    weights counted as the weights they encode. ``nf4_bound_bytes``: the analytic size of the quantised share,
    n_weights × ``nf4_bits_per_weight`` / 8 (per layer, with its own blocksize and double quantisation).
    ``disk_bytes``: "full checkpoint" (every parameter at its dtype) for full fine-tuning; "adapter"
    (``adapter_bytes``, e.g. what ``save_adapters`` returned, else the adapter tensors' bytes) for LoRA / DoRA;
    "4-bit base + adapter" (packed weights + quant state + other frozen parameters and persistent buffers + adapter)
    for QLoRA / QDoRA.
    """
    if method not in DISK_KINDS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(DISK_KINDS)}")
    quantized = quant_state = frozen = trainable = fp32 = 0
    bound = 0.0
    seen_state: set[tuple[int, int]] = set()
    for parameter in model.parameters():
        fp32 += 4 * _logical_numel(parameter)
        if _is_quantized(parameter):
            quantized += _nbytes(parameter)
            state = parameter.quant_state
            for tensor in _quant_state_tensors(state):
                key = (tensor.data_ptr(), _nbytes(tensor))
                if key not in seen_state:  # a table shared between layers is stored once
                    seen_state.add(key)
                    quant_state += _nbytes(tensor)
            nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
            bits = nf4_bits_per_weight(state.blocksize, nested is not None, nested.blocksize if nested else 256)
            bound += _logical_numel(parameter) * bits / 8
        elif parameter.requires_grad:
            trainable += _nbytes(parameter)
        else:
            frozen += _nbytes(parameter)
    for buffer in model.buffers():
        frozen += _nbytes(buffer)
        fp32 += 4 * buffer.numel() if buffer.is_floating_point() else _nbytes(buffer)
    total = quantized + quant_state + frozen + trainable

    if method == "full":
        disk = sum(_nbytes(p) for p in model.parameters() if not _is_quantized(p)) + quantized + quant_state
    else:
        adapter = int(adapter_bytes) if adapter_bytes is not None else _adapter_tensor_bytes(model)
        if method in ("lora", "dora"):
            disk = adapter
        else:
            if not quantized:
                raise ValueError(f"method {method!r} needs a 4-bit model, but no parameter of this one is quantized")
            frozen_params = sum(_nbytes(p) for p in model.parameters() if not _is_quantized(p) and not p.requires_grad)
            disk = quantized + quant_state + frozen_params + sum(_nbytes(b) for _, b in _persistent_buffers(model)) + adapter
    return {
        "quantized_bytes": quantized,
        "quant_state_bytes": quant_state,
        "frozen_bytes": frozen,
        "trainable_bytes": trainable,
        "total_bytes": total,
        "fp32_bytes": fp32,
        "disk_bytes": int(disk),
        "disk_kind": DISK_KINDS[method],
        "nf4_bound_bytes": int(round(bound)),
    }


def _human(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_size_report(report: dict) -> str:
    """A few aligned lines for printing a ``model_size`` report."""
    missing = [k for k in SIZE_KEYS if k not in report]
    if missing:
        raise ValueError(f"not a model_size report: missing {missing}")
    rows = [
        ("4-bit packed weights", report["quantized_bytes"]),
        ("quant state (absmax, tables)", report["quant_state_bytes"]),
        ("other frozen (params + buffers)", report["frozen_bytes"]),
        ("trainable", report["trainable_bytes"]),
        ("total in memory", report["total_bytes"]),
        ("same model in fp32", report["fp32_bytes"]),
    ]
    lines = [f"{label:<34}{_human(value):>12}  ({value:,} B)" for label, value in rows]
    if report["total_bytes"]:
        lines.append(f"{'fp32 / in-memory':<34}{report['fp32_bytes'] / report['total_bytes']:>11.2f}x")
    if report["quantized_bytes"]:
        measured = report["quantized_bytes"] + report["quant_state_bytes"]
        lines.append(
            f"{'4-bit share: measured / bound':<34}{_human(measured):>12}  vs {_human(report['nf4_bound_bytes'])} "
            f"analytic ({measured / max(report['nf4_bound_bytes'], 1):.4f}x)"
        )
    lines.append(f"{'to ship: ' + report['disk_kind']:<34}{_human(report['disk_bytes']):>12}  ({report['disk_bytes']:,} B)")
    return "\n".join(lines)


__all__ = [
    "BITSANDBYTES_PIN", "QUANT_TYPES", "SKIP_MODULES", "SIZE_KEYS", "DISK_KINDS", "require_bitsandbytes",
    "load_quantized", "prepare_for_kbit_training", "nf4_bits_per_weight", "model_size", "format_size_report",
]
