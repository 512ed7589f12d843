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
(``eval_split`` says so), and :func:`~peft_utils.stats.choose_learning_rates` reads them back, so a resumed experiment chooses again
from the records alone and picks the same rates.
"""
from __future__ import annotations

import pandas as pd

from .config import ExperimentConfig
from .data import hold_out, subset
from .store import TUNE_GROUP

EVAL_SPLIT = "train-holdout"  # what a tuning run's evaluation rows are (recorded as ``eval_split``)
HOLDOUT_SEED = 0  # the held-out slice must not change with the run seed: every rate is scored on the same rows


def tuning_rows(config: ExperimentConfig, train: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train rows, held-out rows)`` of a tuning run: disjoint, both from the train split."""
    holdout_size = config.tune.holdout_size
    size = config.tune.train_size or config.data.train_size
    if holdout_size + (size or 1) > len(train):
        raise ValueError(f"learning-rate tuning needs tune_holdout_size={holdout_size:,} held-out rows plus "
                         f"{size or 1:,} train rows, more than the {len(train):,} rows of the train split")
    try:
        held_out, rest = hold_out(train, holdout_size, HOLDOUT_SEED)
        rows = rest if size is None else subset(rest, size, seed, balanced=True)
    except ValueError as error:
        raise ValueError(f"learning-rate tuning rows: {error}") from None
    return rows, held_out


__all__ = ["TUNE_GROUP", "EVAL_SPLIT", "HOLDOUT_SEED", "tuning_rows"]
