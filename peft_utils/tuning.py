"""Learning-rate tuning (``lr="tune"``): every method gets its own best rate, chosen the same way for all.

A fixed rate for every method answers "which method suits this rate?", not "which method is better?". With
``lr="tune"`` each method trains once per rate of its grid (``config.tune.grid``) and is scored on a held-out
slice of the **train** split; the rate with the best held-out accuracy is then used for every seed.

Which rows: the held-out slice is a balanced sample of ``tune.holdout_size`` train rows, fixed for every method and
seed (drawn with :data:`HOLDOUT_SEED`); a tuning run trains on ``tune.train_size`` rows drawn from the *other* train
rows, with the experiment's first seed and the comparison's schedule. The dev split, which the comparison reports,
is never looked at, so the reported accuracies are not tuned on. The final comparison still trains on its own rows
(with ``train_size="all"`` these include the held-out slice: the slice is held out from tuning, not from training).

Tuning runs are ordinary run records in group :data:`TUNE_GROUP`: their ``final_accuracy`` is the held-out accuracy
(``eval_split`` says so), and :func:`choose_learning_rates` reads them back, so a resumed experiment chooses again
from the records alone and picks the same rates; the learning-rate figure draws :func:`learning_rate_scores`, the
same scores the choice is made from.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from .config import ExperimentConfig
from .data import hold_out, subset
from .methods import series_name
from .stats import numeric_column
from .store import TUNE_GROUP

EVAL_SPLIT = "train-holdout"  # what a tuning run's evaluation rows are (recorded as ``eval_split``)
HOLDOUT_SEED = 0  # the held-out slice must not change with the run seed: every rate is scored on the same rows


def tuning_rows(config: ExperimentConfig, train: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train rows, held-out rows)`` of a tuning run: disjoint, both from the train split; each balanced, or
    stratified where planning found no balanced one meets a size the user left to the profile."""
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
    """The tuning grid's scores: one row per (series, lr) with the mean held-out accuracy and loss over seeds; a
    series is a method on a target set (:func:`~peft_utils.methods.series_name`: ``"lora"``, ``"lora:all-linear"``).

    Columns ``series``, ``method``, ``lr``, ``accuracy``, ``eval_loss``, ``n_seeds`` and ``chosen`` (True on each
    series' rate picked by :func:`choose_learning_rates`), sorted by series and rate. Runs without an accuracy are
    left out.
    """
    frame = pd.DataFrame(tune_runs)
    missing = [c for c in ("method", "lr", "final_accuracy") if c not in frame.columns]
    if missing:
        raise ValueError(f"tuning runs need the fields method, lr and final_accuracy; missing: {', '.join(missing)}")
    targets = frame["targets"] if "targets" in frame.columns else [None] * len(frame)
    frame = frame.assign(lr=numeric_column(frame, "lr"), accuracy=numeric_column(frame, "final_accuracy"),
                         eval_loss=numeric_column(frame, "final_eval_loss"),
                         series=[series_name(m, t) for m, t in zip(frame["method"], targets)])
    frame = frame.dropna(subset=["lr", "accuracy"])
    if frame.empty:
        return pd.DataFrame(columns=["series", "method", "lr", "accuracy", "eval_loss", "n_seeds", "chosen"])
    scores = (frame.groupby(["series", "method", "lr"], sort=True)
              .agg(accuracy=("accuracy", "mean"), eval_loss=("eval_loss", "mean"), n_seeds=("accuracy", "size"))
              .reset_index())
    # Held-out accuracies are counts over the same rows, so equal counts are exact ties; rounding only removes the
    # last-bit noise of averaging over seeds. A missing loss never wins a tie.
    scores["chosen"] = False
    rank_key = scores.assign(_accuracy=-scores["accuracy"].round(12), _loss=scores["eval_loss"].fillna(math.inf))
    best = rank_key.sort_values(["series", "_accuracy", "_loss", "lr"]).groupby("series").head(1).index
    scores.loc[best, "chosen"] = True
    return scores


def choose_learning_rates(tune_runs: pd.DataFrame | Sequence[dict]) -> dict[str, float]:
    """Each series' learning rate from its tuning runs (``{"lora": 1e-3, "lora:all-linear": 2e-3}``): the highest
    held-out accuracy (mean over seeds).

    Ties go to the lower held-out loss (the more confident correct model), then to the smaller rate (the more
    conservative update). ``tune_runs``: the tuning runs' records (a run table or a list of dicts) with
    ``method``, ``lr``, ``final_accuracy`` and optionally ``final_eval_loss``; they are scored on the held-out
    slice of the train split, never on dev, so the choice does not peek at the reported split.
    """
    scores = learning_rate_scores(tune_runs)
    chosen = scores[scores["chosen"]]
    return {str(series): float(lr) for series, lr in zip(chosen["series"], chosen["lr"])}


__all__ = ["TUNE_GROUP", "EVAL_SPLIT", "HOLDOUT_SEED", "tuning_rows", "learning_rate_scores", "choose_learning_rates"]
