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
    """The distinct method or series names among ``names`` (:func:`series_name`): known methods in the package's
    order (full, LoRA, DoRA, QLoRA, QDoRA), then any others alphabetically; within a method its default target set
    first, then its other sets alphabetically.

    Why one order: tables, figures and paired tests list methods the same way, so a reader finds each method in the
    same place everywhere, and a method's target sets side by side. Entries that are not strings (a missing method
    in a run table: None or NaN) are skipped.
    """
    def position(name: str) -> tuple[int, str, str]:
        method, _, targets = name.partition(":")
        known = method in METHODS
        return (METHOD_NAMES.index(method) if known else len(METHOD_NAMES), "" if known else method, targets)

    return sorted({name for name in names if isinstance(name, str)}, key=position)


def targets_label(targets: object) -> str:
    """A target set as run ids and tables name it: ``""`` for the model's default (``None``), a preset or a regex
    (both recorded as one string) as written, module-name suffixes joined by ``+`` (``"query+value"``)."""
    if targets is None or targets != targets:  # None, or NaN where a run table has no targets
        return ""
    if isinstance(targets, str):
        return targets
    return "+".join(str(item) for item in targets)


def series_name(method: str, targets: object = None) -> str:
    """What tables, figures and paired tests key a run by: its method, and its target set where that is not the
    model's default (``"lora"``, ``"lora:all-linear"``); full fine-tuning has no targets."""
    label = targets_label(targets)
    return f"{method}:{label}" if label else method


def series_method(series: str) -> str:
    """The method of a :func:`series_name`."""
    return series.partition(":")[0]


def series_on(method: str, series: str) -> str:
    """``method`` on the target set of ``series`` (``series_on("lora", "dora:all-linear") == "lora:all-linear"``):
    the reference a paired test compares a series with."""
    return method + series.removeprefix(series_method(series))


def series_label(series: str) -> str:
    """How tables and figures name a series: its method's label, with the target set in brackets where that is not
    the model's default (``"LoRA"``, ``"LoRA (all-linear)"``); an unknown method as given."""
    method, _, targets = series.partition(":")
    label = METHODS[method].label if method in METHODS else method
    return f"{label} ({targets})" if targets else label


__all__ = ["Method", "METHODS", "METHOD_NAMES", "QUANTIZED_METHODS", "ADAPTER_KINDS", "get_method", "ordered_methods",
           "targets_label", "series_name", "series_method", "series_on", "series_label"]
