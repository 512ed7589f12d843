"""Figures for the method comparison, drawn only from the saved run records (``peft_utils.results``).

Why a separate module that reads files instead of plotting inside the training loop: every figure must be
reproducible from ``results/`` alone (``python -m peft_utils.plots results/ imgs/``), so a crashed notebook,
an extra seed or a tweak to a figure never requires re-training.

Design choices that hold for every figure:

- One fixed colour per method (:data:`METHOD_COLORS`), so "LoRA is orange" holds across all PNGs.
- Figures are built on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
  ``pyplot``: importing this module must not switch the backend of a notebook that imports it, and figures
  are not kept alive in pyplot's global registry.
- Every figure carries a footnote with the model, device and compute dtype read from the runs; when those
  differ between methods the footnote says so, because a speed or memory comparison across dtypes is not
  like-for-like.
- Comparison figures use only the complete runs of group ``"comparison"`` (or no group, in older records): the
  sweep and the learning-rate tuning runs (scored on a held-out slice of the train split) each get their own
  figure. Several seeds of one method are drawn as dots around their mean.

This module only draws: the numbers behind the figures (intervals, smoothing, per-method aggregation) come from
:mod:`peft_utils.stats`, and every size, count and duration is written by :mod:`peft_utils.formatting`.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator, PercentFormatter
from matplotlib.transforms import Bbox

from peft_utils.formatting import (
    duration_ticks,
    format_bytes,
    format_count,
    format_duration_tick,
    format_paired_difference,
    format_seconds,
    format_share,
)
from peft_utils.methods import METHOD_NAMES, METHODS
from peft_utils.report import paired_statistics
from peft_utils.store import COMPARISON_GROUP, SWEEP_GROUP, TUNE_GROUP, Results, RunStore
from peft_utils.stats import (
    PAIRED_RESAMPLES,
    ema_smooth,
    ema_span,
    learning_rate_scores,
    numeric_column,
    optional_column,
    per_method_summary,
    runs_in_group,
)

__all__ = [
    "METHOD_ORDER",
    "METHOD_LABELS",
    "METHOD_COLORS",
    "METHOD_MARKERS",
    "DPI",
    "method_color",
    "method_label",
    "plot_loss",
    "plot_accuracy",
    "plot_accuracy_curve",
    "plot_time",
    "plot_model_size",
    "plot_memory",
    "plot_trainable_params",
    "plot_sweep",
    "plot_lr_tuning",
    "plot_summary",
    "plot_all",
    "main",
]

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
_EXTRA_COLORS = ("#56B4E9", "#8C6D31", "#7F7F7F", "#000000")  # for methods added later
_REFERENCE_GREY = "#8A8A8A"
DPI = 150
_CHANCE_ACCURACY = 0.5  # SST-2 is binary and roughly balanced


# --------------------------------------------------------------------------------------------------------------
# Method names and colours
# --------------------------------------------------------------------------------------------------------------
def method_label(method: str) -> str:
    """Display name of a method (``"qlora"`` -> ``"QLoRA"``); unknown methods are shown as given."""
    return METHOD_LABELS.get(method, str(method))


def method_color(method: str) -> str:
    """The fixed colour of a method; methods outside :data:`METHOD_COLORS` get a stable colour by name."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, str(method))) % len(_EXTRA_COLORS)]


def _in_display_order(methods: Iterable[object]) -> list[str]:
    """The distinct methods among ``methods``: known ones in :data:`METHOD_ORDER`, then others alphabetically."""
    present = set(_distinct_texts(methods))
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def _distinct_texts(values: Iterable[object]) -> list[str]:
    """The distinct non-missing values as sorted strings."""
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


# --------------------------------------------------------------------------------------------------------------
# Selecting runs
# --------------------------------------------------------------------------------------------------------------
def _comparison_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that belong to the method comparison (group ``"comparison"``, or none in older records)."""
    return runs_in_group(runs, COMPARISON_GROUP)


def _sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of the LoRA rank/alpha sweep (group ``"sweep"``)."""
    return runs_in_group(runs, SWEEP_GROUP)


def _rows_of_runs(frame: pd.DataFrame, run_ids: Iterable[str]) -> pd.DataFrame:
    """The step or eval rows of ``frame`` that belong to the runs ``run_ids``."""
    if frame.empty or "run_id" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["run_id"].isin(set(run_ids))]


def _method_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`~peft_utils.stats.per_method_summary` of ``runs``, methods in display order."""
    return per_method_summary(runs, _in_display_order(optional_column(runs, "method")))


def _methods_with(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The ``_method_summary`` rows that have ``column``: a figure draws only methods whose number was recorded."""
    table = _method_summary(runs)
    return table if table.empty else table[table[column].notna()]


