"""The core: LoRA, DoRA and QLoRA written out by hand, and the one loop that trains every method.

Read it in this order (about 900 lines in all):

1. ``layers.py``  — ``LoRALayer`` and ``DoRALayer``: each ``forward`` is its paper's equation; the two speed
   tricks (the fused low-rank update, DoRA's factored norm) sit beside it in named helpers.
2. ``targets.py`` — which layers get adapters: presets (``attn``, ``attn-all``, ``all-linear``) resolved on any
   transformers classifier, and the classification head that keeps training.
3. ``inject.py``  — the walker: wrap each target in a LoRA / DoRA layer, freeze the rest; count, merge, unmerge.
4. ``quant.py``   — QLoRA's frozen base: load a model with its linear layers in 4-bit NF4 (bitsandbytes).
5. ``batches.py`` — text and labels to padded, length-bucketed batches in a seeded order; one global batch cut
   into this process's micro-batches.
6. ``loop.py``    — AdamW, the warm-up/decay schedule, evaluation, and ``train_loop``: forward, loss, backward,
   clip, step, schedule, evaluate, yielding metrics.

The core imports torch, transformers, bitsandbytes, accelerate and numpy, and nothing from the rest of
``peft_utils`` (the lab: configuration, experiments, records, statistics, plots), so it can be read, copied or
tested on its own.
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
    "InjectedAdapters", "ParameterCount", "apply_adapters", "select_targets", "adapter_layers", "count_parameters",
    "merge_adapters", "unmerge_adapters", "load_4bit", "prepare_for_kbit_training", "encode", "collate",
    "make_loader", "micro_batches", "StepBatches", "Evaluation", "evaluate", "make_optimizer",
    "prepare_for_training", "set_seed", "train_loop",
]
