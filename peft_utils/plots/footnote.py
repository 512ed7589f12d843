"""The provenance footnote (model, device, compute dtype, data, seeds) and saving a figure with it.

Why on every figure: PNGs travel alone (slides, README), and a time or memory bar means little without the model and
hardware behind it; where those differ between runs the footnote says so, as the comparison is not like-for-like.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from peft_utils.methods import METHODS, QUANTIZED_METHODS, ordered_methods, series_label
from peft_utils.plots.style import DPI
from peft_utils.stats import numeric_column, optional_column, run_series

# The recorded fields the footnote names, and for those that change what the costs mean, which costs a difference
# between the runs makes not like-for-like.
FIELDS = {"model": None, "device": None, "hardware": "times", "workers": "times", "compute_dtype": "times and memory",
          "epochs": None}  # workers: the runs that shared the device at once


def distinct_texts(values: Iterable[object]) -> list[str]:
    """The distinct non-missing values as sorted strings."""
    return sorted(set(map(str, pd.Series(list(values), dtype=object).dropna())))


def count_range(values: Iterable[float]) -> str:
    """``"4,000"`` when every value is 4,000, else ``"2,000-4,000"``: a count that may differ between runs."""
    low, high = min(values), max(values)
    return f"{high:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"


def _provenance(runs: pd.DataFrame) -> list[str]:
    """Footnote lines: what was trained, where, in which dtype and on how much data; a NOTE where the runs differ in
    what their costs depend on."""
    parts = [_field_part(runs, field) for field in FIELDS] + [_data_sizes_note(runs)]
    seeds = sorted(numeric_column(runs, "seed").dropna().unique())
    if len(seeds) > 1:
        parts.append("seeds: " + ", ".join(f"{seed:.0f}" for seed in seeds))
    quantized = [series_label(m) for m in ordered_methods(optional_column(runs, "method")) if m in QUANTIZED_METHODS]
    if quantized:
        parts.append(f"{'/'.join(quantized)}: frozen base stored in 4-bit")
    notes = [f"NOTE: the runs differ in {field.replace('_', ' ')}, so their {costs} are not like-for-like."
             for field, costs in FIELDS.items() if costs and len(_values(runs, field)) > 1]
    lines = [" · ".join(part for part in parts if part), _default_targets_note(runs), *notes]
    return [line for line in lines if line]


def _values(runs: pd.DataFrame, field: str) -> list[str]:
    """The distinct recorded values of ``field`` (a dtype without its ``torch.`` prefix)."""
    return sorted({text.removeprefix("torch.") for text in distinct_texts(optional_column(runs, field))})


def _field_part(runs: pd.DataFrame, field: str) -> str | None:
    """``"model: gpt2"`` (``"model: a / b"`` where runs differ), saying for how many runs it was not recorded."""
    values, missing = _values(runs, field), optional_column(runs, field).isna().sum()
    if not values:
        return None
    return f"{field.replace('_', ' ')}: {' / '.join(values)}" + (
        f" (not recorded for {missing} of {len(runs)} runs)" if missing else "")


def _default_targets_note(runs: pd.DataFrame) -> str | None:
    """What an adapter label without brackets means, said only beside a bracketed one: next to "LoRA (all-linear)"
    a bare "LoRA" would otherwise read as the same layers."""
    series = set(run_series(runs))
    bare = {s for s in series if s in METHODS and METHODS[s].adapter} if any(":" in s for s in series) else set()
    if not bare:
        return None
    names = "/".join(series_label(s) for s in ordered_methods(bare))
    return (f"{names} without brackets: adapters on the model's default layers, peft's default for its family "
            "(query and value on BERT-style models such as MiniLM, c_attn on GPT-2).")


def dataset_name(runs: pd.DataFrame) -> str:
    """How a figure names the runs' data: SST-2, or the file or hub dataset the records name."""
    names = {str(name) for name in optional_column(runs, "dataset").dropna()} or {"sst2"}
    return "SST-2" if names == {"sst2"} else ", ".join(Path(name).name for name in sorted(names))


def _data_sizes_note(runs: pd.DataFrame) -> str | None:
    """``"SST-2 train 4,000 / dev 872 sentences"`` (a range where runs differ), or None when not recorded."""
    scored_on = "dev" if distinct_texts(optional_column(runs, "eval_split")) in ([], ["dev"]) else "held-out"
    sizes = {"train": numeric_column(runs, "train_size").dropna(), scored_on: numeric_column(runs, "n_eval").dropna()}
    data = [f"{name} {count_range(values)}" for name, values in sizes.items() if not values.empty]
    return f"{dataset_name(runs)} " + " / ".join(data) + " sentences" if data else None


def save_with_footnote(fig: Figure, path: Path, runs: pd.DataFrame, notes: Sequence[str] = ()) -> Path:
    """Write the notes and the provenance under the axes, wrapped at the figure's width (``bbox_inches="tight"``
    grows the image to hold them), and save: see :func:`save_figure`."""
    fig.text(0.005, -0.01, "\n".join([*notes, *_provenance(runs)]), ha="left", va="top", fontsize=8,
             color="#444444", linespacing=1.4, wrap=True)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: Path) -> Path:
    """Save at :data:`DPI` beside ``path`` and rename over it: two processes drawing one folder never leave a
    half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(temporary, dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    os.replace(temporary, path)
    return path
