"""Figures for the method comparison, drawn only from the saved run records (:mod:`peft_utils.store`).

Why a separate package that reads files instead of plotting inside the training loop: every figure must be
reproducible from ``results/`` alone (``python -m peft_utils.plots results/ imgs/``), so a crashed notebook,
an extra seed or a tweak to a figure never requires re-training.

Design choices that hold for every figure:

- One fixed colour per method (:data:`METHOD_COLORS`), so "LoRA is orange" holds across all PNGs; a method on a
  target set other than the model's default is its own series, drawn in a darker shade of the method's colour
  (:data:`~peft_utils.plots.style.TARGET_SET_SHADE`) and labelled with the set ("LoRA (all-linear)").
- Figures are built on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
  ``pyplot``: importing this package must not switch the backend of a notebook that imports it, and figures
  are not kept alive in pyplot's global registry.
- Every figure carries a footnote with the model, device and compute dtype read from the runs; when those
  differ between methods the footnote says so, because a speed or memory comparison across dtypes is not
  like-for-like.
- Comparison figures use only the complete runs of group ``"comparison"``: the sweep and the learning-rate
  tuning runs (scored on a held-out slice of the train split) each get their own figure. Several seeds of one
  series are drawn as dots around their mean.

One module per job: :mod:`.style` (colours, figure and axis plumbing), :mod:`.selection` (which runs a figure
draws), :mod:`.footnote` (provenance and saving), then the figures: :mod:`.accuracy` (loss, accuracy, accuracy
per evaluation), :mod:`.cost` (time, size, memory, trainable parameters), :mod:`.grids` (rank x alpha map,
learning-rate tuning), :mod:`.summary` (the one-page trade-off) and :mod:`.settings` (every setting tried in a
folder). This package only draws: the numbers behind the figures (intervals, smoothing, per-method aggregation) come
from :mod:`peft_utils.stats`, and every size, count and duration is written by :mod:`peft_utils.formatting`.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from peft_utils.plots.accuracy import plot_accuracy, plot_accuracy_curve, plot_loss
from peft_utils.plots.cost import plot_memory, plot_model_size, plot_time, plot_trainable_params
from peft_utils.plots.grids import plot_lr_tuning, plot_sweep
from peft_utils.plots.learning_curve import plot_learning_curve
from peft_utils.plots.pareto import plot_pareto
from peft_utils.plots.selection import comparison_runs
from peft_utils.plots.settings import plot_settings
from peft_utils.plots.style import (
    DPI,
    METHOD_COLORS,
    METHOD_MARKERS,
    METHOD_ORDER,
    method_color,
    method_label,
)
from peft_utils.plots.summary import plot_summary
from peft_utils.stats import paired_statistics
from peft_utils.report import settings_text
from peft_utils.store import RunStore

__all__ = [
    "METHOD_ORDER",
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
    "plot_settings",
    "plot_learning_curve",
    "plot_all",
    "main",
]

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
    plot_pareto,
)


def plot_all(results_dir: str | Path, imgs_dir: str | Path, run_ids: Sequence[str] | None = None) -> list[Path]:
    """Load the complete runs of ``results_dir`` and write each figure that applies to ``imgs_dir``.

    The figures draw one setting per series: the runs ``run_ids`` (a plan's), or else each series' setting asked
    for last (:meth:`~peft_utils.store.RunStore.load`); where an adapter series holds several settings, ``settings.png``
    sets every one of them side by side (:func:`~peft_utils.plots.settings.plot_settings`).

    The paired tests take their labels from the records (``eval_labels``); without usable labels the paired
    differences are left out with a printed one-line reason (:func:`~peft_utils.stats.paired_statistics`).
    Figures whose inputs are absent (no sweep group, no tuning runs, no memory numbers, ...) are skipped rather
    than drawn empty. Raises ``FileNotFoundError`` when ``results_dir`` does not exist and ``ValueError`` when it
    holds no complete run, because an empty figure set would otherwise look like a success.
    """
    results_dir = Path(results_dir)
    store = RunStore(results_dir)
    results = store.load(run_ids)
    if results.runs.empty:
        raise ValueError(f"no complete run in {results_dir} (a run is complete once its summary is written); "
                         "run the comparison first")
    imgs_dir = Path(imgs_dir)
    imgs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if not comparison_runs(results.runs).empty:
        paired = paired_statistics(results.runs)
        path = plot_accuracy(results, imgs_dir, paired.table, paired.reason)
        if path is not None:
            written.append(path)
    for figure in FIGURES:
        path = figure(results, imgs_dir)
        if path is not None:
            written.append(path)
    path = plot_settings(store.load(every_setting=True), imgs_dir)
    return written + ([path] if path is not None else [])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m peft_utils.plots RESULTS_DIR IMGS_DIR`` regenerates every figure from saved runs."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_utils.plots",
        description="Regenerate every comparison figure from saved run records (no training).",
    )
    parser.add_argument("results_dir", type=Path, help="folder of <run_id>.jsonl run records, e.g. results/")
    parser.add_argument("imgs_dir", type=Path, help="folder to write the PNG figures into, e.g. imgs/")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results folder {args.results_dir} does not exist; run the comparison first")
    try:
        paths = plot_all(args.results_dir, args.imgs_dir)
    except ValueError as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    several = settings_text(args.results_dir)  # what was drawn, where a series holds several settings
    if several:
        print(several)
    return 0
