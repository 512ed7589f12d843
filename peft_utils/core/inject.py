"""The injection walker: find the target layers, wrap each in a LoRA or DoRA layer, freeze everything else.

Targets are matched on module names, so one walker serves GPT-2 (``Conv1D``), encoders and decoders
(``nn.Linear``) and 4-bit models (bitsandbytes ``Linear4bit``); which names, per family and preset, is
:mod:`.targets`. Also here: counting parameters, and merging / unmerging every adapter of a model.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .layers import ADAPTER_LAYERS, LoRALayer, is_supported_base
from .quant import logical_numel
from .settings import AdapterSettings
from .targets import (Targets, head_modules, head_or_embedding, linear_layers, model_type, name_matcher,
                      resolve_targets)


@dataclass
class InjectedAdapters:
    """What ``apply_adapters`` put into a model, kept at ``model.injected_adapters`` so saving can describe it:
    ``settings`` as peft stores them (targets with presets expanded: unlike the exact ``target_modules`` they also
    match a deeper model's layers, which is how loading catches a depth mismatch), and the exact ``saved_modules``
    trained in full (the head and ``settings.modules_to_save``)."""

    method: str
    settings: AdapterSettings
    target_modules: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    detach_norm: bool = True


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def select_targets(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    """The layers ``targets`` names (``None``: the model's default), each one a layer an adapter can wrap.

    Works on a weightless (meta-device) copy too, so a typo is caught before any weights are loaded. Refused, in
    one line naming the layer: no match, a match in the classification head or an embedding (see
    ``targets.head_or_embedding``), a layer type the adapters do not wrap.
    """
    return _layers_matching(model, resolve_targets(model, targets), targets)


def _layers_matching(model: nn.Module, resolved: re.Pattern | tuple[str, ...],
                     asked: Targets) -> list[tuple[str, nn.Module]]:
    """:func:`select_targets` once ``targets`` is resolved; ``asked`` is what the error messages quote."""
    matches = name_matcher(resolved)
    chosen = [(name, module) for name, module in model.named_modules() if name and matches(name)]
    if not chosen:
        # each layer by its last two name parts ("h.0.attn.c_attn" -> "attn.c_attn"), an accepted suffix
        candidates = ", ".join(sorted({".".join(n.split(".")[-2:]) for n in linear_layers(model)}))
        raise ValueError(f"no module matched targets {asked!r}; candidate layers: {candidates}")
    refusal = head_or_embedding(model, [name for name, _ in chosen])
    if refusal:
        raise ValueError(refusal)
    unsupported = [f"{name} ({type(module).__name__})" for name, module in chosen if not is_supported_base(module)]
    if unsupported:
        raise TypeError(f"targets must be nn.Linear, Conv1D or Linear4bit layers; not: {', '.join(unsupported)}")
    return chosen


def adapter_layers(model: nn.Module) -> Iterable[tuple[str, LoRALayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer))


def apply_adapters(model: nn.Module, method: str = "lora", targets: str | Sequence[str] | None = None, rank: int = 8,
                   alpha: float = 16.0, dropout: float = 0.0, modules_to_save: Sequence[str] | None = (),
                   rslora: bool = False, detach_norm: bool = True) -> nn.Module:
    """Wrap every target layer of ``model`` (``targets``: see ``targets.parse_targets``) in a LoRA or DoRA layer,
    in place, and freeze everything but the classification head (new and random: it always trains and is saved)
    and the ``modules_to_save`` module-name suffixes (peft's name for both). A rank above a layer's width is allowed,
    as in peft (the experiment refuses it). Returns the model, described at ``model.injected_adapters``."""
    if method not in ADAPTER_LAYERS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {tuple(ADAPTER_LAYERS)}")
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has adapters; build a fresh model (or unmerge and reuse the existing ones)")
    requested = resolve_targets(model, targets)
    chosen = _layers_matching(model, requested, targets)
    kept = kept_modules(model, modules_to_save or (), {name for name, _ in chosen})
    options = {"detach_norm": detach_norm} if method == "dora" else {}
    # every layer built before the first swap: bad settings (refused by the first layer) leave the model as it was
    layers = [ADAPTER_LAYERS[method](module, rank, alpha, dropout, rslora, **options) for _, module in chosen]
    model.requires_grad_(False)
    for (name, _), layer in zip(chosen, layers):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    for name in kept:
        model.get_submodule(name).requires_grad_(True)
    patterns = requested.pattern if isinstance(requested, re.Pattern) else tuple(requested)
    settings = AdapterSettings(rank, alpha, dropout, patterns, rslora, tuple(modules_to_save or ()) or None)
    model.injected_adapters = InjectedAdapters(method, settings, [n for n, _ in chosen], kept, detach_norm)
    return model


def kept_modules(model: nn.Module, extra: Sequence[str], targets: set[str]) -> list[str]:
    """Full names of the modules that stay trainable: the family's head (``targets.head_modules``), if
    any, and the ``extra`` modules, each of which must match; never a target nor a module holding one (training it
    in full would train the target's frozen weight too)."""
    candidates = [name for name, _ in model.named_modules() if name and name not in targets]
    unmatched = [suffix for suffix in extra if not any(map(name_matcher([suffix]), candidates))]
    if unmatched:
        raise ValueError(f"modules_to_save {unmatched!r} matched no module")
    matches = name_matcher(head_modules(model_type(model)) + tuple(extra))
    kept = [name for name in candidates if matches(name)]
    holding = next(((k, t) for k in kept for t in sorted(targets) if t.startswith(k + ".")), None)
    if holding:
        raise ValueError(f"modules_to_save: module {holding[0]} holds the adapter target {holding[1]}; keep a module "
                         "without targets, or leave that layer out of the targets")
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
