"""The fine-tuning methods this project compares: the one place their names and their make-up are listed.

A method is fully described by two facts: which adapter it injects (none for full fine-tuning) and whether its
frozen base is stored in 4-bit. Everything else — what trains, what is shipped, how it is drawn — follows from them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """``adapter``: ``"lora"``, ``"dora"`` or ``None`` (full fine-tuning); ``quantized``: NF4 frozen base."""

    name: str
    label: str
    adapter: str | None
    quantized: bool

    @property
    def shipped(self) -> str:
        """What a user must store to use the result (the size column's meaning)."""
        if self.adapter is None:
            return "full checkpoint"
        return "4-bit base + adapter" if self.quantized else "adapter"


METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method("full", "Full FT", None, False),
        Method("lora", "LoRA", "lora", False),
        Method("dora", "DoRA", "dora", False),
        Method("qlora", "QLoRA", "lora", True),
        Method("qdora", "QDoRA", "dora", True),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
QUANTIZED_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.quantized)
ADAPTER_KINDS: tuple[str, ...] = ("lora", "dora")


def get_method(name: object) -> Method:
    """The method called ``name``, or a ValueError naming every known method (typos fail before any training)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}")
    return METHODS[name]


def ordered_methods(names: Iterable[object]) -> list[str]:
    """The distinct method names among ``names``: known ones in the package's order (full, LoRA, DoRA, QLoRA,
    QDoRA), then any others alphabetically.

    Why one order: tables, figures and paired tests list methods the same way, so a reader finds each method in the
    same place everywhere. Entries that are not strings (a missing method in a run table: None or NaN) are skipped.
    """
    present = {name for name in names if isinstance(name, str)}
    return [name for name in METHOD_NAMES if name in present] + sorted(present - set(METHOD_NAMES))


def targets_label(targets: object) -> str:
    """A target set as run ids and tables name it: ``""`` for the model's default (``None``), a preset by its name,
    module-name suffixes joined by ``+`` (``"query+value"``), a regex (recorded as a string that is no preset)
    as ``re:<pattern>``."""
    from .core.targets import MODEL_PRESETS

    if targets is None or targets != targets:  # None, or NaN where a run table has no targets
        return ""
    if isinstance(targets, str):
        return targets if targets in MODEL_PRESETS else f"re:{targets}"
    return "+".join(str(item) for item in targets)


def series_name(method: str, targets: object = None) -> str:
    """What tables, figures and paired tests key a run by: its method, and its target set where that is not the
    model's default (``"lora"``, ``"lora:all-linear"``); full fine-tuning has no targets."""
    label = targets_label(targets)
    return f"{method}:{label}" if label else method


def series_method(series: str) -> str:
    """The method of a :func:`series_name`."""
    return series.partition(":")[0]


__all__ = ["Method", "METHODS", "METHOD_NAMES", "QUANTIZED_METHODS", "ADAPTER_KINDS", "get_method", "ordered_methods",
           "targets_label", "series_name", "series_method"]
