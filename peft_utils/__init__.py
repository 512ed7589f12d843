"""peft-lab: hand-written LoRA / DoRA / QLoRA (:mod:`peft_utils.core`) and the lab around it. Names are imported
lazily (PEP 562), so that ``python -m peft_utils.plots`` does not pay for importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "core.layers": ("LoRALayer", "DoRALayer"),
    "core.inject": ("InjectedAdapters", "ParameterCount", "apply_adapters", "count_parameters", "merge_adapters",
                    "unmerge_adapters"),
    "core.targets": ("default_targets", "resolve_targets"),
    "core.quant": ("load_4bit", "prepare_for_kbit_training"),
    "core.batches": ("encode", "make_loader"),
    "core.loop": ("train_loop", "evaluate", "set_seed"),
    "config": ("ExperimentConfig", "TrainConfig", "AdapterSettings", "PARAMETERS", "PROFILES", "make_config"),
    "methods": ("METHODS", "get_method"),
    "checkpoints": ("export_merged", "load_adapters", "save_adapters", "save_trained"),
    "inference": ("predict", "predict_runs"),
    "models": ("build_model", "load_model", "load_tokenizer", "random_gpt2", "resolve_model_source"),
    "sizes": ("model_size", "nf4_bits_per_weight"),
    "data": ("load_sst2", "subset"),
    "train": ("RunResult", "train"),
    "experiment": ("plan_experiment", "run_plan", "run_comparison", "run_sweep"),
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
