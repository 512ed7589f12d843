"""The one-page trade-off: accuracy against training time (marker area = shipped size) above a table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from peft_utils.formatting import format_bytes, format_count, format_seconds, format_share
from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.selection import comparison_runs, method_summary
from peft_utils.plots.style import (method_color, method_label, new_figure, place_labels, png_path, set_duration_axis,
                                    style_axes)
from peft_utils.store import Results


def plot_summary(results: Results, out_dir: str | Path) -> Path | None:
    """``summary.png``: the trade-off on one page: accuracy vs training time, marker area ~ shipped size.

    Why: no single method wins on every axis; the reader's question is "what do I pay for each point of
    accuracy". Up and to the left is better, and a small marker is cheap to store. The table under the plot
    gives the exact numbers behind the markers (plus peak memory and trainable parameters), so the figure
    stands alone on a slide.
    """
    runs = comparison_runs(results.runs)
    table = method_summary(runs)
    if table.empty:
        return None
    plotted = table[table["accuracy"].notna() & table["train_time_s"].notna()]
    if plotted.empty:
        return None
    fig = new_figure(11, 5.2 + 0.22 * (len(table) + 1))
    ax, table_ax = fig.subplots(2, 1, height_ratios=[4.6, 0.22 * (len(table) + 1)])
    # The title before the labels: the room it takes moves the axes, and the labels are placed in pixels.
    fig.suptitle("Method comparison: accuracy, time and size", fontsize=13, x=0.01, ha="left")
    _draw_tradeoff(fig, ax, plotted)
    # The table: exact numbers behind the markers (filled after the labels are placed, which runs the layout).
    _draw_summary_table(table_ax, table)
    if "full" not in table.index:
        rel_note = "Rel. time: relative to the slowest method (full fine-tuning not in this run set)."
    else:
        rel_note = "Rel. time: relative to full fine-tuning."
    return save_with_footnote(fig, png_path(out_dir, "summary.png"), runs, [rel_note])


def _draw_tradeoff(fig: Figure, ax, plotted: pd.DataFrame) -> None:
    """Accuracy (with 95% error bars) vs training time, marker area growing with the shipped size, labelled."""
    disk = plotted["disk_bytes"].to_numpy(dtype=float)
    shipped = disk[np.isfinite(disk) & (disk > 0)]
    sizes = _marker_area(disk, shipped)
    times = plotted["train_time_s"].to_numpy(dtype=float)
    accs = plotted["accuracy"].to_numpy(dtype=float) * 100
    lows = plotted["acc_low"].to_numpy(dtype=float) * 100
    highs = plotted["acc_high"].to_numpy(dtype=float) * 100
    for i, method in enumerate(plotted.index):
        color = method_color(method)
        if np.isfinite(lows[i]):
            ax.errorbar(times[i], accs[i], yerr=[[accs[i] - lows[i]], [highs[i] - accs[i]]], color=color,
                        elinewidth=1.0, capsize=4, zorder=2, alpha=0.6)
        ax.scatter(times[i], accs[i], s=sizes[i], color=color, alpha=0.75, edgecolor="white", linewidth=1.5,
                   zorder=3)
    if times.max() / max(times.min(), 1e-9) > 8:
        set_duration_axis(ax, times.min() / 1.8, times.max() * 2.2)
        ax.set_xlabel("training time (log scale)")
    else:
        pad = (times.max() - times.min()) or times.max() * 0.5
        ax.set_xlim(max(0, times.min() - 0.35 * pad), times.max() + 0.6 * pad)
        ax.set_xlabel("training time (s)")
    ylo = np.nanmin(np.where(np.isfinite(lows), lows, accs))
    yhi = np.nanmax(np.where(np.isfinite(highs), highs, accs))
    ypad = max(1.0, 0.35 * (yhi - ylo))
    ax.set_ylim(ylo - ypad, min(100.5, yhi + ypad))
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set_ylabel("dev accuracy")
    ax.set_title("Accuracy vs cost (up and left is better; marker area grows with shipped size)", fontsize=11,
                 loc="left")
    style_axes(ax, "both")
    if len(shipped) >= 2:
        _add_size_legend(ax, shipped)
    label_texts = [method_label(m) + (f" · {format_bytes(disk[i])}" if np.isfinite(disk[i]) and disk[i] > 0 else "")
                   for i, m in enumerate(plotted.index)]
    place_labels(fig, ax, times, accs, np.sqrt(sizes) / 2, label_texts, lows, highs)


def _marker_area(sizes: np.ndarray, shipped: np.ndarray) -> np.ndarray:
    """Scatter marker areas (pt²) for shipped ``sizes`` in bytes, log-scaled over the range of ``shipped``.

    Why log: shipped sizes span ~3 decades, a linear area would make adapters invisible dots. Unknown sizes get
    the smallest marker; with no known size at all every marker is the same.
    """
    if not len(shipped):
        return np.full(len(sizes), 250.0)
    lo, hi = np.log10(shipped.min()), np.log10(shipped.max())
    scaled = (np.log10(np.where(np.isfinite(sizes) & (sizes > 0), sizes, 10 ** lo)) - lo) / max(hi - lo, 1e-9)
    return 120 + 1400 * scaled


def _add_size_legend(ax, shipped: np.ndarray) -> None:
    """A legend of grey markers for the smallest and largest shipped sizes, so marker area can be read."""
    references = sorted({float(shipped.min()), float(shipped.max())})
    handles = [ax.scatter([], [], s=_marker_area(np.array([r]), shipped)[0], color="#BBBBBB", edgecolor="white")
               for r in references]
    ax.legend(handles, [format_bytes(r) for r in references], title="shipped size\n(marker area,\nlog-scaled)",
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, labelspacing=2.2, borderpad=1.0,
              handletextpad=1.6, fontsize=8.5, title_fontsize=8.5)


def _draw_summary_table(ax, table: pd.DataFrame) -> None:
    """The per-method numbers as a table: accuracy with interval, time, peak memory, parameters, artifact."""
    ax.axis("off")
    reference = table.loc["full", "train_time_s"] if "full" in table.index else table["train_time_s"].max()
    columns = ["Method", "Dev accuracy (95% CI)", "Train time", "Rel. time", "Peak memory", "Trainable params",
               "Shipped artifact"]
    cells = [_summary_row(method, row, reference) for method, row in table.iterrows()]
    # The first column grows with its longest label ("QLoRA (all-linear)"), the others share what is left.
    widths = np.array([max(0.08, 0.0085 * max(len(row[0]) for row in cells)), 0.19, 0.09, 0.08, 0.13, 0.16, 0.27])
    table_artist = ax.table(cellText=cells, colLabels=columns, colWidths=list(widths / widths.sum()),
                            loc="upper center", cellLoc="center")
    table_artist.auto_set_font_size(False)
    table_artist.set_fontsize(8.5)
    table_artist.scale(1, 1.45)
    for (r, c), cell in table_artist.get_celld().items():
        cell.set_edgecolor("#DDDDDD")
        if r == 0:
            cell.set_facecolor("#F0F0F0")
            cell.set_text_props(fontweight="bold")
        elif c == 0:
            cell.set_facecolor(method_color(table.index[r - 1]))
            cell.set_text_props(color="white", fontweight="bold")


def _summary_row(method: str, row: pd.Series, reference_time: float) -> list[str]:
    """One method's cells of the summary table."""
    ci = f" [{row['acc_low'] * 100:.1f}, {row['acc_high'] * 100:.1f}]" if np.isfinite(row["acc_low"]) else ""
    accuracy = f"{row['accuracy'] * 100:.1f}%{ci}" if np.isfinite(row["accuracy"]) else "n/a"
    known_time = np.isfinite(row["train_time_s"]) and reference_time
    relative = f"{row['train_time_s'] / reference_time:.0%}" if known_time else "n/a"
    trainable = format_count(row["trainable_params"])
    if np.isfinite(row["trainable_params"]) and np.isfinite(row["total_params"]) and row["total_params"] > 0:
        trainable += f" ({format_share(row['trainable_params'], row['total_params'])})"
    memory = format_bytes(row["peak_memory_bytes"])
    if row["memory_kind"]:
        memory += f" ({'GPU' if row['memory_kind'] == 'cuda' else row['memory_kind'].upper()})"
    shipped = format_bytes(row["disk_bytes"]) + (f" ({row['disk_kind']})" if row["disk_kind"] else "")
    return [method_label(method), accuracy, format_seconds(row["train_time_s"]), relative, memory, trainable,
            shipped]
