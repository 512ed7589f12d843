"""The learning-curve experiment: does full fine-tuning overfit small data where LoRA generalises?
Its records (one ``n<rows>`` results folder per train size) read by the rule written down before the first run
(docs/results.md); ``python -m peft_utils.learning_curve ROOT [IMGS] [--large-end FOLDER]`` prints the readings."""
from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .formatting import format_p_value, format_points
from .report import markdown_table
from .stats import (PairedDifference, crossed_bootstrap, paired_differences, paired_matrices,
                    recorded_labels, run_series, runs_in_group, seed_correctness)
from .store import COMPARISON_GROUP, Results, RunStore

FULL, LORA = "full", "lora:all-linear"  # the primary pair: full fine-tuning against LoRA on every linear layer
MARGIN = 0.005  # "refuted": LoRA's advantage is below half a point, if it has one
CLIMB = 0.05  # a dev-loss rise above the best epoch that counts as overfitting
EPOCH_COLUMNS = ["series", "seed", "epoch", "loss", "accuracy", "train_loss"]


class SizeResult(NamedTuple):
    """One train size: each method's mean dev accuracy with its seeds x sentences interval, and Δ = LoRA - full."""

    rows: int
    seeds: int
    epochs: int
    accuracy: dict[str, PairedDifference]
    delta: PairedDifference
    differences: np.ndarray  # per seed and sentence, LoRA minus full: what Δ(small) - Δ(large) resamples


def size_folders(root: str | Path) -> dict[int, Path]:
    """``{rows: folder}`` for the ``n<rows>`` folders under ``root``, smallest first."""
    found = {int(m.group(1)): path for path in Path(root).iterdir() if (m := re.fullmatch(r"n(\d+)", path.name))}
    if not found:
        raise FileNotFoundError(f"no n<rows> results folder under {root}")
    return dict(sorted(found.items()))


def size_result(results: Results) -> SizeResult | None:
    """The paired comparison of one folder's comparison runs, or ``None`` until both methods share a seed."""
    comparison = runs_in_group(results.runs, COMPARISON_GROUP)
    if comparison.empty:
        return None
    matrices = paired_matrices(seed_correctness(comparison, recorded_labels(comparison)), (LORA, FULL))
    if not matrices:
        return None
    accuracy = {series: crossed_bootstrap([m], [1.0]) for series, m in zip((LORA, FULL), matrices)}
    differences = paired_differences(*matrices)
    return SizeResult(int(comparison["train_size"].iloc[0]), len(matrices[0]), int(comparison["epochs"].iloc[0]),
                      accuracy, crossed_bootstrap([differences], [1.0]), differences)


def shrinking(small: SizeResult, large: SizeResult) -> PairedDifference:
    """Δ(small) - Δ(large): each size's seeds resampled on their own, the shared dev sentences once."""
    return crossed_bootstrap([small.differences, large.differences], [1.0, -1.0])


def rule_reading(sizes: Sequence[SizeResult]) -> str:
    """The rule on the sizes (smallest first): *supported* when Δ(smallest) and Δ(smallest) - Δ(largest) lie wholly
    above 0; *refuted* when Δ's upper bound is below :data:`MARGIN` at the two smallest sizes; else *undecided*."""
    if len(sizes) < 2:
        return "undecided: fewer than two sizes finished"
    smallest, second, largest = sizes[0], sizes[1], sizes[-1]
    if smallest.delta.low > 0 and shrinking(smallest, largest).low > 0:
        return "supported"
    if smallest.delta.high < MARGIN and second.delta.high < MARGIN:
        return "refuted"
    return "undecided"


def epoch_losses(results: Results) -> pd.DataFrame:
    """Per comparison run and epoch end: ``series``, ``seed``, ``epoch``, dev ``loss``, ``accuracy``, ``train_loss``."""
    runs = runs_in_group(results.runs, COMPARISON_GROUP)[["run_id", "seed"]]
    evals = results.evals.dropna(subset=["train_loss"]) if "train_loss" in results.evals else results.evals.head(0)
    frame = evals.merge(runs, on="run_id")
    return frame[EPOCH_COLUMNS].sort_values(["series", "seed", "epoch"])


def climbs(losses: pd.DataFrame) -> pd.DataFrame:
    """Per run (``series``, ``seed``): ``climb`` (the last epoch's dev loss less the lowest) and ``train_falls``
    (the last epoch's training loss below that of the epoch with the lowest dev loss)."""
    runs = losses.groupby(["series", "seed"])
    best, last = (losses.loc[rows].set_index(["series", "seed"]).sort_index()
                  for rows in (runs["loss"].idxmin(), runs.tail(1).index))
    return pd.DataFrame({"climb": last["loss"] - best["loss"],
                         "train_falls": last["train_loss"] < best["train_loss"]}).reset_index()