# --------------------------------------------------------------------------------------------------------------
# Figure plumbing
# --------------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, outside pyplot (see the module docstring for why)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _dtype_name(dtype: object) -> str:
    """``"torch.bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _provenance(runs: pd.DataFrame) -> list[str]:
    """Footnote lines: what was trained, where and in which dtype; loud when methods differ.

    Why on every figure: PNGs travel alone (slides, README). A time or memory bar means little without the
    model and hardware behind it, and a dtype difference between methods changes both.
    """
    if runs.empty:
        return []
    parts = []
    for field in ("model", "device"):
        values = _distinct_texts(optional_column(runs, field))
        if len(values) == 1:
            parts.append(f"{field}: {values[0]}")
        elif values:
            parts.append(f"{field}s differ: {', '.join(values)}")
    dtype_part, dtype_warning = _compute_dtype_notes(runs)
    parts += [part for part in (dtype_part, _data_sizes_note(runs)) if part]
    epochs = _distinct_texts(optional_column(runs, "epochs").dropna())
    if epochs:
        parts.append(f"epochs: {', '.join(epochs)}")
    seeds = numeric_column(runs, "seed").dropna()
    if seeds.nunique() > 1:
        parts.append(f"seeds: {', '.join(str(int(s)) for s in sorted(seeds.unique()))}")
    quantized = [method_label(m) for m in _in_display_order(optional_column(runs, "method")) if m in ("qlora", "qdora")]
    if quantized:
        parts.append(f"{'/'.join(quantized)}: frozen base stored in 4-bit")
    lines = [" · ".join(parts)] if parts else []
    if dtype_warning:
        lines.append(dtype_warning)
    return lines


def _compute_dtype_notes(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    """(``"compute dtype: X"`` when all runs share one, a warning naming each method's dtype when they differ)."""
    dtypes = {m: _distinct_texts(_dtype_name(v) for v in optional_column(runs[runs["method"] == m],
                                                                         "compute_dtype").dropna())
              for m in _in_display_order(optional_column(runs, "method"))}
    all_dtypes = _distinct_texts(d for ds in dtypes.values() for d in ds)
    if len(all_dtypes) == 1:
        return f"compute dtype: {all_dtypes[0]}", None
    if not all_dtypes:
        return None, None
    by_dtype: dict[str, list[str]] = {}
    for method, ds in dtypes.items():
        by_dtype.setdefault("/".join(ds) or "unknown", []).append(method_label(method))
    listing = "; ".join(f"{', '.join(ms)} = {d}" for d, ms in by_dtype.items())
    return None, f"NOTE: compute dtype differs across methods ({listing}), so time and memory are not like-for-like."


def _data_sizes_note(runs: pd.DataFrame) -> str | None:
    """``"SST-2 train 4,000 / dev 872 sentences"`` (a range where runs differ), or None when not recorded."""
    train = numeric_column(runs, "train_size").dropna()
    evals = numeric_column(runs, "n_eval").dropna()
    if evals.empty:
        evals = numeric_column(runs, "eval_size").dropna()
    data = []
    scored_on = _distinct_texts(optional_column(runs, "eval_split"))
    for name, values in (("train", train), ("dev" if scored_on in ([], ["dev"]) else "held-out", evals)):
        if not values.empty:
            low, high = int(values.min()), int(values.max())
            data.append(f"{name} {high:,}" if low == high else f"{name} {low:,}-{high:,}")
    return "SST-2 " + " / ".join(data) + " sentences" if data else None


def _save_with_footnote(fig: Figure, path: Path, runs: pd.DataFrame, notes: Sequence[str] = ()) -> Path:
    """Add the notes and the provenance footnote below the axes and save at :data:`DPI`.

    The footnote is placed under the figure and ``bbox_inches="tight"`` grows the saved image to include it,
    so it can never overlap tick labels whatever the layout engine decided.
    """
    width_in = fig.get_figwidth()
    chars = max(60, int(width_in * 15))
    lines = [wrapped for line in [*notes, *_provenance(runs)] if line
             for wrapped in textwrap.wrap(line, chars, break_on_hyphens=False)]
    if lines:
        fig.text(0.005, -0.01, "\n".join(lines), ha="left", va="top", fontsize=8, color="#444444",
                 linespacing=1.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return path


def _png_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / name


def _style_axes(ax, grid_axis: str = "y") -> None:
    """No top/right frame; a light grid behind the data along ``grid_axis`` (``""`` for none)."""
    ax.spines[["top", "right"]].set_visible(False)
    if grid_axis:
        ax.grid(axis=grid_axis, color="#DDDDDD", linewidth=0.8)
        ax.set_axisbelow(True)


def _label_bars(ax, bars, labels: Sequence[str], fontsize: float = 9) -> None:
    """Write ``labels`` just past the end of each bar."""
    ax.bar_label(bars, labels=list(labels), padding=3, fontsize=fontsize)


def _set_method_ticks(ax, methods: Sequence[str]) -> None:
    """One x tick per bar, labelled with the method's display name."""
    ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])


def _tick_formatter(format_number) -> FuncFormatter:
    """Tick labels from ``format_bytes`` / ``format_count`` in their exact tick mode, and "0" at zero."""
    def tick(value: float, _pos: object) -> str:
        return "0" if value == 0 else format_number(value, tick=True)
    return FuncFormatter(tick)


def _set_duration_axis(ax, low: float, high: float) -> None:
    """A log-scale x axis from ``low`` to ``high`` seconds with clock-friendly ticks (30 s, 1 min, 10 min, 1 h).

    Why: log-scale defaults would give "8.3 min"-style decades beside matplotlib's own "3x10^1" minor labels.
    """
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_xticks(duration_ticks(low, high), minor=False)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_duration_tick(v)))
    ax.xaxis.set_minor_locator(NullLocator())


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------
def plot_loss(results: Results, out_dir: str | Path) -> Path | None:
    """``loss.png``: training loss vs optimiser step, one EMA-smoothed line per method over the faint raw loss.

    Why both: the smoothed line shows convergence speed and the final level; the raw loss behind it keeps the
    noise visible, so a reader does not mistake a smoothing artefact for a real difference. With several
    seeds the per-step loss is averaged over seeds first.
    """
    runs = _comparison_runs(results.runs)
    steps = _rows_of_runs(results.steps, optional_column(runs, "run_id"))
    if steps.empty or "loss" not in steps.columns or "step" not in steps.columns:
        return None
    steps = steps.assign(loss=pd.to_numeric(steps["loss"], errors="coerce"),
                         step=pd.to_numeric(steps["step"], errors="coerce")).dropna(subset=["loss", "step"])
    if steps.empty:
        return None
    fig = _new_figure(9, 5.2)
    ax = fig.add_subplot()
    spans = []
    for method in _in_display_order(steps["method"]):
        curve = steps[steps["method"] == method].groupby("step")["loss"].mean().sort_index()
        color = method_color(method)
        ax.plot(curve.index, curve.to_numpy(), color=color, alpha=0.22, linewidth=0.8, zorder=1)
        span = ema_span(len(curve))
        spans.append(span)
        ax.plot(curve.index, ema_smooth(curve.to_numpy(), span), color=color, linewidth=2.2, zorder=2,
                label=method_label(method))
    # Clip the y range to the bulk of the raw loss so one early spike does not flatten every curve.
    low, high = np.nanpercentile(steps["loss"], [0.5, 99.5])
    margin = 0.08 * max(high - low, 1e-3)
    ax.set_ylim(max(0.0, low - margin), high + margin)
    ax.set_xlim(left=0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Training loss per method", fontsize=13, loc="left")
    _style_axes(ax, "both")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="#999999", alpha=0.4, linewidth=0.8))
    labels.append("raw per-step loss")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    span_note = f"{min(spans)}" if min(spans) == max(spans) else f"{min(spans)}-{max(spans)}"
    notes = [f"Bold lines: exponential moving average (span {span_note} steps) of the raw loss drawn faintly behind."]
    return _save_with_footnote(fig, _png_path(out_dir, "loss.png"), runs, notes)


