"""Learning-rate tuning (``lr="tune"``): a fixed rate answers "which method suits this rate?", not "which method is
better?", so each series trains once per rate of its grid and is scored on a balanced held-out slice of the **train**
split (the dev split the comparison reports is never looked at). Tuning runs are ordinary records (group ``"tune"``),
so a resumed experiment chooses again from the records and picks the same rates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from .config import ExperimentConfig
from .data import hold_out, subset
from .stats import numeric_column, run_series

EVAL_SPLIT = "train-holdout"  # what a tuning run's evaluation rows are (recorded as ``eval_split``)
HOLDOUT_SEED = 0  # the held-out slice must not change with the run seed: every rate is scored on the same rows


def tuning_rows(config: ExperimentConfig, train: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train rows, held-out rows)`` of a tuning run: disjoint, from the train split, balanced (or stratified where
    planning found no balanced sample)."""
    holdout_size = config.tune.holdout_size
    size = config.tune.train_size or config.data.train_size
    if holdout_size + (size or 1) > len(train):
        raise ValueError(f"learning-rate tuning needs tune_holdout_size={holdout_size:,} held-out rows plus "
                         f"{size or 1:,} train rows, more than the {len(train):,} rows of the train split")
    stratified = config.stratified_sizes
    try:
        held_out, rest = hold_out(train, holdout_size, HOLDOUT_SEED, "tune_holdout_size" in stratified)
        rows = rest if size is None else subset(rest, size, seed, balanced=True,
                                                stratified="tune_train_size" in stratified)
    except ValueError as error:
        raise ValueError(f"learning-rate tuning rows: {error}") from None
    return rows, held_out


def learning_rate_scores(tune_runs: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    """One row per (series, lr), sorted: ``series``, ``method``, ``lr``, the mean held-out ``accuracy`` and
    ``eval_loss`` over seeds, ``n_seeds``, and ``chosen`` on each series' best rate: the highest accuracy, ties to the
    lower loss (the more confident model), then to the smaller rate (the more conservative update)."""
    frame = pd.DataFrame(tune_runs)
    frame = frame.assign(lr=numeric_column(frame, "lr"), accuracy=numeric_column(frame, "final_accuracy"),
                         eval_loss=numeric_column(frame, "final_eval_loss"), series=run_series(frame))
    frame = frame.dropna(subset=["lr", "accuracy"])
    scores = (frame.groupby(["series", "method", "lr"], sort=True)
              .agg(accuracy=("accuracy", "mean"), eval_loss=("eval_loss", "mean"), n_seeds=("accuracy", "size"))
              .reset_index())
    # Rounding removes only the last-bit noise of averaging over seeds; a missing loss never wins a tie.
    ranked = scores.assign(_accuracy=-scores["accuracy"].round(12), _loss=scores["eval_loss"].fillna(math.inf))
    best = ranked.sort_values(["series", "_accuracy", "_loss", "lr"]).groupby("series").head(1).index
    return scores.assign(chosen=scores.index.isin(best))


def choose_learning_rates(tune_runs: pd.DataFrame | Sequence[dict]) -> dict[str, float]:
    """Each series' chosen rate (:func:`learning_rate_scores`), ``{"lora": 1e-3, "lora:all-linear": 2e-3}``."""
    scores = learning_rate_scores(tune_runs)
    chosen = scores[scores["chosen"]]
    return {str(series): float(lr) for series, lr in zip(chosen["series"], chosen["lr"])}


def widened_grid(grid: Sequence[float], chosen: float) -> tuple[float, ...] | None:
    """The grid with one more rate (a step of its own ratio, three significant digits) past the edge ``chosen`` sits
    on, or ``None``: a best rate at the edge is only the best of those tried, and a method compared short of its
    optimum is compared unfairly. Grids of under three rates are short lists, not brackets."""
    rates = sorted(grid)
    if len(rates) < 3 or rates[0] < chosen < rates[-1]:
        return None
    if chosen == rates[0]:
        return (float(f"{rates[0] * rates[0] / rates[1]:.3g}"), *rates)
    return (*rates, float(f"{rates[-1] * rates[-1] / rates[-2]:.3g}"))
