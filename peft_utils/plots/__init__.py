"""Figures drawn only from the saved run records (:mod:`peft_utils.store`), never inside the training loop: every
figure is reproducible from ``results/`` alone (``python -m peft_utils.plots results/ imgs/``), so a crashed notebook,
an extra seed or a tweak to a figure never requires re-training.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from peft_utils.plots.accuracy import plot_accuracy, plot_learning_curve, plot_loss, plot_settings
from peft_utils.plots.cost import plot_cost, plot_pareto
from peft_utils.plots.grids import plot_lr_tuning, plot_sweep
from peft_utils.report import settings_text
from peft_utils.store import RunStore

__all__ = ["plot_loss", "plot_accuracy", "plot_cost", "plot_pareto", "plot_sweep", "plot_lr_tuning", "plot_settings",
           "plot_learning_curve", "plot_all", "main"]

FIGURES = (plot_loss, plot_accuracy, plot_cost, plot_pareto, plot_sweep, plot_lr_tuning)


def plot_all(results_dir: str | Path, imgs_dir: str | Path, run_ids: Sequence[str] | None = None) -> list[Path]:
    """Each figure whose inputs ``results_dir`` holds, of the runs ``run_ids`` (else each series' setting asked for
    last). ``ValueError`` when no run is complete: an empty figure set would otherwise look like a success."""
    store = RunStore(results_dir)
    results = store.load(run_ids)
    if results.runs.empty:
        raise ValueError(f"no complete run in {results_dir} (a run is complete once its summary is written); "
                         "run the comparison first")
    paths = [figure(results, imgs_dir) for figure in FIGURES]
    paths.append(plot_settings(store.load(every_setting=True), imgs_dir))
    return [path for path in paths if path is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m peft_utils.plots RESULTS_DIR IMGS_DIR`` regenerates every figure from saved runs."""
    parser = argparse.ArgumentParser(prog="python -m peft_utils.plots",
                                     description="Regenerate every comparison figure from saved run records.")
    parser.add_argument("results_dir", type=Path, help="folder of <run_id>.jsonl run records, e.g. results/")
    parser.add_argument("imgs_dir", type=Path, help="folder to write the PNG figures into, e.g. imgs/")
    args = parser.parse_args(argv)
    try:
        paths = plot_all(args.results_dir, args.imgs_dir)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(*paths, sep="\n")
    several = settings_text(args.results_dir)  # what was drawn, where a series holds several settings
    if several:
        print(several)
    return 0
