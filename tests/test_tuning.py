"""Learning-rate tuning (``lr="tune"``): held-out train rows, never dev; each method's best rate; resumable."""
from __future__ import annotations

import pandas as pd
import pytest

from peft_utils import experiment
from peft_utils.config import TUNE, make_config
from peft_utils.data import hold_out, load_sst2
from peft_utils.experiment import plan_experiment, run_comparison
from peft_utils.store import TUNE_GROUP, RunStore, read_events
from peft_utils.tuning import EVAL_SPLIT, choose_learning_rates, learning_rate_scores, tuning_rows, widened_grid

GRID = {"full": [1e-4, 3e-3], "lora": [1e-3, 3e-2]}


def _tune(results, data_dir, **parameters):
    settings = {"methods": ["full", "lora"], "lr": TUNE, "lr_grid": GRID, "train_size": 16, "eval_size": 16,
                "max_length": 24, "sweep": False, "tune_holdout_size": 32}
    return make_config("smoke", data_dir=str(data_dir), results_dir=str(results), **{**settings, **parameters})


def test_held_out_rows_are_balanced_and_disjoint_from_the_rest():
    frame = pd.DataFrame({"row": range(100), "label": [i % 3 == 0 for i in range(100)]}).astype({"label": int})
    held_out, rest = hold_out(frame, 20, seed=0)
    assert held_out["label"].value_counts().tolist() == [10, 10]
    assert set(held_out["row"]).isdisjoint(rest["row"]) and len(held_out) + len(rest) == 100
    assert held_out["row"].is_monotonic_increasing and rest["row"].is_monotonic_increasing  # file order kept


def test_tuning_trains_and_scores_on_train_rows_only(sst2_dir):
    config = _tune("unused", sst2_dir)
    splits = load_sst2(sst2_dir)
    rows, held_out = tuning_rows(config, splits["train"].assign(row=range(len(splits["train"]))), seed=0)
    assert (len(rows), len(held_out)) == (16, 32)
    assert set(rows["row"]).isdisjoint(held_out["row"])  # scored on rows it never trained on
    assert set(held_out["sentence"]).isdisjoint(splits["dev"]["sentence"])  # and never on the reported split
    with pytest.raises(ValueError, match="tune_holdout_size=67,349 held-out rows plus 16 train rows"):
        tuning_rows(_tune("unused", sst2_dir, tune_holdout_size=67349), splits["train"], seed=0)


def test_the_config_says_tune_and_checks_the_grid(sst2_dir):
    config = _tune("unused", sst2_dir)
    assert config.tune.enabled and config.tune.grid["lora"] == (1e-3, 3e-2)
    with pytest.raises(ValueError, match=r"lr_grid\['lora'\] has 1 rate: give at least two"):
        _tune("unused", sst2_dir, lr_grid={"lora": [1e-3]})
    with pytest.raises(ValueError, match="unknown method"):
        _tune("unused", sst2_dir, lr_grid={"lorra": [1e-3, 1e-2]})


def test_each_method_gets_its_best_held_out_rate_and_a_resume_keeps_it(tmp_path, sst2_dir, monkeypatch):
    config = _tune(tmp_path, sst2_dir)
    plan = plan_experiment(config)
    tuning = [r for r in plan.runs if r.spec.group == TUNE_GROUP]
    assert [(r.spec.method, r.record["lr"]) for r in tuning] == [(m, lr) for m in GRID for lr in GRID[m]]
    assert all(r.record["lr"] is None for r in plan.runs if r.spec.group != TUNE_GROUP)  # chosen after tuning

    table = run_comparison(config)
    assert list(table["group"].unique()) == ["comparison"]
    tuned = RunStore(tmp_path).load().runs.query("group == 'tune'")
    assert set(tuned["eval_split"]) == {EVAL_SPLIT} and set(tuned["eval_size"]) == {32}
    best = {m: rows.sort_values(["final_accuracy", "final_eval_loss", "lr"], ascending=[False, True, True])["lr"].iloc[0]
            for m, rows in tuned.groupby("method")}
    assert choose_learning_rates(tuned) == best
    assert dict(zip(table["method"], table["lr"])) == best
    config_event = next(e for e in read_events(tmp_path / f"{table['run_id'][1]}.jsonl") if e["event"] == "config")
    assert config_event["lr_source"] == TUNE_GROUP

    monkeypatch.setattr(experiment, "train", _fail)  # a resume chooses again from the records, trains nothing
    again = run_comparison(config)
    assert dict(zip(again["method"], again["lr"])) == best


