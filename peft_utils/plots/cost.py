"""What the methods cost: training time, shipped size, memory and trainable parameters."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from peft_utils.formatting import format_bytes, format_count, format_seconds, format_share
from peft_utils.methods import QUANTIZED_METHODS, series_method
from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.selection import comparison_runs, method_summary, methods_with
from peft_utils.plots.style import (
    MEMORY_KIND_TEXT,
    REFERENCE_GREY,
    label_bars,
    method_color,
    method_label,
    new_figure,
    png_path,
    set_method_ticks,
    style_axes,
    tick_formatter,
)
from peft_utils.store import Results


def plot_time(results: Results, out_dir: str | Path) -> Path | None:
    """``time.png``: training time relative to full fine-tuning (left) and in absolute seconds (right).

    Why both: the relative view answers "how much faster is the PEFT method", which is what transfers to
    other hardware; the absolute one keeps the scale honest (a 50% saving of 20 seconds matters less than one
    of 2 hours). If full fine-tuning was not run, the slowest method is the 100% reference and the title says
    so.
    """
    runs = comparison_runs(results.runs)
    table = methods_with(runs, "train_time_s")
    if table.empty:
        return None
    methods = list(table.index)
    seconds = table["train_time_s"].to_numpy()
    if "full" in table.index:
        reference, ref_text = float(table.loc["full", "train_time_s"]), "full fine-tuning = 100%"
    else:
        slowest = table["train_time_s"].idxmax()
        reference = float(table.loc[slowest, "train_time_s"])
        ref_text = f"slowest method, {method_label(slowest)} = 100%;\nfull fine-tuning not in this run set"
    relative = seconds / reference * 100
    colors = [method_color(m) for m in methods]
    fig = new_figure(max(9.0, 2.2 * len(methods) + 3), 4.8)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(methods))
    bars = left.bar(x, relative, width=0.62, color=colors, zorder=2)
    label_bars(left, bars, [f"{r:.0f}%" for r in relative])
    left.axhline(100, color="#555555", linestyle="--", linewidth=1, zorder=1)
    left.set_ylim(0, max(relative.max(), 100) * 1.15)
    left.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    left.set_ylabel("training time (% of reference)")
    left.set_title(f"Relative training time\n({ref_text})", fontsize=10, loc="left")
    bars = right.bar(x, seconds, width=0.62, color=colors, zorder=2)
    throughput = table["samples_per_s"].to_numpy()
    labels = [format_seconds(s) + (f"\n{t:,.0f} samples/s" if np.isfinite(t) else "")
              for s, t in zip(seconds, throughput)]
    label_bars(right, bars, labels, fontsize=8.5)
    right.set_ylim(0, seconds.max() * 1.25)
    right.set_ylabel("training time (s)")
    right.set_title("Absolute training time\n(all epochs, evaluation excluded)", fontsize=10, loc="left")
    for ax in (left, right):
        set_method_ticks(ax, methods)
        style_axes(ax)
    fig.suptitle("Training time per method", fontsize=13, x=0.01, ha="left")
    notes = ["Mean over seeds where a method has several runs."] if (table["n_runs"] > 1).any() else []
    return save_with_footnote(fig, png_path(out_dir, "time.png"), runs, notes)


def plot_model_size(results: Results, out_dir: str | Path) -> Path | None:
    """``model_size.png``: what each method costs to store, next to the base model in fp32 and in 4-bit.

    Left (log scale, because sizes span three orders of magnitude): the fp32 base model, the 4-bit base
    (when a QLoRA/QDoRA run exists) and the artifact each method must ship (a full checkpoint, an adapter, or
    a 4-bit base plus adapter). Right (linear): the in-memory footprint of the model during training, split
    into 4-bit weights, quantisation state, frozen weights and trainable weights, which is where the savings
    of LoRA (few trainable weights) and of 4-bit (small frozen weights) come from.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs)
    if table.empty or (table["disk_bytes"].isna().all() and table["fp32_bytes"].isna().all()):
        return None
    bars = _storage_bars(table)
    parts = ["quantized_bytes", "quant_state_bytes", "frozen_bytes", "trainable_bytes"]
    has_parts = table[parts].notna().any(axis=1) & (table[parts].fillna(0).sum(axis=1) > 0)
    fig = new_figure(13 if has_parts.any() else 8.5, max(3.6, 0.55 * max(len(bars), has_parts.sum()) + 1.8))
    axes = fig.subplots(1, 2, width_ratios=[1.15, 1]) if has_parts.any() else [fig.add_subplot()]
    _draw_storage_bars(axes[0], bars)
    if has_parts.any():
        _draw_memory_footprint(axes[1], table.loc[[m for m in table.index if has_parts[m]]])
    fig.suptitle("Model size", fontsize=13, x=0.01, ha="left")
    notes = ["Sizes exclude optimiser state and activations (see memory.png for the measured peak)."]
    return save_with_footnote(fig, png_path(out_dir, "model_size.png"), runs, notes)


