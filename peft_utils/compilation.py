"""Compilation: a GPU step of many small kernels is bound by their launches, not by arithmetic; compiling fuses them.

Each repeated block is compiled in place (``nn.Module.compile``), so every parameter name, and with it a peft export
and our checkpoints, is unchanged; a decoder's KV cache would give each layer a graph of its own and is turned off.
Shapes are static (``dynamic=False``: specialised kernels, and the fixed shapes CUDA graphs need); padding a batch's
width to a multiple of :data:`PAD_TO_MULTIPLE` bounds how many there are, within :data:`RECOMPILE_LIMIT` (past it
dynamo runs the block uncompiled, silently slower; torch's default is 8).
"""
from __future__ import annotations

import torch
from torch import nn

PAD_TO_MULTIPLE = 16
RECOMPILE_LIMIT = 64


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The largest ``nn.ModuleList`` of one class: the transformer's layers, whatever the architecture names them."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(item) for item in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks (its transformer layers)")
    return max(lists, key=len)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile each repeated block of ``model`` in place; returns ``model``."""
    for block in repeated_blocks(model):
        block.compile(backend=backend, dynamic=False)  # an unknown backend raises here
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return model


def use_compile(setting: str, device: torch.device) -> bool:
    """``"auto"`` compiles on CUDA only: on a CPU compiling was measured slower than eager, its first step minutes."""
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")
