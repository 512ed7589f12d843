"""Put adapters into a model: find target layers, wrap them, freeze the rest; count, merge, save and load.

Targets are matched on module names, so one walker serves GPT-2 (``Conv1D``), encoders and decoders
(``nn.Linear``) and 4-bit models (bitsandbytes ``Linear4bit``); which names, per family and preset, is ``targets.py``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .adapters import DoRALayer, LoRALayer, is_supported_base
from .targets import LEGACY_PRESETS, default_keep_trainable, model_type, name_matcher, resolve_targets

ADAPTER_METHODS = ("lora", "dora")
# The fixed GPT-2/BERT suffix lists, importable here as before; model-resolved presets live in targets.py.
TARGET_PRESETS = LEGACY_PRESETS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterConfig:
    """What was injected, stored on the model and next to saved weights so loading can rebuild it."""

    method: str
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    detach_norm: bool = True
    target_modules: list[str] = field(default_factory=list)
    keep_trainable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def _candidate_names(model: nn.Module) -> list[str]:
    """Distinct layer-name suffixes that could be targets, for error messages ("h.0.attn.c_attn" -> "attn.c_attn")."""
    names = {".".join(n.split(".")[-2:]) for n, m in model.named_modules() if is_supported_base(m) and n}
    return sorted(names)


def _adapter_layers(model: nn.Module) -> Iterable[tuple[str, LoRALayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer))


def apply_adapters(
    model: nn.Module,
    method: str = "lora",
    targets: str | Sequence[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    keep_trainable: Sequence[str] | None = None,
    use_rslora: bool = False,
    detach_norm: bool = True,
) -> nn.Module:
    """Wrap every target layer of ``model`` in a LoRA or DoRA layer (in place) and freeze everything else.

    ``targets``: module-name suffixes, a regex, a preset (``attn``, ``attn-all``, ``all-linear`` or a legacy GPT-2/BERT
    name) or None for the family's default (query and value; see ``targets.default_targets``).
    ``keep_trainable``: module-name suffixes whose parameters stay trainable (default: the classification head,
    ``score`` or ``classifier``, plus layers the family's head adds that checkpoints lack — a new head is random and
    must learn; see ``targets.default_keep_trainable``).
    Returns the model, with its ``AdapterConfig`` at ``model.adapter_config``.
    """
    if method not in ADAPTER_METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {ADAPTER_METHODS}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if any(True for _ in _adapter_layers(model)):
        raise ValueError("model already has adapters; build a fresh model (or unmerge and reuse the existing ones)")
    matches = name_matcher(resolve_targets(model, targets))
    chosen = [(name, module) for name, module in model.named_modules() if name and matches(name)]
    if not chosen:
        raise ValueError(f"no module matched targets {targets!r}; candidate layers: {', '.join(_candidate_names(model))}")
    unsupported = [f"{name} ({type(module).__name__})" for name, module in chosen if not is_supported_base(module)]
    if unsupported:
        raise TypeError(f"targets must be nn.Linear, Conv1D or Linear4bit layers; not: {', '.join(unsupported)}")

    model.requires_grad_(False)
    for name, module in chosen:
        if method == "lora":
            layer = LoRALayer(module, rank, alpha, dropout, use_rslora)
        else:
            layer = DoRALayer(module, rank, alpha, dropout, use_rslora, detach_norm)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)

    kept = _keep_trainable(model, keep_trainable)
    model.adapter_config = AdapterConfig(
        method, rank, alpha, dropout, use_rslora, detach_norm, [n for n, _ in chosen], kept
    )
    return model


def _keep_trainable(model: nn.Module, keep: Sequence[str] | None) -> list[str]:
    """Unfreeze the named modules; explicit names that match nothing are an error, defaults are best-effort."""
    names = default_keep_trainable(model_type(model)) if keep is None else tuple(keep)
    matches = name_matcher(names) if names else (lambda _: False)
    kept = [n for n, m in model.named_modules() if n and matches(n) and not isinstance(m, LoRALayer)]
    if keep and not kept:
        raise ValueError(f"keep_trainable {list(keep)!r} matched no module")
    for name in kept:
        model.get_submodule(name).requires_grad_(True)
    return kept


def _numel(parameter: torch.Tensor) -> int:
    """Logical element count; a 4-bit packed weight reports its packed size, its quant state the real shape."""
    quant_state = getattr(parameter, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else parameter.numel()


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total parameters (4-bit weights counted as the weights they encode, like peft)."""
    trainable = total = 0
    for parameter in model.parameters():
        n = _numel(parameter)
        total += n
        trainable += n if parameter.requires_grad else 0
    return ParameterCount(trainable, total)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, for inference at the base model's cost."""
    for _, layer in _adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters`` (to keep training, or to swap adapters)."""
    for _, layer in _adapter_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changed: adapter tensors and the kept-trainable modules' parameters."""
    config = _config_of(model)
    state = {}
    for name, layer in _adapter_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A
        state[f"{name}.lora_B"] = layer.lora_B
        if isinstance(layer, DoRALayer):
            state[f"{name}.magnitude"] = layer.magnitude
    for module_name in config.keep_trainable:
        for param_name, parameter in model.get_submodule(module_name).named_parameters():
            state[f"{module_name}.{param_name}"] = parameter
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _config_of(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "adapter_config", None)
    if not isinstance(config, AdapterConfig):
        raise ValueError("model has no adapters: call apply_adapters first")
    return config


def save_adapters(model: nn.Module, folder: str | Path) -> int:
    """Write adapter weights (safetensors) and their config (JSON) to ``folder``; returns the bytes written.

    Refuses a merged model: its adapters are folded into weights that are not saved here.
    """
    from safetensors.torch import save_file

    if any(layer.merged for _, layer in _adapter_layers(model)):
        raise ValueError("unmerge the adapters before saving them")
    config = _config_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return sum((folder / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE))


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject adapters as described by ``folder``'s config into a fresh ``model`` and load their weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a folder written by save_adapters")
    config = AdapterConfig(**json.loads(config_path.read_text(encoding="utf-8")))
    apply_adapters(
        model, config.method, config.target_modules, config.rank, config.alpha, config.dropout,
        config.keep_trainable, config.use_rslora, config.detach_norm,
    )
    # Exact names, so a layer whose name merely ends like a target is not wrapped too.
    if model.adapter_config.target_modules != config.target_modules:
        raise ValueError("the model's layers differ from those the adapters were saved for")
    saved = load_file(str(weights_path))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter file does not fit this model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in saved.items():
            target = _tensor_by_name(model, name)
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}")
            target.copy_(tensor)
    return model


def _tensor_by_name(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


__all__ = [
    "ADAPTER_METHODS", "TARGET_PRESETS", "AdapterConfig", "ParameterCount", "apply_adapters", "count_parameters",
    "merge_adapters", "unmerge_adapters", "adapter_state_dict", "save_adapters", "load_adapters",
]