def plot_accuracy(results: Results, out_dir: str | Path, paired: pd.DataFrame | None = None,
                  paired_reason: str | None = None) -> Path | None:
    """``accuracy.png``: dev accuracy per method, each seed a dot, the mean with its 95% interval; and, beside it,
    the paired differences to full fine-tuning (and of the LoRA variants to LoRA) with intervals and p-values.

    Why dots and not bars: with a few seeds the spread between them is part of the result, and bars on a zoomed
    axis invite reading their length as a ratio. The interval on the mean is Student-t over seeds, or, for a
    method with a single run, the Wilson interval of that run's dev accuracy (which ignores seed noise; the
    legend says which). Why the paired panel: the per-method intervals overlap even when one method is reliably
    better on the same sentences; the paired difference cancels the sentences' shared difficulty.
    ``paired``: :func:`peft_utils.stats.paired_comparisons` rows (None: the panel is left out, with
    ``paired_reason`` in the footnote).
    """
    runs = _comparison_runs(results.runs)
    table = _methods_with(runs, "accuracy")
    if table.empty:
        return None
    methods = list(table.index)
    pairs = paired if paired is not None and not paired.empty else None
    width = max(5.5, 1.15 * len(methods) + 2.5)
    height = max(4.8, 2.6 + (0 if pairs is None else 0.5 * len(pairs)))
    fig = _new_figure(width + (0 if pairs is None else 7.2), height)
    if pairs is not None:
        left, right = fig.subplots(1, 2, width_ratios=[width, 6.0])
    else:
        left, right = fig.add_subplot(), None
    kinds = _draw_accuracy_per_method(left, runs, table)
    notes = ["Dots: one run (seed) each; black marker and bar: the mean and its 95% interval."]
    if pairs is not None:
        _draw_paired_differences(right, pairs)
        notes.append(f"Paired differences: runs matched by seed, on the same {int(pairs['n_sentences'].max()):,} dev "
                     f"sentences; interval: 95% bootstrap over sentences (each with all its seeds, "
                     f"{PAIRED_RESAMPLES:,} resamples); p: exact McNemar sign test over sentences.")
    elif paired_reason:
        notes.append(f"Paired differences not shown: {paired_reason}.")
    fig.suptitle("SST-2 dev accuracy per method" + (" and paired differences" if pairs is not None else ""),
                 fontsize=13, x=0.01, ha="left")
    if "Wilson" in kinds:
        notes.append("Wilson interval: dev-set sampling noise of a single run only (run-to-run variation unseen).")
    return _save_with_footnote(fig, _png_path(out_dir, "accuracy.png"), runs, notes)


def _draw_accuracy_per_method(ax, runs: pd.DataFrame, table: pd.DataFrame) -> set[str]:
    """Seed dots, mean marker and 95% interval per method; returns the interval kinds drawn ("Wilson", "t ...")."""
    methods = list(table.index)
    x = np.arange(len(methods))
    accuracy = numeric_column(runs, "final_accuracy")
    values = []
    for i, method in enumerate(methods):
        seeds = accuracy[runs["method"] == method].dropna().to_numpy() * 100
        values.extend(seeds)
        offsets = np.linspace(-0.16, 0.16, len(seeds)) if len(seeds) > 1 else np.zeros(1)
        ax.scatter(i - 0.12 + offsets * 0.6, seeds, s=34, color=method_color(method), alpha=0.75,
                   edgecolor="white", linewidth=0.8, zorder=3)
    mean = table["accuracy"].to_numpy() * 100
    has_interval = table["acc_low"].notna().to_numpy()
    low = np.where(has_interval, table["acc_low"].to_numpy() * 100, mean)
    high = np.where(has_interval, table["acc_high"].to_numpy() * 100, mean)
    ax.errorbar(x + 0.12, mean, yerr=[mean - low, high - mean], fmt="D", color="#222222", markersize=6,
                elinewidth=1.4, capsize=5, zorder=4)
    for i in range(len(methods)):
        ax.annotate(f"{mean[i]:.1f}%", (x[i] + 0.12, mean[i]), xytext=(9, 0), textcoords="offset points",
                    va="center", ha="left", fontsize=9.5, fontweight="bold", color="#222222")
    ylo, yhi = min(np.nanmin(low), np.nanmin(values)), max(np.nanmax(high), np.nanmax(values))
    pad = max(0.6, 0.12 * (yhi - ylo))
    ax.set_ylim(ylo - pad, min(100.0, yhi + pad))
    ax.set_xlim(-0.6, len(methods) - 0.4)
    _set_method_ticks(ax, methods)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax.set_ylabel("dev accuracy (zoomed axis)")
    ax.set_title("Accuracy: seeds and mean", fontsize=10, loc="left")
    _style_axes(ax)
    kinds = set(table["interval"])
    handles = [Line2D([], [], linestyle="none", marker="o", color="#888888", markersize=6, label="one seed"),
               Line2D([], [], linestyle="none", marker="D", color="#222222", markersize=6,
                      label="mean, " + _interval_legend(kinds))]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8.5, frameon=False)
    return kinds


