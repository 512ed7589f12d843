"""The plumbing of the notebook's teaching cells (LoRA, DoRA and NF4 by hand on the real MiniLM), so that each cell
shows only its idea. Tables are displayed, not printed: ``make run`` forwards printed output amid the runs' progress."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def minilm_weight() -> torch.Tensor:
    """Layer 0's query weight of all-MiniLM-L6-v2 (a LoRA target, 384 x 384) from the offline copy ``model="minilm"``
    uses, read with safetensors: milliseconds, no model built, no loading report."""
    from safetensors import safe_open

    from .models import resolve_model_source

    path = Path(resolve_model_source("minilm")) / "model.safetensors"
    with safe_open(str(path), framework="pt") as weights:
        return weights.get_tensor("encoder.layer.0.attention.self.query.weight").float()


def facts(values: Mapping[str, object]) -> str:
    """``{what: value}`` as a two-column Markdown table; a ``|`` would split its row, so it is refused."""
    if any("|" in f"{name}{value}" for name, value in values.items()):
        raise ValueError("a '|' would split a Markdown table row; write norm(...) or abs(...) instead")
    rows = "\n".join(f"| {name} | {value} |" for name, value in values.items())
    return f"| what | value |\n|---|---:|\n{rows}"
