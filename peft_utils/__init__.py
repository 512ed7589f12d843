"""peft-lab helpers: hand-written LoRA / DoRA / QLoRA, SST-2 data, training, results and plots.

Names are imported lazily (PEP 562), so `python -m peft_utils.plots` does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "adapters": ("LoRALayer", "DoRALayer"),
    "config": ("ExperimentConfig", "TrainConfig", "AdapterSettings", "PARAMETERS", "PROFILES", "make_config"),
    "methods": ("METHODS", "get_method"),
    "inject": ("TARGET_PRESETS", "AdapterConfig", "ParameterCount", "apply_adapters", "count_parameters",
               "merge_adapters", "unmerge_adapters"),
    "checkpoints": ("export_merged", "load_adapters", "save_adapters", "save_trained"),
    "targets": ("default_targets", "resolve_targets"),
    "inference": ("predict", "predict_runs"),
    "models": ("load_model", "load_tokenizer", "random_gpt2", "resolve_model_source"),
    "quant": ("load_quantized", "prepare_for_kbit_training"),
    "sizes": ("model_size", "nf4_bits_per_weight", "format_size_report"),
    "data": ("load_sst2", "subset", "encode", "make_loader"),
    "train": ("RunResult", "train", "evaluate", "set_seed"),
    "experiment": ("plan_experiment", "execute", "run_comparison", "run_sweep"),
    "store": ("RunStore", "RunRecorder"),
    "plots": ("plot_all",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'peft_utils' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
