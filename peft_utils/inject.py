"""Put adapters into a model: find target layers, wrap them, freeze the rest; count, merge and unmerge them.

Targets are matched on module names, so one walker serves GPT-2 (``Conv1D``), encoders and decoders
(``nn.Linear``) and 4-bit models (bitsandbytes ``Linear4bit``); which names, per family and preset, is ``targets.py``.
Saving and loading live in :mod:`.checkpoints`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch import nn

from .adapters import DoRALayer, LoRALayer, check_rank, is_supported_base, logical_numel
from .methods import ADAPTER_KINDS
from .targets import LEGACY_PRESETS, default_keep_trainable, model_type, name_matcher, resolve_targets

# The fixed GPT-2/BERT suffix lists, importable here as before; model-resolved presets live in targets.py.
TARGET_PRESETS = LEGACY_PRESETS

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
    # The targets as asked (a regex, or name suffixes; presets expanded), i.e. peft's ``target_modules``: unlike the
    # exact names above they also match the layers of a deeper model, which is how loading catches a depth mismatch.
    target_patterns: str | list[str] = field(default_factory=list)


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


def select_targets(model: nn.Module, targets: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The layers ``targets`` names (``None``: the model's default), each one a layer an adapter can wrap.

    Works on a weightless (meta-device) copy too, so a typo is caught before any weights are loaded.
    """
    matches = name_matcher(resolve_targets(model, targets))
    chosen = [(name, module) for name, module in model.named_modules() if name and matches(name)]
    if not chosen:
        raise ValueError(f"no module matched targets {targets!r}; candidate layers: {', '.join(_candidate_names(model))}")
    unsupported = [f"{name} ({type(module).__name__})" for name, module in chosen if not is_supported_base(module)]
    if unsupported:
        raise TypeError(f"targets must be nn.Linear, Conv1D or Linear4bit layers; not: {', '.join(unsupported)}")
    return chosen


def adapter_layers(model: nn.Module) -> Iterable[tuple[str, LoRALayer]]:
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
    if method not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {ADAPTER_KINDS}")
    check_rank(rank)
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has adapters; build a fresh model (or unmerge and reuse the existing ones)")
    requested = resolve_targets(model, targets)
    chosen = select_targets(model, requested)
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
        method, rank, alpha, dropout, use_rslora, detach_norm, [n for n, _ in chosen], kept, requested if isinstance(requested, str) else list(requested)
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


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total parameters (4-bit weights counted as the weights they encode, like peft)."""
    trainable = total = 0
    for parameter in model.parameters():
        n = logical_numel(parameter)
        total += n
        trainable += n if parameter.requires_grad else 0
    return ParameterCount(trainable, total)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, for inference at the base model's cost."""
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters`` (to keep training, or to swap adapters)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


__all__ = [
    "TARGET_PRESETS", "AdapterConfig", "ParameterCount", "apply_adapters", "select_targets", "count_parameters",
    "merge_adapters", "unmerge_adapters",
]
