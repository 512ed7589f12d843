"""Series names, colours and markers, and the figure and axis plumbing every figure shares.

Why one place: "LoRA is orange" and the look of an axis must hold across every PNG, whichever module drew it. A
figure draws *series* (:func:`~peft_utils.methods.series_name`: a method on a target set, ``"lora"`` or
``"lora:all-linear"``); every helper here takes a series name, and a plain method name is the series of that method
on the model's default targets.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator
from matplotlib.transforms import Bbox

from peft_utils.formatting import duration_ticks, format_duration_tick
from peft_utils.methods import METHOD_NAMES, series_label, series_method
from peft_utils.stats import optional_column

METHOD_ORDER: tuple[str, ...] = METHOD_NAMES
# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies and in greyscale print.
METHOD_COLORS: dict[str, str] = {
    "full": "#0072B2",  # blue
    "lora": "#E69F00",  # orange
    "dora": "#009E73",  # green
    "qlora": "#CC79A7",  # purple-pink
    "qdora": "#D55E00",  # vermillion
}
# Markers as a second cue where lines can coincide (and for greyscale print).
METHOD_MARKERS: dict[str, str] = {"full": "o", "lora": "s", "dora": "D", "qlora": "^", "qdora": "v"}
_EXTRA_COLORS = ("#56B4E9", "#8C6D31", "#7F7F7F", "#000000")  # for methods outside METHOD_COLORS
# Target sets: a method on the model's default targets is drawn in its colour above; on any other target set
# (``--targets all-linear``) in the same colour darkened by this fraction (LoRA: orange -> ochre brown), with the
# method's marker. Why a shade of the same hue: the two series of one method read as one family in every figure
# (bars, dots, lines, the summary table's white-on-colour cells, which stay legible on the darker shade), and the
# lightness step survives greyscale print. Every non-default set of a method shares the shade; their labels
# ("LoRA (all-linear)") tell them apart.
TARGET_SET_SHADE = 0.4
REFERENCE_GREY = "#8A8A8A"
DPI = 150
def chance_accuracy(runs: pd.DataFrame) -> float:
    """1 / K for the runs' K classes (their records' ``labels``; SST-2's two where none is recorded): a guess's
    accuracy on balanced classes."""
    labels = [value for value in optional_column(runs, "labels") if isinstance(value, (list, tuple))]
    return 1 / max(len(labels[0]) if labels else 2, 2)


def method_label(series: str) -> str:
    """Display name of a series (:func:`~peft_utils.methods.series_label`: ``"qlora"`` -> ``"QLoRA"``,
    ``"lora:all-linear"`` -> ``"LoRA (all-linear)"``); unknown methods are shown as given."""
    return series_label(str(series))


def method_color(series: str) -> str:
    """The fixed colour of a series: its method's (:data:`METHOD_COLORS`; methods outside it get a stable colour by
    name), darkened by :data:`TARGET_SET_SHADE` on a target set other than the model's default."""
    series = str(series)
    method = series_method(series)
    color = METHOD_COLORS.get(method) or _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]
    return color if method == series else to_hex(np.multiply(to_rgb(color), 1 - TARGET_SET_SHADE))


def method_marker(series: str) -> str:
    """The marker of a series: its method's (:data:`METHOD_MARKERS`), a circle for methods outside it."""
    return METHOD_MARKERS.get(series_method(str(series)), "o")


def distinct_texts(values: Iterable[object]) -> list[str]:
    """The distinct non-missing values as sorted strings."""
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, outside pyplot (the package docstring says why)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / name


def style_axes(ax, grid_axis: str = "y") -> None:
    """No top/right frame; a light grid behind the data along ``grid_axis`` (``""`` for none)."""
    ax.spines[["top", "right"]].set_visible(False)
    if grid_axis:
        ax.grid(axis=grid_axis, color="#DDDDDD", linewidth=0.8)
        ax.set_axisbelow(True)


def label_bars(ax, bars, labels: Sequence[str], fontsize: float = 9) -> None:
    """Write ``labels`` just past the end of each bar."""
    ax.bar_label(bars, labels=list(labels), padding=3, fontsize=fontsize)


def set_method_ticks(ax, series: Sequence[str]) -> None:
    """One x tick per bar, labelled with the series' display name; a target set goes on a second line, under the
    method's name, so that neighbouring labels do not run into each other."""
    ax.set_xticks(range(len(series)), [method_label(s).replace(" (", "\n(", 1) for s in series])


def tick_formatter(format_number) -> FuncFormatter:
    """Tick labels from ``format_bytes`` / ``format_count`` in their exact tick mode, and "0" at zero."""
    def tick(value: float, _pos: object) -> str:
        return "0" if value == 0 else format_number(value, tick=True)
    return FuncFormatter(tick)


def set_duration_axis(ax, low: float, high: float) -> None:
    """A log-scale x axis from ``low`` to ``high`` seconds with clock-friendly ticks (30 s, 1 min, 10 min, 1 h).

    Why: log-scale defaults would give "8.3 min"-style decades beside matplotlib's own "3x10^1" minor labels.
    """
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_xticks(duration_ticks(low, high), minor=False)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_duration_tick(v)))
    ax.xaxis.set_minor_locator(NullLocator())


MEMORY_KIND_TEXT = {
    "cuda": "peak GPU memory allocated (torch.cuda)",
    "rss": "peak process RSS (CPU run)",
}


