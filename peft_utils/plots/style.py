"""What every figure shares, so that "LoRA is orange" holds across every PNG: colours and markers of *series* (a
method on a target set, ``"lora"`` or ``"lora:all-linear"``), a figure's frame and axes."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from peft_utils.methods import ordered_methods, series_method
from peft_utils.stats import numeric_column, per_method_summary, run_series

# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies and in greyscale print.
METHOD_COLORS: dict[str, str] = {"full": "#0072B2", "lora": "#E69F00", "dora": "#009E73", "qlora": "#CC79A7",
                                 "qdora": "#D55E00"}
# Markers as a second cue where lines coincide (and for greyscale print).
METHOD_MARKERS: dict[str, str] = {"full": "o", "lora": "s", "dora": "D", "qlora": "^", "qdora": "v"}
# A method on a target set other than the model's default is drawn in its colour darkened by this fraction (LoRA:
# orange -> ochre), so the two series of one method read as one family and still differ in greyscale.
TARGET_SET_SHADE = 0.4
DPI = 150
WILSON_NOTE = "Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen)."


def method_color(series: str) -> str:
    """The fixed colour of a series: its method's, darkened by :data:`TARGET_SET_SHADE` on a non-default target set."""
    method = series_method(str(series))
    color = METHOD_COLORS[method]
    return color if method == str(series) else to_hex(np.multiply(to_rgb(color), 1 - TARGET_SET_SHADE))


def method_marker(series: str) -> str:
    return METHOD_MARKERS[series_method(str(series))]


def method_summary(runs: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """:func:`~peft_utils.stats.per_method_summary` in display order; with ``column``, the series that recorded it."""
    table = per_method_summary(runs, ordered_methods(run_series(runs)))
    return table if table.empty or column is None else table[table[column].notna()]


def new_figure(width: float, height: float, title: str, grid: str | None = "y", **panels) -> tuple[Figure, np.ndarray]:
    """A titled figure and its row of panels (``panels``: :meth:`~matplotlib.figure.Figure.subplots` arguments, one
    panel by default), each styled with :func:`style_axes` along ``grid``; outside pyplot, which would switch a
    notebook's backend and keep every figure."""
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    axes = fig.subplots(1, panels.pop("ncols", 1), squeeze=False, **panels)[0]
    for ax in axes if grid else ():
        style_axes(ax, grid)
    return fig, axes


def style_axes(ax, grid_axis: str = "y") -> None:
    """No top/right frame; a light grid behind the data along ``grid_axis``."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis=grid_axis, color="#DDDDDD", linewidth=0.8)
    ax.set_axisbelow(True)


def draw_seeds_and_mean(ax, series: str, row: pd.Series, x: float, seeds: tuple[Sequence[float], pd.Series]) -> None:
    """A series' seeds as faint dots at ``seeds`` (x, y) and, at ``x``, its mean dev accuracy (``row`` of
    :func:`method_summary`) as its marker with the 95% interval, in percent."""
    color, mean = method_color(series), row["accuracy"] * 100
    low, high = (100 * row[c] if np.isfinite(row[c]) else mean for c in ("acc_low", "acc_high"))
    ax.scatter(*seeds, s=22, color=color, alpha=0.55, edgecolor="none", zorder=3)
    ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt=method_marker(series), color=color, markersize=10,
                markeredgecolor="white", elinewidth=1.2, capsize=4, zorder=4)


def accuracy_legend(table: pd.DataFrame) -> list[Line2D]:
    """What :func:`draw_seeds_and_mean` drew: seed dots (with one run per series, its dot hides under the mean) and
    which 95% interval the bars are, from the summary's ``interval`` ("t over 3 seeds", "Wilson")."""
    names = sorted(k.replace("t over", "Student-t over").replace("Wilson", "Wilson (single run)")
                   for k in set(table["interval"]) - {"none"})
    interval = "mean and its 95% " + " or ".join(names) + " interval" if names else "mean (no interval)"
    seed = Line2D([], [], linestyle="none", marker="o", color="#888888", alpha=0.55, markersize=5, label="one seed")
    return [seed] * bool((table["n_runs"] > 1).any()) + [
        Line2D([], [], color="#888888", marker="|", markersize=8, label=textwrap.fill(interval, 26))]


def zoom_accuracy_axis(ax, runs: pd.DataFrame, table: pd.DataFrame, extra: Sequence[float] = ()) -> None:
    """A dev-accuracy y axis zoomed on every seed, mean and interval end of the series in ``table`` (and ``extra``,
    in percent): the differences of interest are fractions of a point."""
    seeds = numeric_column(runs[run_series(runs).isin(table.index)], "final_accuracy").to_numpy()
    values = np.concatenate([seeds * 100, table[["accuracy", "acc_low", "acc_high"]].to_numpy().ravel() * 100, extra])
    pad = max(0.6, 0.12 * (np.nanmax(values) - np.nanmin(values)))
    ax.set(ylim=(np.nanmin(values) - pad, min(100.0, np.nanmax(values) + pad)), ylabel="dev accuracy (zoomed axis)")
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
