"""The core: LoRA, DoRA and QLoRA written out by hand, and the one loop that trains every method.

Read it in this order (each file imports only the ones before it); import each name from its file:

1. ``settings.py`` — ``AdapterSettings``: what an adapter is, from the parameters cell to peft's JSON.
2. ``layers.py``  — ``LoRALayer`` and ``DoRALayer``: each ``forward`` is its paper's equation; DoRA's factored
   norm sits beside it in a named helper.
3. ``targets.py`` — which layers get adapters: presets (``attn``, ``attn-all``, ``all-linear``) on any
   transformers classifier, and the classification head that keeps training.
4. ``quant.py``   — QLoRA's frozen base: a model loaded with its linear layers in 4-bit NF4 (bitsandbytes).
5. ``inject.py``  — the walker: wrap each target in a LoRA / DoRA layer, freeze the rest; count, merge, unmerge.
6. ``batches.py`` — text and labels to padded, length-bucketed batches in a seeded order.
7. ``loop.py``    — AdamW, the warm-up/decay schedule, evaluation, and ``train_loop``.

The core imports torch, transformers, bitsandbytes, accelerate and numpy, and nothing from the rest of
``peft_utils`` (the lab), so it can be read, copied or tested on its own.
"""
