"""``learning_curve.png`` from :mod:`peft_utils.learning_curve`: does full fine-tuning overfit small data?"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.ticker import NullLocator

from peft_utils.learning_curve import FULL, LORA, Curve, SizeResult
from peft_utils.methods import series_label
from peft_utils.plots.style import DPI, method_color, method_marker, new_figure, style_axes


def plot_learning_curve(curve: Curve, out_dir: str | Path) -> Path:
    """``learning_curve.png``: left, mean dev accuracy per method against train rows (log axis), with 95% intervals
    over seeds and sentences, the several-epoch sizes joined and the one-epoch large end apart; right, at the
    smallest size, the mean over seeds of each epoch's training loss (dashed) and dev loss (solid) per method."""
    fig = new_figure(11.5, 4.4)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    _draw_accuracy(left, curve.sizes, curve.large)
    _draw_losses(right, curve.losses, curve.smallest)
    fig.suptitle("Does full fine-tuning overfit small data? LoRA (all linear layers) against full fine-tuning",
                 fontsize=11)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / "learning_curve.png", dpi=DPI)
    return Path(out_dir) / "learning_curve.png"


def _draw_accuracy(ax, sizes: Sequence[SizeResult], large: SizeResult | None) -> None:
    for offset, series in ((0.97, FULL), (1.03, LORA)):  # side by side, so the bars do not hide each other
        color, marker = method_color(series), method_marker(series)
        for points, style in ((list(sizes), "-"), ([large] if large else [], "none")):
            if not points:
                continue
            xs = [p.rows * offset for p in points]
            means = [100 * p.accuracy[series].difference for p in points]
            bars = [[100 * (p.accuracy[series].difference - p.accuracy[series].low) for p in points],
                    [100 * (p.accuracy[series].high - p.accuracy[series].difference) for p in points]]
            ax.errorbar(xs, means, yerr=bars, color=color, marker=marker, linestyle=style, capsize=3,
                        markerfacecolor="white" if style == "none" else color,
                        label=series_label(series) + ("" if style == "-" else ", 1 epoch"))
    ticks = [p.rows for p in [*sizes, *([large] if large else [])]]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=f"train rows (log scale; {sizes[0].epochs if sizes else 1} epochs, the large end 1 epoch)",
           ylabel="dev accuracy %, mean and 95% interval (seeds x sentences)")
    ax.legend(fontsize=8.5, frameon=False, loc="lower right")
    style_axes(ax)


def _draw_losses(ax, losses: pd.DataFrame, rows: int | None) -> None:
    means = losses.groupby(["series", "epoch"])[["loss", "train_loss"]].mean().reset_index()
    for series in (FULL, LORA):
        run = means[means["series"] == series]
        color, marker = method_color(series), method_marker(series)
        ax.plot(run["epoch"], run["loss"], color=color, marker=marker, label=f"{series_label(series)}: dev loss")
        ax.plot(run["epoch"], run["train_loss"], color=color, marker=marker, linestyle="--", markerfacecolor="white",
                label=f"{series_label(series)}: training loss (epoch mean)")
    title = f"{rows:,} train rows: loss per epoch, mean of {losses['seed'].nunique()} seeds" if rows else ""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set(xlabel="epoch", ylabel="cross-entropy", xticks=sorted(means["epoch"].unique()))
    ax.legend(fontsize=8.5, frameon=False)
    style_axes(ax)
