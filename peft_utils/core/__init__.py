"""The core: LoRA, DoRA and QLoRA written out by hand, and the one loop that trains every method.

Read it in this order (each file imports only the ones before it):

1. ``layers.py``  — ``LoRALayer`` and ``DoRALayer``: each ``forward`` is its paper's equation; DoRA's factored
   norm sits beside it in a named helper.
2. ``targets.py`` — which layers get adapters: presets (``attn``, ``attn-all``, ``all-linear``) on any
   transformers classifier, and the classification head that keeps training.
3. ``quant.py``   — QLoRA's frozen base: a model loaded with its linear layers in 4-bit NF4 (bitsandbytes).
4. ``inject.py``  — the walker: wrap each target in a LoRA / DoRA layer, freeze the rest; count, merge, unmerge.
5. ``batches.py`` — text and labels to padded, length-bucketed batches in a seeded order.
6. ``loop.py``    — AdamW, the warm-up/decay schedule, evaluation, and ``train_loop``.

The core imports torch, transformers, bitsandbytes, accelerate and numpy, and nothing from the rest of
``peft_utils`` (the lab), so it can be read, copied or tested on its own.
"""
from __future__ import annotations

from .batches import StepBatches, collate, encode, make_loader, micro_batches
from .inject import (InjectedAdapters, ParameterCount, adapter_layers, apply_adapters, count_parameters,
                     merge_adapters, select_targets, unmerge_adapters)
from .layers import DoRALayer, LoRALayer, base_weight
from .loop import Evaluation, evaluate, make_optimizer, prepare_for_training, set_seed, train_loop
from .quant import load_4bit, prepare_for_kbit_training
from .targets import default_targets, preset_layers, resolve_targets

__all__ = [
    "LoRALayer", "DoRALayer", "base_weight", "default_targets", "preset_layers", "resolve_targets",
    "load_4bit", "prepare_for_kbit_training", "InjectedAdapters", "ParameterCount", "apply_adapters",
    "select_targets", "adapter_layers", "count_parameters", "merge_adapters", "unmerge_adapters", "encode",
    "collate", "make_loader", "micro_batches", "StepBatches", "Evaluation", "evaluate", "make_optimizer",
    "prepare_for_training", "set_seed", "train_loop",
]
