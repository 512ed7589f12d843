"""Series colours, markers and labels, the runs a figure draws, and the axis plumbing every figure shares.

Why one place: "LoRA is orange" and the look of an axis must hold across every PNG. A figure draws *series*
(:func:`~peft_utils.methods.series_name`: a method on a target set, ``"lora"`` or ``"lora:all-linear"``); a plain
method name is the series of that method on the model's default targets.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from peft_utils.formatting import duration_ticks, format_duration_tick
from peft_utils.methods import METHOD_NAMES, ordered_methods, series_label, series_method
from peft_utils.stats import per_method_summary, run_series, runs_in_group
from peft_utils.store import COMPARISON_GROUP

METHOD_ORDER: tuple[str, ...] = METHOD_NAMES
# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies and in greyscale print.
METHOD_COLORS: dict[str, str] = {"full": "#0072B2", "lora": "#E69F00", "dora": "#009E73", "qlora": "#CC79A7",
                                 "qdora": "#D55E00"}
# Markers as a second cue where lines coincide (and for greyscale print).
METHOD_MARKERS: dict[str, str] = {"full": "o", "lora": "s", "dora": "D", "qlora": "^", "qdora": "v"}
_EXTRA_COLORS = ("#56B4E9", "#8C6D31", "#7F7F7F", "#000000")  # for methods outside METHOD_COLORS
# A method on a target set other than the model's default is drawn in its colour darkened by this fraction (LoRA:
# orange -> ochre), so the two series of one method read as one family and still differ in greyscale.
TARGET_SET_SHADE = 0.4
DPI = 150
MEMORY_KIND_TEXT = {"cuda": "peak GPU memory allocated (torch.cuda)", "rss": "peak process RSS (CPU run)"}


def method_label(series: str) -> str:
    """Display name of a series: ``"qlora"`` -> ``"QLoRA"``, ``"lora:all-linear"`` -> ``"LoRA (all-linear)"``."""
    return series_label(str(series))


def method_color(series: str) -> str:
    """The fixed colour of a series: its method's, darkened by :data:`TARGET_SET_SHADE` on a non-default target
    set; methods outside :data:`METHOD_COLORS` get a stable colour by name."""
    method = series_method(str(series))
    color = METHOD_COLORS.get(method) or _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]
    return color if method == str(series) else to_hex(np.multiply(to_rgb(color), 1 - TARGET_SET_SHADE))


def method_marker(series: str) -> str:
    return METHOD_MARKERS.get(series_method(str(series)), "o")


def comparison_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the method comparison: sweep and tuning runs (scored elsewhere) get their own figures."""
    return runs_in_group(runs, COMPARISON_GROUP)


def rows_of_runs(frame: pd.DataFrame, run_ids: Iterable[str]) -> pd.DataFrame:
    """The step or eval rows of ``frame`` that belong to the runs ``run_ids``."""
    if frame.empty or "run_id" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["run_id"].isin(set(run_ids))]


def method_summary(runs: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """:func:`~peft_utils.stats.per_method_summary` in display order; with ``column``, only the series that
    recorded it (a figure draws only numbers that exist)."""
    table = per_method_summary(runs, ordered_methods(run_series(runs)))
    return table if table.empty or column is None else table[table[column].notna()]


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, outside pyplot: importing the package must not switch a notebook's backend,
    and pyplot's registry would keep every figure alive."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax, grid_axis: str = "y") -> None:
    """No top/right frame; a light grid behind the data along ``grid_axis`` (``""`` for none)."""
    ax.spines[["top", "right"]].set_visible(False)
    if grid_axis:
        ax.grid(axis=grid_axis, color="#DDDDDD", linewidth=0.8)
        ax.set_axisbelow(True)


def tick_formatter(format_number) -> FuncFormatter:
    """Tick labels from ``format_bytes`` / ``format_count`` in their exact tick mode, and "0" at zero."""
    return FuncFormatter(lambda value, _: "0" if value == 0 else format_number(value, tick=True))


def set_time_axis(ax, low: float, high: float, log: bool) -> None:
    """An x axis of seconds from ``low`` to ``high``. On a log scale, clock ticks (30 s, 1 min, 1 h) instead of
    "3x10^1"; on a linear one, round numbers of one unit ("10 min", not "11.7 min")."""
    ax.set_xscale("log" if log else "linear")
    ax.set_xlim(low, high)
    ax.xaxis.set_minor_locator(NullLocator())
    if log:
        ax.set_xticks(duration_ticks(low, high))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_duration_tick(v)))
        return
    unit, name = (3600, "h") if high >= 7200 else (60, "min") if high >= 120 else (1, "s")
    ticks = MaxNLocator(nbins=5, steps=[1, 2, 5, 10]).tick_values(low / unit, high / unit) * unit
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g} {name}"))


def interval_legend(kinds: set[str]) -> str:
    """Which 95% interval the error bars are, from the summary's ``interval`` column."""
    t_kinds = sorted(k.removeprefix("t over ") for k in kinds if k.startswith("t over"))
    parts = [f"Student-t over {'/'.join(t_kinds)}"] if t_kinds else []
    if "Wilson" in kinds:
        parts.append("Wilson (single run)")
    return "95% " + " or ".join(parts) + " interval" if parts else "no interval"


def png_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / name
