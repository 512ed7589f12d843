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

import warnings
from pathlib import Path

import torch
from torch import nn

from .adapters import LoRALayer, is_conv1d, is_linear4bit, is_quantized, pin_4bit_layout
from .config import compute_dtype_for
from .models import configure_padding, enable_gradient_checkpointing, load_tokenizer, resolve_model_source
from .quiet import from_pretrained_noting_new_head
from .targets import DEFAULT_KEEP_TRAINABLE, default_keep_trainable

BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
QUANT_TYPES = ("nf4", "fp4")
# Never quantised: classification heads (``score``, ``classifier``; plus a family's new head layers, see
# ``targets.default_keep_trainable``) and embeddings. transformers matches these as module-name prefixes or
# suffixes; embeddings are not linear layers, listed to be explicit.
SKIP_MODULES = DEFAULT_KEEP_TRAINABLE + ("wte", "wpe", "embeddings", "lm_head")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def require_bitsandbytes():
    """Import bitsandbytes, or raise an ImportError that says how to install it (missing or failing to load)."""
    try:  # its one harmless import notice is filtered by quiet.silence_known_noise (installed with .models)
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (loads the native library)
    except ModuleNotFoundError as error:
        raise ImportError(f"4-bit models need bitsandbytes, which is not installed: pip install {BITSANDBYTES_PIN}") from error
    except Exception as error:  # a broken install or native library: ImportError, OSError, RuntimeError...
        raise ImportError(
            f"4-bit models need bitsandbytes, which failed to load ({type(error).__name__}: {error}); "
            f"reinstall it: pip install {BITSANDBYTES_PIN}"
        ) from error
    return bitsandbytes


def _resolve_compute_dtype(compute_dtype, device_type: str) -> torch.dtype:
    """The device's autocast dtype unless given (:func:`~peft_utils.config.compute_dtype_for`); half precision on a
    CPU is allowed but warned about."""
    if compute_dtype is None:
        return compute_dtype_for(device_type)
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


def _quantizable_layers(config, skip: list[str]) -> list[str]:
    """Names of the layers transformers would turn into ``Linear4bit``, found on a weightless (meta) copy."""
    from transformers import AutoModelForSequenceClassification
    from transformers.quantizers.quantizers_utils import should_convert_module

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
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {QUANT_TYPES}")
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    on_cpu = not torch.cuda.is_available() or all(str(d) == "cpu" for d in devices)
    dtype = _resolve_compute_dtype(compute_dtype, "cpu" if on_cpu else "cuda")
    require_bitsandbytes()
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    source = resolve_model_source(model_name_or_path)
    config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    skip = list(dict.fromkeys(SKIP_MODULES + default_keep_trainable(config.model_type) + tuple(skip_modules)))
    if not _quantizable_layers(config, skip):
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
        if is_quantized(parameter) or not parameter.is_floating_point():
            continue
        if parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    for module in model.modules():
        if is_linear4bit(module):
            pin_4bit_layout(module)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.enable_input_require_grads()
    return model


__all__ = [
    "BITSANDBYTES_PIN", "QUANT_TYPES", "SKIP_MODULES", "require_bitsandbytes", "load_quantized",
    "prepare_for_kbit_training",
]
