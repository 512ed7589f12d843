"""The fine-tuning methods compared: which adapter each injects and whether its frozen base is 4-bit; what trains,
what is shipped and how it is drawn follow from that. A *series* is a method on a target set."""
from __future__ import annotations

import hashlib
import re
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


def get_method(name: object) -> Method:
    """The method called ``name``, or a ValueError naming every known method (typos fail before any training)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}")
    return METHODS[name]


def ordered_methods(names: Iterable[object]) -> list[str]:
    """The distinct method or series names among ``names`` (non-strings skipped) in the one order of every table and
    figure: known methods in the package's order, then others; within a method its default target set first."""
    def position(name: str) -> tuple[int, str, str]:
        method, _, targets = name.partition(":")
        known = method in METHODS
        return (METHOD_NAMES.index(method) if known else len(METHOD_NAMES), "" if known else method, targets)

    return sorted({name for name in names if isinstance(name, str)}, key=position)


def targets_label(targets: object) -> str:
    """A target set as run ids and tables name it: ``""`` for the default, a preset or regex as written, suffixes
    joined by ``+`` (``"query+value"``)."""
    if targets is None or targets != targets:  # None, or NaN where a run table has no targets
        return ""
    return targets if isinstance(targets, str) else "+".join(str(item) for item in targets)


def targets_slug(targets: object) -> str:
    """A target set in a file name: its :func:`targets_label`, or for a regex ``re-`` and 8 hex digits of its SHA-1."""
    label = targets_label(targets)
    return label if re.fullmatch(r"[A-Za-z0-9_.+-]*", label) else "re-" + hashlib.sha1(label.encode()).hexdigest()[:8]


def series_name(method: str, targets: object = None) -> str:
    """What results are keyed by: the method, and its target set where not the default (``"lora:all-linear"``)."""
    label = targets_label(targets)
    return f"{method}:{label}" if label else method


def series_method(series: str) -> str:
    """The method of a :func:`series_name`."""
    return series.partition(":")[0]


def series_on(method: str, series: str) -> str:
    """``method`` on the target set of ``series``: the reference a paired test compares a series with."""
    return method + series.removeprefix(series_method(series))


def series_label(series: str) -> str:
    """How tables and figures name a series: ``"LoRA"``, ``"LoRA (all-linear)"``; an unknown method as given."""
    method, _, targets = series.partition(":")
    label = METHODS[method].label if method in METHODS else method
    return f"{label} ({targets})" if targets else label
