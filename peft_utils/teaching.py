"""The plumbing of the notebook's teaching cells, so that each cell shows only its idea.

The teaching cells check the core against the papers on small tensors, on a CPU, in seconds and with nothing to
download: a formula written in plain torch against the core's layer, one real MiniLM weight quantised to NF4. What
they need besides torch and the core is here: reading one pretrained weight, counting what bitsandbytes stores,
drawing a histogram as PNG bytes and showing a few numbers as a Markdown table (displayed, not printed: ``make run``
forwards printed output to the terminal, where it would interleave with the runs' progress).
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch

MINILM_QUERY = "encoder.layer.0.attention.self.query.weight"  # a LoRA target of the cpu profile, (384, 384)


def minilm_weight(name: str = MINILM_QUERY) -> torch.Tensor:
    """One pretrained weight of all-MiniLM-L6-v2, read from the offline copy that ``model="minilm"`` uses.

    Why safetensors and not ``from_pretrained``: one tensor is read in milliseconds, without building the model
    or printing transformers' loading report.
    """
    from safetensors import safe_open

    from .models import resolve_model_source

    path = Path(resolve_model_source("minilm")) / "model.safetensors"
    with safe_open(str(path), framework="pt") as weights:
        if name not in weights.keys():
            raise KeyError(f"{name!r} is not a MiniLM weight; e.g. {MINILM_QUERY!r}")
        return weights.get_tensor(name).float()


def stored_bits_per_weight(packed: torch.Tensor, state) -> float:
    """Bits per weight of everything bitsandbytes keeps for a 4-bit tensor: the packed codes, the block scales
    (with double quantisation: 8-bit scales, their own float32 scales and offset) and the lookup tables.

    Why count the bytes: :func:`peft_utils.sizes.nf4_bits_per_weight` is the formula; this is what is stored,
    so the two can be compared (they differ by the tables, a constant per layer).
    """
    tensors = [packed, state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    stored = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return 8 * stored / torch.Size(state.shape).numel()


def error_histogram(weight: torch.Tensor, restored: torch.Tensor, title: str) -> bytes:
    """A PNG: the histogram of ``restored - weight``, with the weights' own spread beside it for scale.

    Drawn on a bare Agg figure (not pyplot), so the notebook's plotting backend is left alone, and returned as
    bytes, so ``IPython.display.Image`` shows it the same in JupyterLab, in papermill's output and in the report.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    error = (restored - weight).flatten().numpy()
    fig = Figure(figsize=(7.5, 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(error, bins=121, color="#4c72b0")
    ax.axvline(0, color="black", linewidth=0.8)
    spread = weight.std().item()
    ax.set_xlabel(f"NF4 error (dequantised - original); the weights' sd is {spread:.3f}")
    ax.set_ylabel("weights")
    ax.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return buffer.getvalue()


def facts(values: Mapping[str, object]) -> str:
    """``{what: value}`` as a two-column Markdown table, the way every teaching cell reports its numbers.

    A ``|`` in a name or value would split its row, so it is refused (write "norm(...)", not "||...||").
    """
    if any("|" in f"{name}{value}" for name, value in values.items()):
        raise ValueError("a '|' would split a Markdown table row; write norm(...) or abs(...) instead")
    rows = "\n".join(f"| {name} | {value} |" for name, value in values.items())
    return f"| what | value |\n|---|---:|\n{rows}"


__all__ = ["MINILM_QUERY", "minilm_weight", "stored_bits_per_weight", "error_histogram", "facts"]
