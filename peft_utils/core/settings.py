"""What an adapter is, one shape from the notebook's parameters cell to peft's ``adapter_config.json``: the update
``(alpha / rank) · B A dropout(x)`` (``rslora``: ``alpha / sqrt(rank)``) on the ``targets`` layers, and the
``modules_to_save`` trained in full beside it and the classification head. No torch here: the lab's configuration
and figures read it without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None  # a preset, module-name suffixes or a regex; None: the default
    rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None  # module-name suffixes; None: the head only