def _interval_legend(kinds: set[str]) -> str:
    """Which 95% interval the error bars are, from the summary's ``interval`` column."""
    t_kinds = sorted(k.removeprefix("t over ") for k in kinds if k.startswith("t over"))
    parts = [f"Student-t over {'/'.join(t_kinds)}"] if t_kinds else []
    if "Wilson" in kinds:
        parts.append("Wilson (single run)")
    return "95% " + " or ".join(parts) + " interval" if parts else "no interval"


def _draw_paired_differences(ax, pairs: pd.DataFrame) -> None:
    """A forest plot: one row per pair, the difference in points with its interval, the numbers on the right."""
    y = np.arange(len(pairs))[::-1]
    diff = pairs["difference"].to_numpy() * 100
    low, high = pairs["low"].to_numpy() * 100, pairs["high"].to_numpy() * 100
    for yi, d, lo, hi, method in zip(y, diff, low, high, pairs["method"]):
        ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt=METHOD_MARKERS.get(method, "o"), color=method_color(method),
                    markersize=7, elinewidth=1.8, capsize=4, zorder=3)
    ax.axvline(0, color="#555555", linewidth=1, linestyle="--", zorder=1)
    reach = max(0.5, np.nanmax(np.abs(np.concatenate([low, high]))))
    ax.set_xlim(-1.15 * reach, 1.15 * reach)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    labels = [f"{method_label(m)} − {method_label(r)}" for m, r in zip(pairs["method"], pairs["reference"])]
    ax.set_yticks(y, labels)
    numbers = ax.twinx()  # the numbers as right-hand tick labels: the layout engine then keeps them in view
    numbers.set_ylim(ax.get_ylim())
    seeds = pairs["n_seeds"].to_numpy()
    numbers.set_yticks(y, [format_paired_difference(*row) + (f" ({s} seeds)" if s > 1 else "")
                           for row, s in zip(pairs[["difference", "low", "high", "p_value"]].to_numpy(), seeds)])
    numbers.tick_params(length=0, labelsize=8.5)
    numbers.spines[["top", "right", "left"]].set_visible(False)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))  # whole points only
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}" if v else "0"))
    ax.set_xlabel("accuracy difference (percentage points; right of 0: first method better)")
    ax.set_title("Paired differences (95% CI, McNemar p)", fontsize=10, loc="left")
    _style_axes(ax, "x")


