"""``learning_curve.png`` from :mod:`peft_utils.learning_curve`: does full fine-tuning overfit small data?"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.ticker import NullLocator

from peft_utils.learning_curve import FULL, LORA, Curve, SizeResult
from peft_utils.methods import series_label
from peft_utils.plots.footnote import save_figure
from peft_utils.plots.style import method_color, method_marker, new_figure


def plot_learning_curve(curve: Curve, out_dir: str | Path) -> Path:
    """``learning_curve.png``: left, mean dev accuracy per method against train rows (log axis), with 95% intervals
    over seeds and sentences, the several-epoch sizes joined and the one-epoch large end apart; right, at the
    smallest size, the mean over seeds of each epoch's training loss (dashed) and dev loss (solid) per method."""
    fig, (left, right) = new_figure(11.5, 4.6, "Does full fine-tuning overfit small data? LoRA (all linear layers) "
                                    "against full fine-tuning", ncols=2, width_ratios=[1.15, 1])
    _draw_accuracy(left, curve.sizes, curve.large)
    _draw_losses(right, curve.losses, curve.sizes[0].rows if curve.sizes else None)
    return save_figure(fig, Path(out_dir) / "learning_curve.png")


def _draw_accuracy(ax, sizes: Sequence[SizeResult], large: SizeResult | None) -> None:
    for offset, series in ((0.97, FULL), (1.03, LORA)):  # side by side, so the bars do not hide each other
        for points, line in ((sizes, "-"), ([large] if large else [], "none")):
            accuracy = [p.accuracy[series] for p in points]
            ax.errorbar([p.rows * offset for p in points], [100 * a.difference for a in accuracy], capsize=3,
                        yerr=[[100 * (a.difference - a.low) for a in accuracy],
                              [100 * (a.high - a.difference) for a in accuracy]],
                        color=method_color(series), marker=method_marker(series), linestyle=line,
                        markerfacecolor="white" if line == "none" else method_color(series),
                        label=series_label(series) + ("" if line == "-" else ", 1 epoch") if points else None)
    ticks = [p.rows for p in [*sizes, *([large] if large else [])]]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=f"train rows (log scale; {sizes[0].epochs if sizes else 1} epochs, the large end 1 epoch)",
           ylabel="dev accuracy, %\nmean and 95% interval (seeds x sentences)")
    ax.legend(fontsize=8.5, frameon=False, loc="lower right")


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
