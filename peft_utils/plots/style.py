"""What every figure shares, so that "LoRA is orange" holds across every PNG: a series' colour and marker, the
frame, dev accuracy as seeds beside their mean, and the provenance footnote. Why a footnote: PNGs travel alone, and
a time or memory bar means little without the model and hardware behind it, or when they differ between runs."""
from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator, PercentFormatter

from peft_utils.methods import METHODS, QUANTIZED_METHODS, ordered_methods, series_label, series_method
from peft_utils.stats import numeric_column, optional_column, per_method_summary, run_series

# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies and in greyscale print.
METHOD_COLORS: dict[str, str] = {"full": "#0072B2", "lora": "#E69F00", "dora": "#009E73", "qlora": "#CC79A7",
                                 "qdora": "#D55E00"}
# Markers as a second cue where lines coincide (and for greyscale print).
METHOD_MARKERS: dict[str, str] = {"full": "o", "lora": "s", "dora": "D", "qlora": "^", "qdora": "v"}
# A method on a target set other than the model's default is drawn in its colour darkened by this fraction (LoRA:
# orange -> ochre), so the two series of one method read as one family and still differ in greyscale.
TARGET_SET_SHADE = 0.4
WILSON_NOTE = "Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen)."
# The recorded fields the footnote names, and which costs a difference between the runs makes not like-for-like.
FIELDS = {"model": None, "device": None, "hardware": "times", "workers": "times", "compute_dtype": "times and memory",
          "epochs": None}  # workers: the runs that shared the device at once


def method_color(series: str) -> str:
    """The fixed colour of a series: its method's, darkened by :data:`TARGET_SET_SHADE` on a non-default target set."""
    method = series_method(str(series))
    color = METHOD_COLORS[method]
    return color if method == str(series) else to_hex(np.multiply(to_rgb(color), 1 - TARGET_SET_SHADE))


def method_marker(series: str) -> str:
    return METHOD_MARKERS[series_method(str(series))]


def method_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`~peft_utils.stats.per_method_summary` of the series that recorded an accuracy, in display order."""
    table = per_method_summary(runs, ordered_methods(run_series(runs)))
    return table if table.empty else table[table["accuracy"].notna()]


def new_figure(width: float, height: float, title: str, grid: str | Sequence[str] = "y",
               **panels) -> tuple[Figure, np.ndarray]:
    """A titled figure and its row of panels (``panels``: :meth:`Figure.subplots` arguments), framed lightly with a
    grid along ``grid`` ("" for none; one per panel where they differ); outside pyplot, which would switch a
    notebook's backend and keep every figure."""
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    axes = fig.subplots(1, panels.pop("ncols", 1), squeeze=False, **panels)[0]
    for ax, axis in zip(axes, [grid] * len(axes) if isinstance(grid, str) else grid):
        if axis:
            ax.spines[["top", "right"]].set_visible(False)
            ax.grid(axis=axis, color="#DDDDDD", linewidth=0.8)
            ax.set_axisbelow(True)
    return fig, axes


def figure_legend(fig: Figure, handles: Sequence | None = None) -> None:
    """The legend outside the panels, top right, where it covers no data."""
    fig.legend(handles=handles, loc="outside right upper", fontsize=8.5, frameon=False)


def log_ticks(ax, values: Sequence[float], labels: Sequence[str], **tick_options) -> None:
    """A log x axis ticked at the ``values`` run (rates, train sizes) only, not at decades."""
    ax.set_xscale("log")
    ax.set_xticks(values, labels, **tick_options)
    ax.xaxis.set_minor_locator(NullLocator())


def draw_seeds_and_mean(ax, series: str, row: pd.Series, x: float, seeds: tuple[Sequence[float], pd.Series]) -> None:
    """A series' seeds as faint dots at ``seeds`` (x, y) and, at ``x``, its mean dev accuracy (``row`` of
    :func:`method_summary`) with the 95% interval, in percent."""
    color, mean = method_color(series), row["accuracy"] * 100
    low, high = (100 * row[c] if np.isfinite(row[c]) else mean for c in ("acc_low", "acc_high"))
    ax.scatter(*seeds, s=22, color=color, alpha=0.55, edgecolor="none", zorder=3)
    ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt=method_marker(series), color=color, markersize=10,
                markeredgecolor="white", elinewidth=1.2, capsize=4, zorder=4, label=series_label(series))


def accuracy_legend(table: pd.DataFrame) -> list[Line2D]:
    """What :func:`draw_seeds_and_mean` drew: seed dots (with one run per series, its dot hides under the mean) and
    which 95% interval the bars are, from the summary's ``interval`` ("t over 3 seeds", "Wilson")."""
    names = sorted(k.replace("t over", "Student-t over").replace("Wilson", "Wilson (single run)")
                   for k in set(table["interval"]) - {"none"})
    interval = "mean and its 95% " + " or ".join(names) + " interval" if names else "mean (no interval)"
    seed = Line2D([], [], linestyle="none", marker="o", color="#888888", alpha=0.55, markersize=5, label="one seed")
    return [seed] * bool((table["n_runs"] > 1).any()) + [
        Line2D([], [], color="#888888", marker="|", markersize=8, label=textwrap.fill(interval, 26))]