class _StorageBar(NamedTuple):
    label: str
    n_bytes: float
    color: str
    hatch: str


def _storage_bars(table: pd.DataFrame) -> list[_StorageBar]:
    """The bars of the storage panel: base model in fp32, base with 4-bit weights, then each method's artifact."""
    bars = []
    if "full" in table.index and np.isfinite(table.loc["full", "fp32_bytes"]):
        fp32 = table.loc["full", "fp32_bytes"]
    else:  # an adapter run's fp32 size includes its adapter: take the trainable weights out (4 bytes each)
        fp32 = (table["fp32_bytes"] - 4 * table["trainable_params"].fillna(0)).min()
    if np.isfinite(fp32):
        bars.append(_StorageBar("Base model in fp32", float(fp32), REFERENCE_GREY, ""))
    quantized = [s for s in table.index if series_method(s) in QUANTIZED_METHODS or table.loc[s, "quantized_bytes"] > 0]
    if quantized:
        q = table.loc[quantized[0]]
        base4 = np.nansum([q["quantized_bytes"], q["quant_state_bytes"], q["frozen_bytes"]])
        if not base4 > 0 and np.isfinite(q["total_bytes"]):
            base4 = q["total_bytes"] - np.nan_to_num(q["trainable_bytes"])
        if base4 > 0:
            bars.append(_StorageBar("Base model with 4-bit weights", float(base4), REFERENCE_GREY, "//"))
    for method in table.index:
        value = table.loc[method, "disk_bytes"]
        if np.isfinite(value):
            kind = table.loc[method, "disk_kind"] or "saved file"
            bars.append(_StorageBar(f"{method_label(method)}: {kind}", float(value), method_color(method), ""))
    return bars


def _draw_storage_bars(ax, bars: list[_StorageBar]) -> None:
    """Horizontal bars of stored sizes on a log axis, each labelled with its size."""
    y = np.arange(len(bars))[::-1]
    values = np.array([bar.n_bytes for bar in bars])
    artists = ax.barh(y, values, color=[bar.color for bar in bars], hatch=[bar.hatch for bar in bars],
                      edgecolor="white", height=0.62, zorder=2)
    ax.set_xscale("log")
    ax.set_xlim(values.min() / 3, values.max() * 12)  # room on the right for the labels
    ax.set_yticks(y, [bar.label for bar in bars])
    label_bars(ax, artists, [format_bytes(v) for v in values])
    ax.xaxis.set_major_formatter(tick_formatter(format_bytes))
    ax.set_xlabel("size (log scale; 1 MB = 10^6 bytes)")
    ax.set_title("Storage: base model vs what each method ships", fontsize=10, loc="left")
    style_axes(ax, "x")


def _draw_memory_footprint(ax, table: pd.DataFrame) -> None:
    """Stacked bars of each method's model in memory: 4-bit weights, quantisation state, frozen, trainable."""
    methods = list(table.index)
    part_style = {
        "quantized_bytes": ("4-bit weights", "#BDBDBD", "//"),
        "quant_state_bytes": ("quantisation state", "#7A7A7A", ""),
        "frozen_bytes": ("frozen weights", "#D9D9D9", ""),
    }
    ym = np.arange(len(methods))[::-1]
    left_edge = np.zeros(len(methods))
    for part, (name, colour, hatch) in part_style.items():
        vals = table[part].fillna(0).to_numpy()
        if vals.sum() > 0:
            ax.barh(ym, vals, left=left_edge, color=colour, hatch=hatch, edgecolor="white", height=0.62,
                    label=name, zorder=2)
            left_edge += vals
    trainable = table["trainable_bytes"].fillna(0).to_numpy()
    ax.barh(ym, trainable, left=left_edge, color=[method_color(m) for m in methods], edgecolor="white",
            height=0.62, zorder=2)
    left_edge += trainable
    for yi, total, tb in zip(ym, left_edge, trainable):
        share = f" ({format_share(tb, total)} trainable)" if total > 0 else ""
        ax.text(total, yi, f" {format_bytes(total)}{share}", va="center", fontsize=8.5)
    ax.set_xlim(0, left_edge.max() * 1.65)  # room on the right for the labels
    ax.set_yticks(ym, [method_label(m) for m in methods])
    # Ticks in one unit named on the axis: "0 100 MB 200 MB ..." on every tick is unreadable.
    unit, factor = ("GB", 1e9) if left_edge.max() >= 2e9 else ("MB", 1e6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / factor:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel(f"size in memory ({unit}, linear scale)")
    ax.set_title("Model in memory during training", fontsize=10, loc="left")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="#FFFFFF", edgecolor="#333333"))
    labels.append("trainable weights (method colour)")
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=8,
              frameon=False)
    style_axes(ax, "x")


