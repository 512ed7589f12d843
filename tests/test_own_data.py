"""Your data just works (issue 37): the sizes a profile chose for SST-2 fit a user's own small, 3-class file, said in
one line; a size the user set that the data cannot meet is still refused in one line; no library progress bars."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peft_utils import experiment
from peft_utils.config import make_config
from peft_utils.data import rows_per_class, subset
from peft_utils.experiment import plan_experiment
from peft_utils.store import RunStore

WORDS = {"bad": "awful dull boring", "ok": "plain ordinary average", "good": "great lovely fine"}
# 240 rows, no validation file: a stratified 10% (8 rows a class) is carved off to score the runs, 216 train.
FLAGS = ["--text-column", "review", "--label-column", "stars"]


@pytest.fixture
def reviews(tmp_path) -> Path:
    """A 3-class CSV of 240 rows, columns ``review`` and ``stars`` (names, not numbers)."""
    path = tmp_path / "reviews.csv"
    pd.DataFrame([{"review": f"{WORDS[stars]} film number {i}", "stars": stars}
                  for i in range(80) for stars in WORDS]).to_csv(path, index=False)
    return path


def _adapted(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("sizes adapted to the data: ")]


def _plan(profile: str, reviews: Path, tmp_path: Path, capsys, **parameters) -> tuple[experiment.Plan, list[str]]:
    config = make_config(profile, dataset=str(reviews), text_column="review", label_column="stars",
                         results_dir=str(tmp_path / "results"), **parameters)
    plan = plan_experiment(config)
    return plan, _adapted(capsys.readouterr().out)


def test_the_smoke_profile_plans_a_small_three_class_csv(reviews, tmp_path, capsys):
    plan, lines = _plan("smoke", reviews, tmp_path, capsys)
    assert lines == ["sizes adapted to the data: train_size 32 stratified over 3 classes, eval_size 32 -> 24 "
                     "(all rows)"]
    for run in plan.runs:  # the records say what was used: 32 train rows of every class, all 24 dev rows
        assert (run.record["train_size"], run.record["eval_size"]) == (32, 24)
        assert sorted(run.train_frame["label"].value_counts()) == [10, 11, 11]
    plan_experiment(plan.config)  # planned again (a widened tuning grid): the same rows, and nothing more to say
    assert not _adapted(capsys.readouterr().out)


def test_the_cpu_profile_plans_it_with_only_the_dataset_flags(reviews, tmp_path, capsys, minilm_dir):
    plan, lines = _plan("cpu", reviews, tmp_path, capsys)
    assert lines == ["sizes adapted to the data: train_size 4,000 -> 216 (all rows), sweep_train_size 2,000 -> 216 "
                     "(all rows)"]
    assert {(r.spec.group, r.record["train_size"], r.record["eval_size"]) for r in plan.runs} == {
        ("comparison", 216, 24), ("sweep", 216, 24)}


def test_learning_rate_tuning_holds_out_a_share_of_a_small_train_split(reviews, tmp_path, capsys):
    plan, lines = _plan("smoke", reviews, tmp_path, capsys, methods=["lora"], lr="tune", sweep=False)
    tuning = [r for r in plan.runs if r.spec.group == "tune"]
    assert {(r.record["train_size"], r.record["eval_size"]) for r in tuning} == {(32, 16)}
    assert set(tuning[0].train_frame["sentence"]).isdisjoint(tuning[0].eval_frame["sentence"])
    assert "tune_holdout_size 16 stratified over 3 classes" in lines[0]


def test_a_csv_trains_end_to_end_saying_so_in_one_line_and_no_library_bars(reviews, tmp_path, capsys):
    results = tmp_path / "results"
    code = experiment.main(["--profile", "smoke", "--dataset", str(reviews), *FLAGS, "--methods", "lora",
                            "--no-sweep", "--no-figures", "--results-dir", str(results)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert len(_adapted(captured.out)) == 1
    assert captured.out.index("sizes adapted to the data") < captured.out.index("[run 1/1]")
    for bar in ("Generating train split", "Map", "Loading weights"):  # datasets' and transformers' bars
        assert bar not in captured.err + captured.out
    record = RunStore(results).load().runs.iloc[0]
    assert (record["train_size"], len(record["eval_labels"])) == (32, 24)


def test_a_train_size_the_user_set_beyond_the_data_is_refused_in_one_line(reviews, tmp_path, capsys):
    code = experiment.main(["--profile", "smoke", "--dataset", str(reviews), *FLAGS, "--train-size", "500",
                            "--no-sweep", "--results-dir", str(tmp_path / "results")])
    captured = capsys.readouterr()
    assert code == 2 and not _adapted(captured.out)
    assert captured.err == ("error: train_size=500 is more than the 216 rows of the train split; ask for at most 216 "
                            "or 'all'\n")


def test_sst2_with_the_profiles_sizes_adapts_nothing(sst2_dir, tmp_path, capsys):
    config = make_config("smoke", data_dir=str(sst2_dir.parent), results_dir=str(tmp_path))
    plan = plan_experiment(config)
    assert not _adapted(capsys.readouterr().out) and not plan.config.stratified_sizes


def test_stratified_subsets_keep_every_class_in_proportion_and_follow_the_seed():
    frame = pd.DataFrame({"sentence": [f"s{i}" for i in range(153)], "label": [0] * 100 + [1] * 50 + [2] * 3})
    first = subset(frame, 32, seed=1, stratified=True)
    assert first["label"].value_counts().to_dict() == {0: 21, 1: 10, 2: 1}  # the rare class keeps a row
    pd.testing.assert_frame_equal(first, subset(frame, 32, seed=1, stratified=True))
    assert not first.equals(subset(frame, 32, seed=2, stratified=True))
    assert rows_per_class(np.array([72, 72, 72]), 32, stratified=True).tolist() == [11, 11, 10]
    assert rows_per_class(np.array([5, 5, 1]), 11, stratified=True).tolist() == [5, 5, 1]  # every row
    with pytest.raises(ValueError, match="not divisible"):
        rows_per_class(np.array([72, 72, 72]), 32)  # a balanced one is still refused