def plot_accuracy_curve(results: Results, out_dir: str | Path) -> Path | None:
    """``accuracy_curve.png``: dev accuracy at every evaluation, per method.

    Why: the final number hides whether a method had already converged or was still climbing (so more epochs
    would change the ranking) or peaked early and started to overfit. The x axis is the epoch when every
    evaluation records one (comparable across batch sizes), otherwise the optimiser step.
    """
    runs = _comparison_runs(results.runs)
    evals = _rows_of_runs(results.evals, optional_column(runs, "run_id"))
    if evals.empty or "accuracy" not in evals.columns:
        return None
    evals = evals.assign(accuracy=pd.to_numeric(evals["accuracy"], errors="coerce")).dropna(subset=["accuracy"])
    epoch = numeric_column(evals, "epoch")
    step = numeric_column(evals, "step")
    if epoch.notna().all() and len(evals):
        xcol, xlabel = epoch, "epoch"
    elif step.notna().all() and len(evals):
        xcol, xlabel = step, "optimiser step"
    else:
        return None
    evals = evals.assign(_x=xcol)
    fig = _new_figure(9, 5.2)
    ax = fig.add_subplot()
    several_seeds = False
    for method in _in_display_order(evals["method"]):
        sub = evals[evals["method"] == method]
        per_x = sub.groupby("_x")["accuracy"].agg(["mean", "min", "max", "count"]).sort_index()
        color = method_color(method)
        ax.plot(per_x.index, per_x["mean"] * 100, color=color, linewidth=2,
                marker=METHOD_MARKERS.get(method, "o"), markersize=6, label=method_label(method))
        if sub["run_id"].nunique() > 1:
            several_seeds = True
            ax.fill_between(per_x.index, per_x["min"] * 100, per_x["max"] * 100, color=color, alpha=0.15,
                            linewidth=0)
    # Zoomed to the data (differences of interest are small); chance level drawn only when in range.
    ymin = max(0.0, 2 * math.floor((float(evals["accuracy"].min()) * 100 - 1) / 2))
    ymax = min(100.0, 2 * math.ceil((float(evals["accuracy"].max()) * 100 + 1) / 2))
    ax.set_ylim(ymin, ymax)
    show_chance = ymin < _CHANCE_ACCURACY * 100 < ymax
    if show_chance:
        ax.axhline(_CHANCE_ACCURACY * 100, color="#555555", linestyle="--", linewidth=1)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    if xlabel == "epoch" and np.allclose(evals["_x"], np.round(evals["_x"])):
        ax.set_xticks(sorted(evals["_x"].unique()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev accuracy" + (f" (axis starts at {ymin:.0f}%)" if ymin > 0 else ""))
    ax.set_title("Dev accuracy during training", fontsize=13, loc="left")
    _style_axes(ax, "both")
    fig.legend(loc="outside right upper", frameon=False)
    notes = ["Dashed line: chance level (50%)."] if show_chance else []
    if several_seeds:
        notes.append("Lines: mean over seeds; shaded: min-max range over seeds.")
    return _save_with_footnote(fig, _png_path(out_dir, "accuracy_curve.png"), runs, notes)


def plot_time(results: Results, out_dir: str | Path) -> Path | None:
    """``time.png``: training time relative to full fine-tuning (left) and in absolute seconds (right).

    Why both: the relative view answers "how much faster is the PEFT method", which is what transfers to
    other hardware; the absolute one keeps the scale honest (a 50% saving of 20 seconds matters less than one
    of 2 hours). If full fine-tuning was not run, the slowest method is the 100% reference and the title says
    so.
    """
    runs = _comparison_runs(results.runs)
    table = _methods_with(runs, "train_time_s")
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
    fig = _new_figure(max(9.0, 2.2 * len(methods) + 3), 4.8)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(methods))
    bars = left.bar(x, relative, width=0.62, color=colors, zorder=2)
    _label_bars(left, bars, [f"{r:.0f}%" for r in relative])
    left.axhline(100, color="#555555", linestyle="--", linewidth=1, zorder=1)
    left.set_ylim(0, max(relative.max(), 100) * 1.15)
    left.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    left.set_ylabel("training time (% of reference)")
    left.set_title(f"Relative training time\n({ref_text})", fontsize=10, loc="left")
    bars = right.bar(x, seconds, width=0.62, color=colors, zorder=2)
    throughput = table["samples_per_s"].to_numpy()
    labels = [format_seconds(s) + (f"\n{t:,.0f} samples/s" if np.isfinite(t) else "")
              for s, t in zip(seconds, throughput)]
    _label_bars(right, bars, labels, fontsize=8.5)
    right.set_ylim(0, seconds.max() * 1.25)
    right.set_ylabel("training time (s)")
    right.set_title("Absolute training time\n(all epochs, evaluation excluded)", fontsize=10, loc="left")
    for ax in (left, right):
        _set_method_ticks(ax, methods)
        _style_axes(ax)
    fig.suptitle("Training time per method", fontsize=13, x=0.01, ha="left")
    notes = ["Mean over seeds where a method has several runs."] if (table["n_runs"] > 1).any() else []
    return _save_with_footnote(fig, _png_path(out_dir, "time.png"), runs, notes)


def plot_model_size(results: Results, out_dir: str | Path) -> Path | None:
    """``model_size.png``: what each method costs to store, next to the base model in fp32 and in 4-bit.

    Left (log scale, because sizes span three orders of magnitude): the fp32 base model, the 4-bit base
    (when a QLoRA/QDoRA run exists) and the artifact each method must ship (a full checkpoint, an adapter, or
    a 4-bit base plus adapter). Right (linear): the in-memory footprint of the model during training, split
    into 4-bit weights, quantisation state, frozen weights and trainable weights, which is where the savings
    of LoRA (few trainable weights) and of 4-bit (small frozen weights) come from.
    """
    runs = _comparison_runs(results.runs)
    table = _method_summary(runs)
    if table.empty or (table["disk_bytes"].isna().all() and table["fp32_bytes"].isna().all()):
        return None
    bars = _storage_bars(table)
    parts = ["quantized_bytes", "quant_state_bytes", "frozen_bytes", "trainable_bytes"]
    has_parts = table[parts].notna().any(axis=1) & (table[parts].fillna(0).sum(axis=1) > 0)
    fig = _new_figure(13 if has_parts.any() else 8.5, max(3.6, 0.55 * max(len(bars), has_parts.sum()) + 1.8))
    axes = fig.subplots(1, 2, width_ratios=[1.15, 1]) if has_parts.any() else [fig.add_subplot()]
    _draw_storage_bars(axes[0], bars)
    if has_parts.any():
        _draw_memory_footprint(axes[1], table.loc[[m for m in table.index if has_parts[m]]])
    fig.suptitle("Model size", fontsize=13, x=0.01, ha="left")
    notes = ["Sizes exclude optimiser state and activations (see memory.png for the measured peak)."]
    return _save_with_footnote(fig, _png_path(out_dir, "model_size.png"), runs, notes)


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
        bars.append(_StorageBar("Base model in fp32", float(fp32), _REFERENCE_GREY, ""))
    quantized = [m for m in table.index if m in ("qlora", "qdora") or table.loc[m, "quantized_bytes"] > 0]
    if quantized:
        q = table.loc[quantized[0]]
        base4 = np.nansum([q["quantized_bytes"], q["quant_state_bytes"], q["frozen_bytes"]])
        if not base4 > 0 and np.isfinite(q["total_bytes"]):
            base4 = q["total_bytes"] - np.nan_to_num(q["trainable_bytes"])
        if base4 > 0:
            bars.append(_StorageBar("Base model with 4-bit weights", float(base4), _REFERENCE_GREY, "//"))
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
    _label_bars(ax, artists, [format_bytes(v) for v in values])
    ax.xaxis.set_major_formatter(_tick_formatter(format_bytes))
    ax.set_xlabel("size (log scale; 1 MB = 10^6 bytes)")
    ax.set_title("Storage: base model vs what each method ships", fontsize=10, loc="left")
    _style_axes(ax, "x")


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
    _style_axes(ax, "x")


_MEMORY_KIND_TEXT = {
    "cuda": "peak GPU memory allocated (torch.cuda)",
    "rss": "peak process RSS (CPU run)",
}


def plot_memory(results: Results, out_dir: str | Path) -> Path | None:
    """``memory.png``: peak memory per method during training.

    Why the kind on the axis: on a GPU the number is the tensor memory PyTorch allocated (weights, gradients,
    optimiser state, activations); on a CPU-only run it is the whole process RSS, which also counts Python,
    libraries and the data set. The two are not comparable, so mixed kinds are hatched and called out.
    """
    runs = _comparison_runs(results.runs)
    table = _methods_with(runs, "peak_memory_bytes")
    if table.empty:
        return None
    methods = list(table.index)
    values = table["peak_memory_bytes"].to_numpy()
    kinds = [k or "unknown" for k in table["memory_kind"]]
    distinct = sorted(set(kinds))
    fig = _new_figure(max(6.5, 1.35 * len(methods) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    mixed = len(distinct) > 1
    hatches = ["xx" if (mixed and k != "cuda") else "" for k in kinds]
    bars = ax.bar(x, values, width=0.62, color=[method_color(m) for m in methods], hatch=hatches,
                  edgecolor="white", zorder=2)
    _label_bars(ax, bars, [format_bytes(v) for v in values])
    ax.set_ylim(0, values.max() * 1.15)
    ax.yaxis.set_major_formatter(_tick_formatter(format_bytes))
    if mixed:
        ax.set_ylabel("peak memory (mixed kinds, see note)")
    else:
        ax.set_ylabel(_MEMORY_KIND_TEXT.get(distinct[0], f"peak memory ({distinct[0]})"))
    _set_method_ticks(ax, methods)
    ax.set_title("Peak memory during training", fontsize=13, loc="left")
    _style_axes(ax)
    notes = []
    if mixed:
        listing = "; ".join(f"{method_label(m)}: {_MEMORY_KIND_TEXT.get(k, k)}" for m, k in zip(methods, kinds))
        notes.append(f"NOTE: memory kinds differ (hatched bars are not GPU allocations): {listing}.")
    elif distinct[0] == "rss":
        notes.append("Process RSS includes the Python runtime, libraries and data, not only the model.")
    if (table["n_runs"] > 1).any():
        notes.append("Maximum over seeds where a method has several runs.")
    return _save_with_footnote(fig, _png_path(out_dir, "memory.png"), runs, notes)


def plot_trainable_params(results: Results, out_dir: str | Path) -> Path | None:
    """``trainable_params.png``: trainable parameters per method on a log scale, with the share of the model.

    Why log scale: full fine-tuning trains ~100% and LoRA well under 1%; on a linear axis the PEFT bars are
    invisible. The percentage on each bar is the number people quote.
    """
    runs = _comparison_runs(results.runs)
    table = _method_summary(runs)
    if table.empty or not (table["trainable_params"] > 0).any():
        return None
    table = table[table["trainable_params"] > 0]
    methods = list(table.index)
    values = table["trainable_params"].to_numpy(dtype=float)
    totals = table["total_params"].to_numpy(dtype=float)
    fig = _new_figure(max(6.5, 1.35 * len(methods) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    bars = ax.bar(x, values, width=0.62, color=[method_color(m) for m in methods], zorder=2)
    labels = [format_count(v) + (f"\n({format_share(v, t)} of {format_count(t)})" if np.isfinite(t) and t > 0 else "")
              for v, t in zip(values, totals)]
    _label_bars(ax, bars, labels, fontsize=8.5)
    ax.set_yscale("log")
    ax.set_ylim(values.min() / 3, values.max() * 6)
    ax.yaxis.set_major_formatter(_tick_formatter(format_count))
    ax.set_ylabel("trainable parameters (log scale)")
    _set_method_ticks(ax, methods)
    ax.set_title("Trainable parameters per method", fontsize=13, loc="left")
    _style_axes(ax)
    return _save_with_footnote(fig, _png_path(out_dir, "trainable_params.png"), runs)


def _rows_label(sizes: set[int]) -> str:
    return " / ".join(f"{n:,}" for n in sorted(sizes)) or "?"


def plot_sweep(results: Results, out_dir: str | Path) -> Path | None:
    """``sweep.png``: the LoRA rank x alpha/r grid as a heatmap of dev accuracy, trainable parameters beside it.

    Rows are ranks, columns the alpha/r ratio. The ratio, not alpha, is the column key because LoRA scales its
    update by alpha/r: along a column the update's scale is fixed and only capacity (rank) changes. With rsLoRA
    the scale is alpha/sqrt(r) instead, and the title says so. Each cell is the mean over its seeds. The bars
    share the heatmap's rows: trainable parameters grow linearly with r and do not depend on alpha, so together
    they show where extra rank stops paying off. ``None`` when no run has group ``"sweep"``.
    """
    sweep = _sweep_runs(results.runs)
    if sweep.empty:
        return None
    sweep = sweep.assign(**{name: numeric_column(sweep, name)
                            for name in ("rank", "alpha", "final_accuracy", "trainable_params")})
    sweep = sweep[(sweep["rank"] > 0) & sweep["final_accuracy"].notna()]
    if sweep.empty:
        return None
    rslora = optional_column(sweep, "rslora").astype(object).where(lambda v: v.notna(), False).astype(bool)
    sweep = sweep.assign(ratio=(sweep["alpha"] / sweep["rank"]).round(4), rslora=rslora)
    ranks, ratios = sorted(sweep["rank"].unique()), sorted(sweep["ratio"].unique())
    variants = sorted(sweep["rslora"].unique())
    comparison = _method_summary(_comparison_runs(results.runs))
    full = comparison.loc["full"] if "full" in comparison.index else None
    heat_width = 0.95 * len(ratios) + 1.2
    fig = _new_figure(len(variants) * heat_width + 1.2 + 4.2, 0.42 * len(ranks) + 2.4)
    axes = fig.subplots(1, len(variants) + 1, width_ratios=[heat_width] * len(variants) + [4.2], sharey=True)
    cells = sweep.groupby(["rslora", "rank", "ratio"])["final_accuracy"].agg(["mean", "size"])
    low, high = cells["mean"].min() * 100, cells["mean"].max() * 100
    for ax, variant in zip(axes, variants):
        image = _draw_sweep_heatmap(ax, cells.loc[variant], ranks, ratios, (low, high))
        ax.set_title(("rsLoRA: scale α/√r" if variant else "LoRA: scale α/r") + "\n(dev accuracy, %)", fontsize=10,
                     loc="left")
    fig.colorbar(image, ax=list(axes[:-1]), shrink=0.8, pad=0.02)  # the values are written in the cells too
    _draw_sweep_params(axes[-1], sweep, ranks, math.nan if full is None else full["trainable_params"])
    title = "LoRA rank × α/r sweep" + (" (rsLoRA)" if variants == [True] else "")
    fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    seeds = cells["size"].max()
    notes = [f"Cells: mean dev accuracy over {'up to ' if cells['size'].min() < seeds else ''}{seeds} seed"
             f"{'s' if seeds > 1 else ''}; blank cells were not run."]
    if full is not None and np.isfinite(full["accuracy"]):
        rows = {name: set(numeric_column(frame, "train_size").dropna().astype(int))
                for name, frame in (("sweep", sweep), ("full", _comparison_runs(results.runs).query("method == 'full'")))}
        fewer = f", trained on {_rows_label(rows['full'])} rows (the grid: {_rows_label(rows['sweep'])})" \
            if rows["full"] != rows["sweep"] else ""
        notes.append(f"Full fine-tuning (comparison runs): {full['accuracy'] * 100:.1f}% dev accuracy{fewer}.")
    return _save_with_footnote(fig, _png_path(out_dir, "sweep.png"), sweep, notes)


def _draw_sweep_heatmap(ax, cells: pd.DataFrame, ranks: Sequence[float], ratios: Sequence[float],
                        value_range: tuple[float, float]):
    """Mean accuracy per (rank, ratio) cell, annotated; returns the image for the colour bar."""
    matrix = np.full((len(ranks), len(ratios)), np.nan)
    for (rank, ratio), mean in cells["mean"].items():
        matrix[ranks.index(rank), ratios.index(ratio)] = mean * 100
    low, high = value_range
    spread = max(high - low, 0.1)
    cmap = colormaps["viridis"].with_extremes(bad="#F2F2F2")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=low - 0.05 * spread, vmax=high + 0.05 * spread,
                      aspect="auto")
    for (row, column), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            dark = (value - low) / spread < 0.55  # viridis is dark at the low end
            ax.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "#1A1A1A", fontweight="bold" if value == high else "normal")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(ranks)), [f"{r:g}" for r in ranks])
    ax.set_xlabel("α / r")
    ax.set_ylabel("LoRA rank r")
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    return image


def _draw_sweep_params(ax, sweep: pd.DataFrame, ranks: Sequence[float], full_params: float) -> None:
    """Trainable parameters per rank (rows shared with the heatmap), log scale, full fine-tuning as a reference."""
    params = sweep.groupby("rank")["trainable_params"].first().reindex(ranks)
    known = params.notna().to_numpy()
    y = np.arange(len(ranks))
    bars = ax.barh(y[known], params.to_numpy()[known], color=METHOD_COLORS["lora"], height=0.6, zorder=2)
    _label_bars(ax, bars, [format_count(v) for v in params.to_numpy()[known]], fontsize=8.5)
    top = np.nanmax(params.to_numpy()) if known.any() else 1.0
    if np.isfinite(full_params):
        ax.axvline(full_params, color=METHOD_COLORS["full"], linestyle="--", linewidth=1.3,
                   label=f"full fine-tuning ({format_count(full_params)})")
        ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9, edgecolor="none")  # beside the shortest bars
        top = max(top, full_params)
    ax.set_xscale("log")
    bottom = np.nanmin(params.to_numpy()) if known.any() else 1.0
    ax.set_xlim(bottom / 3, top * 8)
    ax.xaxis.set_major_formatter(_tick_formatter(format_count))
    ax.set_xlabel("trainable parameters (log)")
    ax.set_title("Trainable parameters\n(independent of α)", fontsize=10, loc="left")
    ax.tick_params(axis="y", labelleft=False, length=0)
    _style_axes(ax, "x")