def overfitting_reading(losses: pd.DataFrame) -> tuple[str, PairedDifference]:
    """Full fine-tuning overfits more than LoRA when its mean climb reaches :data:`CLIMB` while its training loss
    keeps falling, and its climb less LoRA's, paired by seed, lies wholly above 0 (seeds resampled)."""
    paired = climbs(losses).pivot(index="seed", columns="series").dropna()
    difference = (paired["climb"][FULL] - paired["climb"][LORA]).to_numpy()
    result = crossed_bootstrap([difference[:, np.newaxis]], [1.0])
    keeps_falling = paired["train_falls"][FULL].astype(float).mean() > 0.5
    if paired["climb"][FULL].mean() >= CLIMB and keeps_falling and result.low > 0:
        return "full fine-tuning overfits more than LoRA", result
    return ("not shown: LoRA's climb is the larger" if result.high < 0 else "not shown"), result


class Curve(NamedTuple):
    """Finished sizes (smallest first), the large end, the smallest size's epoch losses, the runs (for a footnote)."""

    sizes: list[SizeResult]
    large: SizeResult | None
    losses: pd.DataFrame
    runs: pd.DataFrame


def read_curve(root: str | Path, large_end: str | Path | None = None) -> Curve:
    """The records of ``root``'s ``n<rows>`` folders (sizes without a common seed yet left out) and ``large_end``."""
    loaded = {rows: RunStore(folder).load() for rows, folder in size_folders(root).items()}
    sizes = [result for result in map(size_result, loaded.values()) if result is not None]
    read = [*loaded.values(), *([RunStore(large_end).load()] if large_end else [])]
    losses = epoch_losses(loaded[sizes[0].rows]) if sizes else pd.DataFrame(columns=EPOCH_COLUMNS)
    runs = pd.concat([runs_in_group(results.runs, COMPARISON_GROUP) for results in read])
    return Curve(sizes, size_result(read[-1]) if large_end else None, losses, runs[run_series(runs).isin([FULL, LORA])])


def curve_markdown(curve: Curve) -> str:
    """The table of sizes (accuracies and Δ with their intervals, in points) and the readings, as Markdown."""
    table = pd.DataFrame([{"train rows": f"{s.rows:,}", "epochs": s.epochs, "seeds": s.seeds,
                           "full fine-tuning %": _interval(s.accuracy[FULL]),
                           "LoRA (all-linear) %": _interval(s.accuracy[LORA]),
                           "Δ LoRA − full, pt": _interval(s.delta, signed=True), "p": f"{s.delta.p_value:.2g}"}
                          for s in curve.sizes + ([curve.large] if curve.large else [])])
    lines = [markdown_table(table), f"Rule: **{rule_reading(curve.sizes)}**."]
    if len(curve.sizes) >= 2:
        lines.append(f"Δ({curve.sizes[0].rows:,}) − Δ({curve.sizes[-1].rows:,}): "
                     f"{_points(shrinking(curve.sizes[0], curve.sizes[-1]))} points.")
    if {FULL, LORA} <= set(curve.losses["series"]):
        reading, climb = overfitting_reading(curve.losses)
        lines.append(f"Overfitting at {curve.sizes[0].rows:,} rows: **{reading}** (full fine-tuning's dev-loss climb "
                     f"less LoRA's: {_points(climb, loss=True)}).")
    return "\n\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.learning_curve", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="the folder holding one n<rows> results folder per train size")
    parser.add_argument("imgs", nargs="?", help="where to draw learning_curve.png")
    parser.add_argument("--large-end", help="a results folder of the same pair on much more data (one epoch)")
    args = parser.parse_args(argv)
    curve = read_curve(args.root, args.large_end)
    print(curve_markdown(curve))
    if args.imgs:
        from .plots.accuracy import plot_learning_curve

        print(plot_learning_curve(curve, args.imgs))
    return 0


def _interval(value: PairedDifference, signed: bool = False, decimals: int = 1, loss: bool = False) -> str:
    """``"mean [low, high]"``: accuracy in percentage points, or a loss as it is."""
    mean, low, high = (format_points(v / 100 if loss else v, signed, decimals) for v in value[:3])
    return f"{mean} [{low}, {high}]"


def _points(value: PairedDifference, loss: bool = False) -> str:
    """A difference with its interval (signed, two decimals) and its p."""
    return f"{_interval(value, True, 2, loss)}, {format_p_value(value.p_value)}"


if __name__ == "__main__":
    raise SystemExit(main())