def zoom_accuracy_axis(ax, runs: pd.DataFrame, table: pd.DataFrame) -> None:
    """A dev-accuracy y axis zoomed on the seeds and intervals of ``table``: differences are fractions of a point."""
    seeds = numeric_column(runs[run_series(runs).isin(table.index)], "final_accuracy").to_numpy()
    values = np.concatenate([seeds, table[["accuracy", "acc_low", "acc_high"]].to_numpy().ravel()]) * 100
    pad = max(0.6, 0.12 * (np.nanmax(values) - np.nanmin(values)))
    ax.set(ylim=(np.nanmin(values) - pad, min(100.0, np.nanmax(values) + pad)), ylabel="dev accuracy (zoomed axis)")
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))


def distinct_texts(values: Iterable[object]) -> list[str]:
    """The distinct non-missing values as sorted strings."""
    return sorted(set(map(str, pd.Series(list(values), dtype=object).dropna())))


def count_range(values: Iterable[float]) -> str:
    """``"4,000"`` when every value is 4,000, ``"2,000-4,000"`` where runs differ, ``"?"`` when none is recorded."""
    values = pd.Series(list(values), dtype=float).dropna()
    if values.empty:
        return "?"
    low, high = values.min(), values.max()
    return f"{high:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"


def _provenance(runs: pd.DataFrame) -> list[str]:
    """What was trained, where, in which dtype, on how much data; a NOTE where runs differ in what costs depend on."""
    values = {field: sorted({text.removeprefix("torch.") for text in distinct_texts(optional_column(runs, field))})
              for field in FIELDS}
    parts = []
    for field, texts in values.items():  # "model: a / b" where runs differ
        missing = optional_column(runs, field).isna().sum()
        if texts:
            parts.append(f"{field.replace('_', ' ')}: {' / '.join(texts)}"
                         + (f" (not recorded for {missing} of {len(runs)} runs)" if missing else ""))
    parts.append(_data_sizes(runs))
    seeds = sorted(numeric_column(runs, "seed").dropna().unique())
    if len(seeds) > 1:
        parts.append("seeds: " + ", ".join(f"{seed:.0f}" for seed in seeds))
    quantized = [series_label(m) for m in ordered_methods(optional_column(runs, "method")) if m in QUANTIZED_METHODS]
    if quantized:
        parts.append(f"{'/'.join(quantized)}: frozen base stored in 4-bit")
    notes = [f"NOTE: the runs differ in {field.replace('_', ' ')}, so their {costs} are not like-for-like."
             for field, costs in FIELDS.items() if costs and len(values[field]) > 1]
    lines = [" · ".join(part for part in parts if part), _default_targets_note(runs), *notes]
    return [line for line in lines if line]


def _default_targets_note(runs: pd.DataFrame) -> str | None:
    """What an adapter label without brackets means, said only beside a bracketed one: next to "LoRA (all-linear)"
    a bare "LoRA" would otherwise read as the same layers."""
    series = ordered_methods(run_series(runs))
    bare = [s for s in series if s in METHODS and METHODS[s].adapter] if any(":" in s for s in series) else []
    if not bare:
        return None
    return (f"{'/'.join(map(series_label, bare))} without brackets: adapters on the model's default layers, peft's "
            "default for its family (query and value on BERT-style models such as MiniLM, c_attn on GPT-2).")


def dataset_name(runs: pd.DataFrame) -> str:
    """How a figure names the runs' data: SST-2, or the file or hub dataset the records name."""
    names = {str(name) for name in optional_column(runs, "dataset").dropna()} or {"sst2"}
    return "SST-2" if names == {"sst2"} else ", ".join(Path(name).name for name in sorted(names))


def _data_sizes(runs: pd.DataFrame) -> str | None:
    """``"SST-2 train 4,000 / dev 872 sentences"`` (a range where runs differ), or None when not recorded."""
    scored_on = "dev" if distinct_texts(optional_column(runs, "eval_split")) in ([], ["dev"]) else "held-out"
    sizes = {"train": numeric_column(runs, "train_size").dropna(), scored_on: numeric_column(runs, "n_eval").dropna()}
    data = [f"{name} {count_range(values)}" for name, values in sizes.items() if not values.empty]
    return f"{dataset_name(runs)} " + " / ".join(data) + " sentences" if data else None


def save_with_footnote(fig: Figure, path: Path, runs: pd.DataFrame, notes: Sequence[str] = ()) -> Path:
    """The notes and the provenance under the axes (``bbox_inches="tight"`` grows the image to hold them), saved
    beside ``path`` and renamed over it: two processes drawing one folder never leave a half-written PNG."""
    fig.text(0.005, -0.01, "\n".join([*notes, *_provenance(runs)]), ha="left", va="top", fontsize=8,
             color="#444444", linespacing=1.4, wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(temporary, dpi=150, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    os.replace(temporary, path)
    return path