def plot_lr_tuning(results: Results, out_dir: str | Path) -> Path | None:
    """``lr_tuning.png``: held-out accuracy vs learning rate per method, each method's chosen rate marked.

    The tuning runs (group ``"tune"``) are scored on a held-out slice of the train split, never on dev, so the
    rate is chosen without looking at the reported split; the chooser is :func:`peft_utils.stats.choose_learning_rates`,
    the same function the training side calls. Why plot the whole grid: a chosen rate at the grid's edge, or a flat
    curve, says the grid (not the method) decided. ``None`` when there is no tuning run.
    """
    tune = runs_in_group(results.runs, TUNE_GROUP)
    if tune.empty:
        return None
    scores = learning_rate_scores(tune)
    if scores.empty:
        return None
    fig = _new_figure(9.5, 5.2)
    ax = fig.add_subplot()
    accuracy = numeric_column(tune, "final_accuracy") * 100
    several_seeds = (scores["n_seeds"] > 1).any()
    methods = _in_display_order(scores["method"])
    labelled: dict[float, int] = {}  # chosen rate -> labels already drawn there (stacked, not overprinted)
    for i, method in enumerate(methods):
        # Methods sharing a grid are nudged sideways (in log space) so coinciding curves stay visible.
        nudge = 2 ** (0.05 * (i - (len(methods) - 1) / 2))
        grid = scores[scores["method"] == method].assign(lr=lambda g: g["lr"] * nudge)
        color = method_color(method)
        if several_seeds:
            at = tune["method"] == method
            ax.scatter(numeric_column(tune[at], "lr") * nudge, accuracy[at], s=14, color=color, alpha=0.35,
                       zorder=2)
        ax.plot(grid["lr"], grid["accuracy"] * 100, color=color, marker=METHOD_MARKERS.get(method, "o"),
                markersize=6, linewidth=2, zorder=3, label=method_label(method))
        chosen = grid[grid["chosen"]].iloc[0]
        ax.scatter(chosen["lr"], chosen["accuracy"] * 100, s=260, facecolor="none", edgecolor=color, linewidth=2.2,
                   zorder=4)
        rate = float(chosen["lr"] / nudge)
        stacked = labelled[rate] = labelled.get(rate, -1) + 1
        ax.annotate(f"{rate:.0e}", (chosen["lr"], chosen["accuracy"] * 100), xytext=(0, 12 + 11 * stacked),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8.5, color=color,
                    fontweight="bold")
    ax.set_xscale("log")
    lrs = np.sort(scores["lr"].unique())
    ax.set_xticks(lrs, [f"{lr:.0e}" for lr in lrs], rotation=45 if len(lrs) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lrs[0] / 1.6, lrs[-1] * 1.6)
    values = scores["accuracy"].to_numpy() * 100
    pad = max(1.0, 0.1 * np.ptp(values))
    ax.set_ylim(np.nanmin(values) - pad, min(100.5, np.nanmax(values) + 1.5 * pad))
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_xlabel("peak learning rate (log scale)")
    split = "/".join(_distinct_texts(optional_column(tune, "eval_split"))) or "held-out"
    ax.set_ylabel(f"held-out accuracy ({split})")
    ax.set_title("Learning-rate tuning: accuracy on a held-out slice of the train split", fontsize=12, loc="left")
    _style_axes(ax, "both")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                          markeredgecolor="#444444"))
    labels.append("chosen rate")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    notes = ["Chosen: highest held-out accuracy (ties: lower held-out loss, then the smaller rate). The dev split "
             "is never used for the choice."]
    if several_seeds:
        notes.append("Lines: mean over seeds; faint dots: single seeds.")
    return _save_with_footnote(fig, _png_path(out_dir, "lr_tuning.png"), tune, notes)


