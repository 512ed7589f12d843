"""QLoRA's frozen base: linear layers stored in 4-bit NormalFloat (NF4) by bitsandbytes, adapters trained on top.

Loading goes through transformers' ``BitsAndBytesConfig``: every ``nn.Linear`` / GPT-2 ``Conv1D`` outside the
classification head and the embeddings becomes a bitsandbytes ``Linear4bit`` whose packed weight encodes the
(out, in) matrix (transformers transposes ``Conv1D`` weights before quantising), so the LoRA / DoRA layers wrap
it like any ``nn.Linear``. Each block of 64 weights keeps 4-bit codes and one scale; double quantisation stores
the scales in 8 bits too (about 4.13 bits per weight). The un-quantised share (embeddings, layer norms, biases,
head) stays float32; ``compute_dtype`` is the dtype of the 4-bit matmuls only.

4-bit on CPU: bitsandbytes >= 0.48 ships a CPU backend, and transformers' 4-bit quantizer accepts
``device_map={"": "cpu"}``. One CPU-specific trap is switched off as each layer loads (``layers.pin_4bit_layout``).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .layers import is_conv1d, is_linear4bit, pin_4bit_layout
from .targets import HEAD_MODULES, head_modules, meta_skeleton

BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
QUANT_TYPES = ("nf4", "fp4")
# Never quantised: classification heads (``score``, ``classifier``; plus a family's new head layers, see
# ``targets.head_modules``) and embeddings. transformers matches these as module-name prefixes or
# suffixes; embeddings are not linear layers, listed to be explicit.
SKIP_MODULES = HEAD_MODULES + ("wte", "wpe", "embeddings", "lm_head")


def require_bitsandbytes():
    """Import bitsandbytes, or raise an ImportError that says how to install it (missing or failing to load)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (loads the native library)
    except ModuleNotFoundError as error:
        raise ImportError(f"4-bit models need bitsandbytes, which is not installed: pip install {BITSANDBYTES_PIN}"
                          ) from error
    except Exception as error:  # a broken install or native library: ImportError, OSError, RuntimeError...
        raise ImportError(
            f"4-bit models need bitsandbytes, which failed to load ({type(error).__name__}: {error}); "
            f"reinstall it: pip install {BITSANDBYTES_PIN}"
        ) from error
    return bitsandbytes


def is_quantized(tensor: torch.Tensor) -> bool:
    """A bitsandbytes packed 4-bit weight: its storage is not its shape (see ``logical_numel``)."""
    return getattr(tensor, "quant_state", None) is not None


def logical_numel(tensor: torch.Tensor) -> int:
    """Element count of the weight a tensor encodes: a packed 4-bit weight counts as the matrix it stands for."""
    return int(torch.Size(tensor.quant_state.shape).numel()) if is_quantized(tensor) else tensor.numel()


def quantizable_layers(model_config, skip: list[str]) -> list[str]:
    """Names of the layers transformers would turn into ``Linear4bit``, found on a weightless (meta) copy."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skeleton = meta_skeleton(model_config)
    return [
        name for name, module in skeleton.named_modules()
        if (type(module) is nn.Linear or is_conv1d(module)) and should_convert_module(name, skip)
    ]


def _anywhere(name: str) -> str:
    """transformers' skip pattern for module ``name`` wherever it sits (``pooler`` -> ``bert.pooler.dense``): it
    matches a name from its start, or as the end of a layer's name, which leaves a parent's layers quantised."""
    return rf"(?:.*\.)?{re.escape(name)}"


def load_4bit(source: str | Path, num_labels: int = 2, compute_dtype: torch.dtype = torch.float32,
              double_quant: bool = True, quant_type: str = "nf4", device_map: dict | str | None = None,
              skip_modules: tuple[str, ...] = (), from_pretrained: Callable | None = None) -> nn.Module:
    """A sequence classifier from ``source`` (a folder or hub id) with its linear layers in 4-bit.

    ``device_map``: default the current CUDA device, else ``{"": "cpu"}``. ``skip_modules``: more modules to keep
    un-quantised (module-name suffixes, a module's layers with it), besides the head and embeddings.
    ``from_pretrained``: how to load (default ``AutoModelForSequenceClassification.from_pretrained``). Then
    ``apply_adapters``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {QUANT_TYPES}")
    require_bitsandbytes()
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    skip = list(dict.fromkeys(SKIP_MODULES + head_modules(config.model_type)
                              + tuple(_anywhere(name) for name in skip_modules)))
    if not quantizable_layers(config, skip):
        raise ValueError(f"{source!s} has no layer to quantise to 4-bit (no nn.Linear / Conv1D outside {skip})")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
    )
    load = from_pretrained or AutoModelForSequenceClassification.from_pretrained
    # float32 for the un-quantised share: the exact pretrained values, no bf16 round trip.
    model = load(source, num_labels=num_labels, quantization_config=quantization, device_map=device_map,
                 dtype=torch.float32, ignore_mismatched_sizes=True)  # a head for other classes: a new one
    layers = [module for module in model.modules() if is_linear4bit(module)]
    if not layers:
        raise ValueError(f"{source!s}: transformers quantised no layer; nothing is 4-bit")
    for layer in layers:
        pin_4bit_layout(layer)
    return model


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Cast every *un-quantised* parameter still in fp16/bf16 (layer norms, head, embeddings, biases) to float32, as
    peft does, so the residual stream stays float32 (``load_4bit`` loads them in float32 already; a model loaded
    otherwise may not). bitsandbytes' packed weights are skipped: a blanket ``model.float()`` would upcast a packed
    storage that is a float. Freezing the base is ``apply_adapters``' job."""
    for parameter in model.parameters():
        if not is_quantized(parameter) and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return model
