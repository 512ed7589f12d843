"""Compilation: a GPU step of many small kernels is bound by their launches, not by arithmetic; compiling fuses them.

Regional compilation: each repeated block (GPT-2's ``transformer.h``, BERT's ``encoder.layer``) is compiled in
place with ``nn.Module.compile``, which keeps every parameter name, so a peft export and our checkpoints read the
model as before. One compiled graph serves every block unless a block reads state of its own: a decoder's KV cache
(useless to a classifier) gives each layer its slot, and so one compilation per layer; it is turned off.

Shapes are static (``dynamic=False``, the batch dimension too, as it takes few values): fully specialised kernels
and the fixed shapes CUDA graphs need, where dynamic shapes would trade speed for fewer compilations. Padding a
batch's width up to a multiple of :data:`PAD_TO_MULTIPLE` (``make_loader`` and ``StepBatches``' ``pad_to_multiple``)
bounds how many shapes there are: a few widths up to ``max_length`` times the train, evaluation and short last
batches' sizes, in train and eval mode, which :data:`RECOMPILE_LIMIT` leaves room for (past the limit dynamo runs
the block uncompiled, silently slower; torch's default is 8).
"""
from __future__ import annotations

import torch
from torch import nn

PAD_TO_MULTIPLE = 16
RECOMPILE_LIMIT = 64


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The largest ``nn.ModuleList`` whose items are all of one class: the transformer's layers (GPT-2 ``h``, BERT
    ``layer``, Llama ``layers``), found without knowing the architecture's attribute names."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(item) for item in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks (its transformer layers)")
    return max(lists, key=len)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile each repeated block of ``model`` in place (``dynamic=False``, see the module's docstring); returns
    ``model``, its parameters and ``state_dict`` names unchanged."""
    for block in repeated_blocks(model):
        block.compile(backend=backend, dynamic=False)  # an unknown backend raises here
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return model


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether to compile, by the ``compile`` parameter (checked by the configuration): ``"auto"`` on CUDA only (on
    a CPU compiling was measured slower than eager, and its first step takes minutes), ``"on"``, ``"off"``."""
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")