def test_tuning_over_several_seeds_trains_each_rate_on_each(tmp_path, sst2_dir):
    """tune_seeds=[0, 1]: every grid point on both seeds (the same held-out rows score them, other train rows train
    them); the rate is then chosen on the mean (test_choose_learning_rates_breaks_ties_by_loss_then_smaller_rate)."""
    plan = plan_experiment(_tune(tmp_path, sst2_dir, tune_seeds=[0, 1]))
    tuning = [r for r in plan.runs if r.spec.group == TUNE_GROUP]
    assert [(r.spec.seed, r.spec.method, r.record["lr"]) for r in tuning] == [
        (seed, m, lr) for seed in (0, 1) for m in GRID for lr in GRID[m]]
    assert len({r.run_id for r in tuning}) == len(tuning)
    held_out = {seed: r.eval_frame["sentence"].tolist() for r in tuning for seed in [r.spec.seed]}
    assert held_out[0] == held_out[1]
    trained = {r.spec.seed: set(r.train_frame["sentence"]) for r in tuning}
    assert trained[0] != trained[1] and not trained[0] & set(held_out[0])
    with pytest.raises(ValueError, match="tune_seeds has no effect unless lr='tune'"):
        make_config("smoke", tune_seeds=[0, 1])


def _fail(*args, **kwargs):
    raise AssertionError("a run was trained although it should not have been")


def test_choose_learning_rates_breaks_ties_by_loss_then_smaller_rate() -> None:
    runs = [
        # full: 1e-4 wins on mean accuracy over two seeds even though 3e-4 has the best single seed.
        {"method": "full", "lr": 1e-4, "seed": 0, "final_accuracy": 0.90, "final_eval_loss": 0.3},
        {"method": "full", "lr": 1e-4, "seed": 1, "final_accuracy": 0.90, "final_eval_loss": 0.3},
        {"method": "full", "lr": 3e-4, "seed": 0, "final_accuracy": 0.93, "final_eval_loss": 0.2},
        {"method": "full", "lr": 3e-4, "seed": 1, "final_accuracy": 0.85, "final_eval_loss": 0.2},
        # lora: equal accuracy, 2e-3 has the lower loss.
        {"method": "lora", "lr": 1e-3, "final_accuracy": 0.88, "final_eval_loss": 0.35},
        {"method": "lora", "lr": 2e-3, "final_accuracy": 0.88, "final_eval_loss": 0.30},
        {"method": "lora", "lr": 4e-3, "final_accuracy": 0.80, "final_eval_loss": 0.10},
        # dora: equal accuracy and loss: the smaller rate; a run without a loss never wins the tie.
        {"method": "dora", "lr": 5e-3, "final_accuracy": 0.87, "final_eval_loss": 0.3},
        {"method": "dora", "lr": 1e-3, "final_accuracy": 0.87, "final_eval_loss": 0.3},
        {"method": "dora", "lr": 1e-4, "final_accuracy": 0.87, "final_eval_loss": None},
    ]
    assert choose_learning_rates(runs) == {"full": 1e-4, "lora": 2e-3, "dora": 1e-3}
    assert choose_learning_rates(pd.DataFrame(runs)) == choose_learning_rates(runs)
    scores = learning_rate_scores(runs)
    full = scores[scores["method"] == "full"].set_index("lr")
    assert full.loc[3e-4, "accuracy"] == pytest.approx(0.89) and full.loc[1e-4, "n_seeds"] == 2
    assert scores["chosen"].sum() == 3


def test_a_grid_is_widened_past_the_edge_its_winner_sits_on():
    assert widened_grid([1e-3, 2e-3, 4e-3], 4e-3) == (1e-3, 2e-3, 4e-3, 8e-3)  # x2, the grid's own step
    assert widened_grid([1e-3, 3e-3, 1e-2], 1e-3) == (3.33e-4, 1e-3, 3e-3, 1e-2)  # /3, three significant digits
    assert widened_grid([1e-3, 2e-3, 4e-3], 2e-3) is None  # inside: bracketed
    assert widened_grid([1e-3, 1e-2], 1e-3) is None  # two rates are a short list, every rate an edge


def test_tuning_widens_its_grid_until_the_winner_lies_inside(tmp_path, sst2_dir):
    """A tuned rate on its grid's edge is only the best of those tried: the experiment tries the next rate past it
    before any comparison run, at most GRID_WIDENINGS times, and the comparison uses the widened grid's winner."""
    grid = [1e-4, 1e-3, 1e-2]
    table = run_comparison(_tune(tmp_path, sst2_dir, methods=["lora"], lr_grid={"lora": grid}))
    tried = sorted(RunStore(tmp_path).load().runs.query("group == 'tune'")["lr"])
    added = [rate for rate in tried if rate not in grid]
    assert len(added) <= experiment.GRID_WIDENINGS
    below = sorted((rate for rate in added if rate < min(grid)), reverse=True)
    above = sorted(rate for rate in added if rate > max(grid))
    assert len(below) + len(above) == len(added)  # each one step of 10 past the grid as it stood
    assert below == pytest.approx([min(grid) / 10 ** k for k in range(1, len(below) + 1)])
    assert above == pytest.approx([max(grid) * 10 ** k for k in range(1, len(above) + 1)])
    chosen = table["lr"].iloc[0]
    assert chosen == choose_learning_rates(RunStore(tmp_path).load().runs.query("group == 'tune'"))["lora"]
    assert min(tried) < chosen < max(tried) or len(added) == experiment.GRID_WIDENINGS
