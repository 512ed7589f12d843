"""Method names, colours and markers, and the figure and axis plumbing every figure shares.

Why one place: "LoRA is orange" and the look of an axis must hold across every PNG, whichever module drew it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator
from matplotlib.transforms import Bbox

from peft_utils.formatting import duration_ticks, format_duration_tick
from peft_utils.methods import METHOD_NAMES, METHODS
from peft_utils.stats import optional_column

METHOD_ORDER: tuple[str, ...] = METHOD_NAMES
METHOD_LABELS: dict[str, str] = {name: method.label for name, method in METHODS.items()}
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
REFERENCE_GREY = "#8A8A8A"
DPI = 150
def chance_accuracy(runs: pd.DataFrame) -> float:
    """1 / K for the runs' K classes (their records' ``labels``; SST-2's two where none is recorded): a guess's
    accuracy on balanced classes."""
    labels = [value for value in optional_column(runs, "labels") if isinstance(value, (list, tuple))]
    return 1 / max(len(labels[0]) if labels else 2, 2)


def method_label(method: str) -> str:
    """Display name of a method (``"qlora"`` -> ``"QLoRA"``); unknown methods are shown as given."""
    return METHOD_LABELS.get(method, str(method))


def method_color(method: str) -> str:
    """The fixed colour of a method; methods outside :data:`METHOD_COLORS` get a stable colour by name."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, str(method))) % len(_EXTRA_COLORS)]


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


def set_method_ticks(ax, methods: Sequence[str]) -> None:
    """One x tick per bar, labelled with the method's display name."""
    ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])


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


def place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, radii_pt: np.ndarray, texts: Sequence[str],
                  lows: np.ndarray, highs: np.ndarray) -> None:
    """Label scatter points without covering markers, error bars or each other.

    Why not fixed offsets: methods often sit close together (LoRA and DoRA differ by a few percent in time
    and a fraction of a point in accuracy), and fixed offsets then print labels on top of one another. Each
    label tries a ring of positions around its marker and keeps the first that overlaps nothing already
    drawn (or, failing that, the least overlapping one). Labels are kept out of the layout engine so placing
    them does not move the axes they were placed in.
    """
    fig.canvas.draw()  # run the layout: data -> pixel transforms are final from here on
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    pt = fig.dpi / 72.0
    obstacles = []
    for x, y, r, lo, hi in zip(xs, ys, radii_pt, lows, highs):
        cx, cy = to_px((x, y))
        obstacles.append(Bbox.from_extents(cx - r * pt, cy - r * pt, cx + r * pt, cy + r * pt))
        if np.isfinite(lo) and np.isfinite(hi):
            (_, y0), (_, y1) = to_px((x, lo)), to_px((x, hi))
            obstacles.append(Bbox.from_extents(cx - 6 * pt, y0, cx + 6 * pt, y1))  # error bar with caps
    axes_box = ax.get_window_extent(renderer)
    for i in np.argsort(-radii_pt):  # big markers first: they have the fewest free spots
        r = radii_pt[i] + 4
        d = r * 0.72
        candidates = [(r, 0, "left", "center"), (-r, 0, "right", "center"), (d, d, "left", "bottom"),
                      (d, -d, "left", "top"), (-d, d, "right", "bottom"), (-d, -d, "right", "top"),
                      (0, r, "center", "bottom"), (0, -r, "center", "top"), (r + 25, 12, "left", "bottom"),
                      (-r - 25, 12, "right", "bottom"), (r + 25, -12, "left", "top"), (-r - 25, -12, "right", "top")]
        best, best_cost = None, math.inf
        for dx, dy, ha, va in candidates:
            label = ax.annotate(texts[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha,
                                va=va, fontsize=9, color="#222222", zorder=5,
                                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.8})
            label.set_in_layout(False)
            box = label.get_window_extent(renderer).expanded(1.05, 1.15)
            cost = sum(_overlap_area(box, o) for o in obstacles)
            outside = box.width * box.height - _overlap_area(box, axes_box)
            cost += 10 * outside
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (label, box), cost
            else:
                label.remove()
            if cost == 0:
                break
        obstacles.append(best[1])
