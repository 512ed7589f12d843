"""Where a model's bytes are (packed 4-bit weights, their quantisation state, other frozen and trainable tensors),
what each method ships (:attr:`methods.Method.shipped`), and the analytic size of 4-bit storage."""
from __future__ import annotations

import torch
from torch import nn

from .checkpoints import adapter_state_dict
from .core.quant import is_quantized, logical_numel
from .methods import get_method

SIZE_KEYS = (
    "quantized_bytes", "quant_state_bytes", "frozen_bytes", "trainable_bytes", "total_bytes", "fp32_bytes",
    "disk_bytes", "disk_kind", "nf4_bound_bytes",
)


def nf4_bits_per_weight(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage bits per weight: 4 bits of code plus one absmax per block, a float32 (32/64 = 0.5 bit), or with double
    quantisation an 8-bit absmax plus a float32 per ``nested_blocksize`` absmaxes (4 + 8/64 + 32/(64·256) ≈ 4.127).
    Lookup tables (16 + 256 floats per layer) are not included."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def model_size(model: nn.Module, method: str, saved_bytes: int | None = None) -> dict:
    """Where a model's bytes are (the parts add up to ``total_bytes``), and what ``method`` ships: a checkpoint, an
    adapter, or a 4-bit base plus an adapter, counted as ``saved_bytes`` (what ``save_trained`` wrote) where given,
    else as the tensors' own bytes."""
    kind, size = get_method(method), _memory_bytes(model)
    if saved_bytes is not None:
        disk = saved_bytes
    elif kind.adapter is None:  # every parameter, no buffer
        disk = size["total_bytes"] - sum(map(_nbytes, model.buffers()))
    else:
        disk = sum(map(_nbytes, adapter_state_dict(model).values()))
    if kind.quantized:  # plus all that is frozen but buffers derived from others (DoRA's cached norms: not saved)
        if not size["quantized_bytes"]:
            raise ValueError(f"method {method!r} needs a 4-bit model, but no parameter of this one is quantized")
        persistent = model.state_dict(keep_vars=True).keys()
        derived = sum(_nbytes(b) for name, b in model.named_buffers() if name not in persistent)
        disk += size["total_bytes"] - size["trainable_bytes"] - derived
    size.update(disk_bytes=disk, disk_kind=kind.shipped)
    return {key: size[key] for key in SIZE_KEYS}


def _memory_bytes(model: nn.Module) -> dict[str, int]:
    """Every parameter and buffer counted once, as the kind it is stored as."""
    quantized = frozen = trainable = fp32 = 0
    bound = 0.0
    state_bytes: dict[tuple[int, int], int] = {}  # by (address, size): a table shared between layers once
    for parameter in model.parameters():
        fp32 += 4 * logical_numel(parameter)
        if is_quantized(parameter):
            quantized += _nbytes(parameter)
            state = parameter.quant_state
            nested = state.state2  # double quantisation: the absmaxes' own state
            tensors = [state.absmax, state.code, state.offset]
            tensors += [nested.absmax, nested.code] if nested is not None else []
            state_bytes.update({(t.data_ptr(), _nbytes(t)): _nbytes(t) for t in tensors if isinstance(t, torch.Tensor)})
            bits = nf4_bits_per_weight(state.blocksize, nested is not None, nested.blocksize if nested else 256)
            bound += logical_numel(parameter) * bits / 8
        elif parameter.requires_grad:
            trainable += _nbytes(parameter)
        else:
            frozen += _nbytes(parameter)
    for buffer in model.buffers():
        frozen += _nbytes(buffer)
        fp32 += 4 * buffer.numel() if buffer.is_floating_point() else _nbytes(buffer)
    quant_state = sum(state_bytes.values())
    return {"quantized_bytes": quantized, "quant_state_bytes": quant_state, "frozen_bytes": frozen,
            "trainable_bytes": trainable, "total_bytes": quantized + quant_state + frozen + trainable,
            "fp32_bytes": fp32, "nf4_bound_bytes": int(round(bound))}

