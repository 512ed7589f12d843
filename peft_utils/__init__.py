"""peft-lab helpers: hand-written LoRA / DoRA / QLoRA, SST-2 data, training, results and plots."""
from .adapters import DoRALayer, LoRALayer
from .inject import (
    TARGET_PRESETS,
    AdapterConfig,
    ParameterCount,
    apply_adapters,
    count_parameters,
    load_adapters,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from .models import load_model, load_tokenizer, random_gpt2, resolve_model_source

__all__ = [
    "LoRALayer", "DoRALayer", "TARGET_PRESETS", "AdapterConfig", "ParameterCount", "apply_adapters",
    "count_parameters", "load_adapters", "merge_adapters", "save_adapters", "unmerge_adapters",
    "load_model", "load_tokenizer", "random_gpt2", "resolve_model_source",
]