def plot_memory(results: Results, out_dir: str | Path) -> Path | None:
    """``memory.png``: peak memory per method during training.

    Why the kind on the axis: on a GPU the number is the tensor memory PyTorch allocated (weights, gradients,
    optimiser state, activations); on a CPU-only run it is the whole process RSS, which also counts Python,
    libraries and the data set. The two are not comparable, so mixed kinds are hatched and called out.
    """
    runs = comparison_runs(results.runs)
    table = methods_with(runs, "peak_memory_bytes")
    if table.empty:
        return None
    methods = list(table.index)
    values = table["peak_memory_bytes"].to_numpy()
    kinds = [k or "unknown" for k in table["memory_kind"]]
    distinct = sorted(set(kinds))
    fig = new_figure(max(6.5, 1.35 * len(methods) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    mixed = len(distinct) > 1
    hatches = ["xx" if (mixed and k != "cuda") else "" for k in kinds]
    bars = ax.bar(x, values, width=0.62, color=[method_color(m) for m in methods], hatch=hatches,
                  edgecolor="white", zorder=2)
    label_bars(ax, bars, [format_bytes(v) for v in values])
    ax.set_ylim(0, values.max() * 1.15)
    ax.yaxis.set_major_formatter(tick_formatter(format_bytes))
    if mixed:
        ax.set_ylabel("peak memory (mixed kinds, see note)")
    else:
        ax.set_ylabel(MEMORY_KIND_TEXT.get(distinct[0], f"peak memory ({distinct[0]})"))
    set_method_ticks(ax, methods)
    ax.set_title("Peak memory during training", fontsize=13, loc="left")
    style_axes(ax)
    notes = []
    if mixed:
        listing = "; ".join(f"{method_label(m)}: {MEMORY_KIND_TEXT.get(k, k)}" for m, k in zip(methods, kinds))
        notes.append(f"NOTE: memory kinds differ (hatched bars are not GPU allocations): {listing}.")
    elif distinct[0] == "rss":
        notes.append("Process RSS includes the Python runtime, libraries and data, not only the model.")
    if (table["n_runs"] > 1).any():
        notes.append("Maximum over seeds where a method has several runs.")
    return save_with_footnote(fig, png_path(out_dir, "memory.png"), runs, notes)


def plot_trainable_params(results: Results, out_dir: str | Path) -> Path | None:
    """``trainable_params.png``: trainable parameters per method on a log scale, with the share of the model.

    Why log scale: full fine-tuning trains ~100% and LoRA well under 1%; on a linear axis the PEFT bars are
    invisible. The percentage on each bar is the number people quote.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs)
    if table.empty or not (table["trainable_params"] > 0).any():
        return None
    table = table[table["trainable_params"] > 0]
    methods = list(table.index)
    values = table["trainable_params"].to_numpy(dtype=float)
    totals = table["total_params"].to_numpy(dtype=float)
    fig = new_figure(max(6.5, 1.35 * len(methods) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    bars = ax.bar(x, values, width=0.62, color=[method_color(m) for m in methods], zorder=2)
    labels = [format_count(v) + (f"\n({format_share(v, t)} of {format_count(t)})" if np.isfinite(t) and t > 0 else "")
              for v, t in zip(values, totals)]
    label_bars(ax, bars, labels, fontsize=8.5)
    ax.set_yscale("log")
    ax.set_ylim(values.min() / 3, values.max() * 6)
    ax.yaxis.set_major_formatter(tick_formatter(format_count))
    ax.set_ylabel("trainable parameters (log scale)")
    set_method_ticks(ax, methods)
    ax.set_title("Trainable parameters per method", fontsize=13, loc="left")
    style_axes(ax)
    return save_with_footnote(fig, png_path(out_dir, "trainable_params.png"), runs)
