"""Figures for the method comparison, drawn only from the saved run records (:mod:`peft_utils.store`).

Why a package that reads files instead of plotting inside the training loop: every figure must be reproducible from
``results/`` alone (``python -m peft_utils.plots results/ imgs/``), so a crashed notebook, an extra seed or a tweak
to a figure never requires re-training. Every figure carries a footnote naming the model, device, dtype and data
behind it (:mod:`.footnote`), and comparison figures draw only the complete runs of group ``"comparison"``.

The figures: :mod:`.accuracy` (``loss.png``: loss and accuracy during training; ``accuracy.png``: final accuracy and
paired differences), :mod:`.cost` (``cost.png``: time, memory, size), :mod:`.pareto` (``pareto.png``), :mod:`.grids`
(``sweep.png``: the rank x alpha map; ``lr_tuning.png``), :mod:`.settings` (``settings.png``) and
:mod:`.learning_curve` (``learning_curve.png``, from :mod:`peft_utils.learning_curve`); shared colours and axes in
:mod:`.style`. The numbers behind them come from :mod:`peft_utils.stats`, their text from :mod:`peft_utils.formatting`.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from peft_utils.plots.accuracy import plot_accuracy, plot_loss
from peft_utils.plots.cost import plot_cost
from peft_utils.plots.grids import plot_lr_tuning, plot_sweep
from peft_utils.plots.learning_curve import plot_learning_curve
from peft_utils.plots.pareto import plot_pareto
from peft_utils.plots.settings import plot_settings
from peft_utils.plots.style import DPI, METHOD_COLORS, METHOD_MARKERS, METHOD_ORDER, comparison_runs, method_color, \
    method_label
from peft_utils.report import settings_text
from peft_utils.stats import paired_statistics
from peft_utils.store import RunStore

__all__ = ["METHOD_ORDER", "METHOD_COLORS", "METHOD_MARKERS", "DPI", "method_color", "method_label", "plot_loss",
           "plot_accuracy", "plot_cost", "plot_pareto", "plot_sweep", "plot_lr_tuning", "plot_settings",
           "plot_learning_curve", "plot_all", "main"]

# Every figure of plot_all but the accuracy figure, which also takes the paired statistics.
FIGURES = (plot_loss, plot_cost, plot_pareto, plot_sweep, plot_lr_tuning)


def plot_all(results_dir: str | Path, imgs_dir: str | Path, run_ids: Sequence[str] | None = None) -> list[Path]:
    """Load the complete runs of ``results_dir`` and write each figure that applies to ``imgs_dir``.

    The figures draw one setting per series: the runs ``run_ids`` (a plan's), or else each series' setting asked
    for last (:meth:`~peft_utils.store.RunStore.load`); ``settings.png`` sets every setting side by side. Figures
    whose inputs are absent (no sweep, no tuning runs, no memory numbers) are skipped rather than drawn empty.
    Raises ``FileNotFoundError`` for a missing ``results_dir`` and ``ValueError`` when it holds no complete run,
    because an empty figure set would otherwise look like a success.
    """
    store = RunStore(results_dir)
    results = store.load(run_ids)
    if results.runs.empty:
        raise ValueError(f"no complete run in {results_dir} (a run is complete once its summary is written); "
                         "run the comparison first")
    Path(imgs_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    if not comparison_runs(results.runs).empty:  # paired tests need labels; without, a printed one-line reason
        paired = paired_statistics(results.runs)
        paths.append(plot_accuracy(results, imgs_dir, paired.table, paired.reason))
    paths += [figure(results, imgs_dir) for figure in FIGURES]
    paths.append(plot_settings(store.load(every_setting=True), imgs_dir))
    return [path for path in paths if path is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m peft_utils.plots RESULTS_DIR IMGS_DIR`` regenerates every figure from saved runs."""
    parser = argparse.ArgumentParser(prog="python -m peft_utils.plots",
                                     description="Regenerate every comparison figure from saved run records.")
    parser.add_argument("results_dir", type=Path, help="folder of <run_id>.jsonl run records, e.g. results/")
    parser.add_argument("imgs_dir", type=Path, help="folder to write the PNG figures into, e.g. imgs/")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results folder {args.results_dir} does not exist; run the comparison first")
    try:
        paths = plot_all(args.results_dir, args.imgs_dir)
    except ValueError as error:
        parser.error(str(error))
    print(*paths, sep="\n")
    several = settings_text(args.results_dir)  # what was drawn, where a series holds several settings
    if several:
        print(several)
    return 0
