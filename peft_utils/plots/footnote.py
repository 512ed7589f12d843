"""The provenance footnote (model, device, compute dtype, data sizes, seeds) and saving a figure with it.

Why on every figure: PNGs travel alone (slides, README), and a time or memory bar means little without the model and
hardware behind it. Where those differ between methods the footnote says so loudly: a comparison across dtypes or
machines is not like-for-like.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from peft_utils.methods import METHODS, QUANTIZED_METHODS, ordered_methods
from peft_utils.plots.style import DPI, method_label
from peft_utils.stats import numeric_column, optional_column, run_series


def distinct_texts(values: Iterable[object]) -> list[str]:
    """The distinct non-missing values as sorted strings."""
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def _provenance(runs: pd.DataFrame) -> list[str]:
    """Footnote lines: what was trained, where, in which dtype and on how much data; a NOTE where methods differ."""
    if runs.empty:
        return []
    parts, several_machines = [], False
    for field, differ in (("model", "models differ"), ("device", "devices differ"), ("hardware", "hardware differs")):
        column = optional_column(runs, field)
        values = distinct_texts(column)
        if not values:
            continue
        parts.append(f"{field}: {values[0]}" if len(values) == 1 else f"{differ}: {', '.join(values)}")
        several_machines |= field == "hardware" and len(values) > 1
        if column.isna().any():
            parts[-1] += f" (not recorded for {column.isna().sum()} of {len(runs)} runs)"
    dtype_part, dtype_warning = _compute_dtype_notes(runs)
    parts += [part for part in (dtype_part, _data_sizes_note(runs)) if part]
    epochs = distinct_texts(optional_column(runs, "epochs").dropna())
    if epochs:
        parts.append(f"epochs: {', '.join(epochs)}")
    seeds = numeric_column(runs, "seed").dropna()
    if seeds.nunique() > 1:
        parts.append(f"seeds: {', '.join(str(int(s)) for s in sorted(seeds.unique()))}")
    quantized = [method_label(m) for m in ordered_methods(optional_column(runs, "method")) if m in QUANTIZED_METHODS]
    if quantized:
        parts.append(f"{'/'.join(quantized)}: frozen base stored in 4-bit")
    lines = [" · ".join(parts)] if parts else []
    lines += [line for line in (_default_targets_note(runs), dtype_warning) if line]
    if several_machines:
        lines.append("NOTE: the runs ran on different hardware, so their times are not like-for-like.")
    return lines


def _default_targets_note(runs: pd.DataFrame) -> str | None:
    """What an adapter label without brackets means, said only beside a bracketed one: next to "LoRA (all-linear)"
    a bare "LoRA" would otherwise read as the same layers."""
    series = set(run_series(runs))
    bare = {s for s in series if s in METHODS and METHODS[s].adapter} if any(":" in s for s in series) else set()
    if not bare:
        return None
    names = "/".join(method_label(s) for s in ordered_methods(bare))
    return (f"{names} without brackets: adapters on the model's default layers, peft's default for its family "
            "(query and value on BERT-style models such as MiniLM, c_attn on GPT-2).")


def _compute_dtype_notes(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    """(``"compute dtype: X"`` when all runs share one, a warning naming each series' dtype when they differ)."""
    keys = run_series(runs)
    dtypes = {s: distinct_texts(str(v).removeprefix("torch.")
                                for v in optional_column(runs[keys == s], "compute_dtype").dropna())
              for s in ordered_methods(keys)}
    all_dtypes = distinct_texts(d for ds in dtypes.values() for d in ds)
    if len(all_dtypes) <= 1:
        return (f"compute dtype: {all_dtypes[0]}" if all_dtypes else None), None
    by_dtype: dict[str, list[str]] = {}
    for series, ds in dtypes.items():
        by_dtype.setdefault("/".join(ds) or "unknown", []).append(method_label(series))
    listing = "; ".join(f"{', '.join(ms)} = {d}" for d, ms in by_dtype.items())
    return None, f"NOTE: compute dtype differs across methods ({listing}), so time and memory are not like-for-like."


def dataset_name(runs: pd.DataFrame) -> str:
    """How a figure names the runs' data: SST-2, or the file or hub dataset the records name."""
    names = {str(name) for name in optional_column(runs, "dataset").dropna()} or {"sst2"}
    return "SST-2" if names == {"sst2"} else ", ".join(Path(name).name for name in sorted(names))


def _data_sizes_note(runs: pd.DataFrame) -> str | None:
    """``"SST-2 train 4,000 / dev 872 sentences"`` (a range where runs differ), or None when not recorded."""
    evals = numeric_column(runs, "n_eval").dropna()
    evals = numeric_column(runs, "eval_size").dropna() if evals.empty else evals
    scored_on = "dev" if distinct_texts(optional_column(runs, "eval_split")) in ([], ["dev"]) else "held-out"
    data = []
    for name, values in (("train", numeric_column(runs, "train_size").dropna()), (scored_on, evals)):
        if not values.empty:
            low, high = int(values.min()), int(values.max())
            data.append(f"{name} {high:,}" if low == high else f"{name} {low:,}-{high:,}")
    return f"{dataset_name(runs)} " + " / ".join(data) + " sentences" if data else None


def save_with_footnote(fig: Figure, path: Path, runs: pd.DataFrame, notes: Sequence[str] = ()) -> Path:
    """Write the notes and the provenance under the axes and save at :data:`DPI`.

    ``bbox_inches="tight"`` grows the image to hold the footnote, so it never overlaps tick labels. The image is
    written beside and renamed over: two processes drawing one shared folder never leave a half-written PNG.
    """
    chars = max(60, int(fig.get_figwidth() * 15))
    lines = [wrapped for line in [*notes, *_provenance(runs)] if line
             for wrapped in textwrap.wrap(line, chars, break_on_hyphens=False)]
    if lines:
        fig.text(0.005, -0.01, "\n".join(lines), ha="left", va="top", fontsize=8, color="#444444", linespacing=1.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(temporary, dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    os.replace(temporary, path)
    return path