def _overlap_area(a: Bbox, b: Bbox) -> float:
    """Area shared by two boxes (0 when they do not overlap)."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, radii_pt: np.ndarray, texts: Sequence[str],
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


def plot_summary(results: Results, out_dir: str | Path) -> Path | None:
    """``summary.png``: the trade-off on one page: accuracy vs training time, marker area ~ shipped size.

    Why: no single method wins on every axis; the reader's question is "what do I pay for each point of
    accuracy". Up and to the left is better, and a small marker is cheap to store. The table under the plot
    gives the exact numbers behind the markers (plus peak memory and trainable parameters), so the figure
    stands alone on a slide.
    """
    runs = _comparison_runs(results.runs)
    table = _method_summary(runs)
    if table.empty:
        return None
    plotted = table[table["accuracy"].notna() & table["train_time_s"].notna()]
    if plotted.empty:
        return None
    fig = _new_figure(11, 5.2 + 0.22 * (len(table) + 1))
    ax, table_ax = fig.subplots(2, 1, height_ratios=[4.6, 0.22 * (len(table) + 1)])
    _draw_tradeoff(fig, ax, plotted)
    # The table: exact numbers behind the markers (filled after the labels are placed, which runs the layout).
    _draw_summary_table(table_ax, table)
    if "full" not in table.index:
        rel_note = "Rel. time: relative to the slowest method (full fine-tuning not in this run set)."
    else:
        rel_note = "Rel. time: relative to full fine-tuning."
    fig.suptitle("Method comparison: accuracy, time and size", fontsize=13, x=0.01, ha="left")
    return _save_with_footnote(fig, _png_path(out_dir, "summary.png"), runs, [rel_note])


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
        _set_duration_axis(ax, times.min() / 1.8, times.max() * 2.2)
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
    _style_axes(ax, "both")
    if len(shipped) >= 2:
        _add_size_legend(ax, shipped)
    label_texts = [method_label(m) + (f" · {format_bytes(disk[i])}" if np.isfinite(disk[i]) and disk[i] > 0 else "")
                   for i, m in enumerate(plotted.index)]
    _place_labels(fig, ax, times, accs, np.sqrt(sizes) / 2, label_texts, lows, highs)


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
    widths = np.array([0.08, 0.19, 0.09, 0.08, 0.13, 0.16, 0.27])
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


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------
# Every figure but the accuracy figure, which also takes the paired statistics (see plot_all).
FIGURES = (
    plot_loss,
    plot_accuracy_curve,
    plot_time,
    plot_model_size,
    plot_memory,
    plot_trainable_params,
    plot_sweep,
    plot_lr_tuning,
    plot_summary,
)


def plot_all(results_dir: str | Path, imgs_dir: str | Path, data_dir: str | Path | None = None) -> list[Path]:
    """Load every complete run in ``results_dir`` and write each figure that applies to ``imgs_dir``.

    ``data_dir``: the SST-2 folder (or its parent) whose dev labels the paired tests need, since the records keep
    predictions but not labels; by default ``SST2_DIR`` / ``PEFT_LAB_DATA``. Without labels (or with records
    that predate ``dev_predictions``) the paired differences are left out with a printed one-line reason.
    Figures whose inputs are absent (no sweep group, no tuning runs, no memory numbers, ...) are skipped rather
    than drawn empty. Raises ``FileNotFoundError`` when ``results_dir`` does not exist and ``ValueError`` when it
    holds no complete run, because an empty figure set would otherwise look like a success.
    """
    results_dir = Path(results_dir)
    results = RunStore(results_dir).load()
    if results.runs.empty:
        raise ValueError(f"no complete run in {results_dir} (a run is complete once its summary is written); "
                         "run the comparison first")
    imgs_dir = Path(imgs_dir)
    imgs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if not _comparison_runs(results.runs).empty:
        paired = paired_statistics(results.runs, data_dir)
        path = plot_accuracy(results, imgs_dir, paired.table, paired.reason)
        if path is not None:
            written.append(path)
    for figure in FIGURES:
        path = figure(results, imgs_dir)
        if path is not None:
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m peft_utils.plots RESULTS_DIR IMGS_DIR`` regenerates every figure from saved runs."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_utils.plots",
        description="Regenerate every comparison figure from saved run records (no training).",
    )
    parser.add_argument("results_dir", type=Path, help="folder of <run_id>.jsonl run records, e.g. results/")
    parser.add_argument("imgs_dir", type=Path, help="folder to write the PNG figures into, e.g. imgs/")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="SST-2 folder (or its parent) for the dev labels of the paired tests "
                             "(default: $SST2_DIR or $PEFT_LAB_DATA)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results folder {args.results_dir} does not exist; run the comparison first")
    try:
        paths = plot_all(args.results_dir, args.imgs_dir, args.data_dir)
    except ValueError as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