def interval_legend(kinds: set[str]) -> str:
    """Which 95% interval the error bars are, from the summary's ``interval`` column."""
    t_kinds = sorted(k.removeprefix("t over ") for k in kinds if k.startswith("t over"))
    parts = [f"Student-t over {'/'.join(t_kinds)}"] if t_kinds else []
    if "Wilson" in kinds:
        parts.append("Wilson (single run)")
    return "95% " + " or ".join(parts) + " interval" if parts else "no interval"


def _overlap_area(a: Bbox, b: Bbox) -> float:
    """Area shared by two boxes (0 when they do not overlap)."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


# What covering each thing costs, per unit of area covered: text on text is unreadable, a label cut by the axes'
# edge loses letters, a covered marker hides a result, a line or error bar stays readable on both sides of a label.
_COVER_COST = {"label": 20.0, "outside": 10.0, "marker": 5.0, "line": 2.0, "bar": 1.0}


def place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, radii_pt: np.ndarray, texts: Sequence[str],
                  lows: np.ndarray, highs: np.ndarray,
                  segments: Sequence[tuple[float, float, float, float]] = ()) -> None:
    """Label scatter points without covering markers, error bars, the axis-aligned line ``segments`` ((x0, y0, x1,
    y1) in data coordinates: a Pareto staircase) or each other; a point with an empty text is an obstacle only.

    Why not fixed offsets: methods often sit close together (LoRA and DoRA differ by a few percent in time
    and a fraction of a point in accuracy), and fixed offsets then print labels on top of one another. Each
    label tries spots around its marker, then farther out with a leader line, and keeps the first that covers
    nothing already drawn (or, failing that, the one whose cover costs least, :data:`_COVER_COST`). Labels are
    kept out of the layout engine so placing them does not move the axes they were placed in; so the layout
    must be final (legend and titles added) before this is called.
    """
    fig.canvas.draw()  # run the layout: data -> pixel transforms are final from here on
    renderer = fig.canvas.get_renderer()
    obstacles = _obstacles(ax, xs, ys, radii_pt, lows, highs, segments, fig.dpi / 72.0)
    axes_box = ax.get_window_extent(renderer)
    for i in np.argsort(-radii_pt):  # big markers first: they have the fewest free spots
        if not texts[i]:
            continue
        best, best_cost = None, math.inf
        for dx, dy, ha, va in _label_spots(radii_pt[i]):
            # A label away from its marker gets a thin leader line to it, so it cannot be read as a neighbour's.
            leader = {"arrowstyle": "-", "color": "#888888", "linewidth": 0.7, "shrinkA": 0,
                      "shrinkB": radii_pt[i] + 1} if math.hypot(dx, dy) > radii_pt[i] + 5 else None
            label = ax.annotate(texts[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha,
                                va=va, fontsize=9, color="#222222", zorder=5, arrowprops=leader,
                                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.8})
            label.set_in_layout(False)
            box = label.get_window_extent(renderer).expanded(1.05, 1.15)
            cost = sum(weight * _overlap_area(box, o) for o, weight in obstacles)
            cost += _COVER_COST["outside"] * (box.width * box.height - _overlap_area(box, axes_box))
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (label, box), cost
            else:
                label.remove()
            if cost == 0:
                break
        obstacles.append((best[1], _COVER_COST["label"]))


def _obstacles(ax, xs: np.ndarray, ys: np.ndarray, radii_pt: np.ndarray, lows: np.ndarray, highs: np.ndarray,
               segments: Sequence[tuple[float, float, float, float]], pt: float) -> list[tuple[Bbox, float]]:
    """What a label should not cover, in pixels, each with its :data:`_COVER_COST`: the markers, their error bars
    (with caps) and the line segments (widened to the width they are drawn with)."""
    to_px = ax.transData.transform
    obstacles = []
    for x, y, r, lo, hi in zip(xs, ys, radii_pt, lows, highs):
        cx, cy = to_px((x, y))
        obstacles.append((Bbox.from_extents(cx - r * pt, cy - r * pt, cx + r * pt, cy + r * pt),
                          _COVER_COST["marker"]))
        if np.isfinite(lo) and np.isfinite(hi):
            (_, y0), (_, y1) = to_px((x, lo)), to_px((x, hi))
            obstacles.append((Bbox.from_extents(cx - 6 * pt, y0, cx + 6 * pt, y1), _COVER_COST["bar"]))
    for x0, y0, x1, y1 in segments:
        (px0, py0), (px1, py1) = to_px((x0, y0)), to_px((x1, y1))
        obstacles.append((Bbox.from_extents(min(px0, px1) - pt, min(py0, py1) - pt, max(px0, px1) + pt,
                                            max(py0, py1) + pt), _COVER_COST["line"]))
    return obstacles


def _label_spots(radius: float) -> list[tuple[float, float, str, str]]:
    """Where a label may go, nearest first, as (dx, dy) offsets in points from the centre of a marker of ``radius``
    points with the text's alignment there: the eight spots 4 points clear of its edge, then eight farther out to
    either side."""
    r = radius + 4
    d = r * 0.72
    beside = [(r, 0, "left", "center"), (-r, 0, "right", "center"), (d, d, "left", "bottom"),
              (d, -d, "left", "top"), (-d, d, "right", "bottom"), (-d, -d, "right", "top"),
              (0, r, "center", "bottom"), (0, -r, "center", "top")]
    away = [(side * (r + 25), rise, "left" if side > 0 else "right", "bottom" if rise > 0 else "top")
            for rise in (12, -12, 30, -30) for side in (1, -1)]
    return beside + away
