"""The learning-curve experiment's reading: Δ(n) from the records, the rule fixed before its runs, overfitting."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from peft_utils import learning_curve
from peft_utils.config import make_config
from peft_utils.experiment import run_comparison
from peft_utils.learning_curve import (FULL, LORA, SizeResult, climbs, epoch_losses, overfitting_reading,
                                       rule_reading, size_folders, size_result)
from peft_utils.stats import PairedDifference
from peft_utils.store import RunStore


@pytest.fixture(scope="module")
def curve_root(tmp_path_factory, sst2_dir):
    """Two sizes of the smoke profile, full fine-tuning and all-linear LoRA, two seeds, two epochs each."""
    root = tmp_path_factory.mktemp("curve")
    for rows in (16, 32):
        run_comparison(make_config("smoke", data_dir=str(sst2_dir.parent), results_dir=str(root / f"n{rows}"),
                                   methods=["full", "lora"], targets="all-linear", train_size=rows, epochs=2,
                                   seeds=[0, 1], sweep=False, max_length=24, eval_size=32))
    return root


def test_delta_is_lora_minus_full_paired_by_seed_from_the_records(curve_root):
    assert list(size_folders(curve_root)) == [16, 32]
    results = RunStore(curve_root / "n16").load()
    size = size_result(results)
    runs = results.runs.set_index(["series", "seed"])["final_accuracy"]
    per_seed = [runs[(LORA, s)] - runs[(FULL, s)] for s in (0, 1)]
    assert (size.rows, size.seeds, size.epochs) == (16, 2, 2)
    assert size.delta.difference == pytest.approx(np.mean(per_seed))
    assert size.accuracy[FULL].difference == pytest.approx(runs[(FULL, 0)] / 2 + runs[(FULL, 1)] / 2)
    assert size.delta.low <= size.delta.difference <= size.delta.high
    assert size.differences.shape == (2, 32)


def test_every_epoch_has_dev_and_training_loss_and_the_climb_is_read_from_them(curve_root):
    losses = epoch_losses(RunStore(curve_root / "n16").load())
    assert len(losses) == 2 * 2 * 2 and losses["train_loss"].notna().all()  # methods x seeds x epochs
    run = losses[(losses["series"] == FULL) & (losses["seed"] == 0)]
    climb = climbs(losses).set_index(["series", "seed"]).loc[(FULL, 0)]
    assert climb["climb"] == pytest.approx(run["loss"].iloc[-1] - run["loss"].min())
    best = run.loc[run["loss"].idxmin()]
    assert climb["train_falls"] == (run["train_loss"].iloc[-1] < best["train_loss"])


def test_the_command_prints_the_table_and_readings_and_draws(curve_root, tmp_path, capsys):
    assert learning_curve.main([str(curve_root), str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Rule: **" in printed and "Overfitting at 16 rows: **" in printed and "Δ(16) − Δ(32)" in printed
    assert (tmp_path / "learning_curve.png").stat().st_size > 10_000


def _size(rows: int, delta: tuple[float, float, float], differences: float) -> SizeResult:
    return SizeResult(rows, 8, 5, {}, PairedDifference(*delta, 0.5), np.full((8, 100), differences))


@pytest.mark.parametrize(("deltas", "expected"), [
    # LoRA ahead at 250 rows, by more than at 4,000 (per-sentence differences 0.03 against 0.0): supported
    ([(0.03, 0.01, 0.05), (0.01, -0.01, 0.03), (0.0, -0.01, 0.01)], "supported"),
    # ahead at 250, but no less at 4,000: the gap does not shrink with data
    ([(0.03, 0.01, 0.05), (0.03, 0.01, 0.05), (0.03, 0.01, 0.05)], "undecided"),
    # upper bounds below +0.5 pt at 250 and 1,000 rows: refuted
    ([(-0.01, -0.02, 0.004), (-0.01, -0.02, 0.0049), (0.0, -0.01, 0.01)], "refuted"),
    ([(-0.01, -0.02, 0.004), (0.0, -0.01, 0.006), (0.0, -0.01, 0.01)], "undecided"),
])
def test_the_rule_fixed_before_the_runs(deltas, expected):
    sizes = [_size(rows, delta, delta[0]) for rows, delta in zip((250, 1000, 4000), deltas)]
    assert rule_reading(sizes) == expected
    assert rule_reading(sizes[:1]).startswith("undecided")


def test_overfitting_needs_a_climb_falling_training_loss_and_a_paired_margin():
    def losses(full_dev, lora_dev, seeds=6):
        rows = []
        for seed in range(seeds):
            for series, dev in ((FULL, full_dev), (LORA, lora_dev)):
                for epoch, loss in enumerate(dev, start=1):
                    rows.append({"series": series, "seed": seed, "epoch": epoch, "loss": loss + 0.001 * seed,
                                 "accuracy": 0.8, "train_loss": 1.0 / epoch})
        return pd.DataFrame(rows)

    reading, climb = overfitting_reading(losses([0.5, 0.4, 0.45, 0.5, 0.6], [0.5, 0.45, 0.42, 0.41, 0.40]))
    assert reading == "full fine-tuning overfits more than LoRA" and climb.difference == pytest.approx(0.2)
    reading, _ = overfitting_reading(losses([0.5, 0.4, 0.42, 0.43, 0.43], [0.5, 0.45, 0.42, 0.41, 0.40]))
    assert reading == "not shown"  # a climb of 0.03: under the 0.05 that counts
    reading, climb = overfitting_reading(losses([0.5, 0.45, 0.42, 0.41, 0.40], [0.5, 0.4, 0.45, 0.5, 0.6]))
    assert reading == "not shown: LoRA's climb is the larger" and climb.high < 0
