"""Target sets as an axis of one experiment (``targets=["attn", "all-linear"]``): every adapter method runs on each
set, full fine-tuning once; run ids, records, series and learning-rate tuning keep the sets apart."""
from __future__ import annotations

import pytest

from peft_utils import experiment
from peft_utils.config import TUNE, make_config
from peft_utils.experiment import plan_experiment, run_comparison
from peft_utils.methods import series_method, series_name, targets_label, targets_slug
from peft_utils.store import TUNE_GROUP, RunStore, read_events, setting_id
from peft_utils.tuning import choose_learning_rates

SETTINGS = {"train_size": 16, "eval_size": 16, "max_length": 24, "sweep": False}


def _config(results, data_dir, **parameters):
    return make_config("smoke", data_dir=str(data_dir), results_dir=str(results), **{**SETTINGS, **parameters})


@pytest.mark.parametrize("targets, label, series", [
    (None, "", "lora"), ("all-linear", "all-linear", "lora:all-linear"), (["query", "value"], "query+value",
                                                                           "lora:query+value"),
    ("q_.*", "q_.*", "lora:q_.*"),
])
def test_a_series_is_a_method_on_a_target_set(targets, label, series):
    assert targets_label(targets) == label and series_name("lora", targets) == series
    assert series_method(series) == "lora"


def test_each_adapter_method_runs_on_each_set_and_full_fine_tuning_once(tmp_path, sst2_dir):
    config = _config(tmp_path, sst2_dir.parent, methods=["full", "lora", "qlora"], targets=[None, "all-linear"],
                     seeds=[0, 1])
    plan = plan_experiment(config)
    assert [r.run_id for r in plan.runs if r.spec.seed == 0] == [
        "comparison-full-s0-random-gpt2-tiny",
        "comparison-lora-r4-a8-s0-random-gpt2-tiny", "comparison-lora-all-linear-r4-a8-s0-random-gpt2-tiny",
        "comparison-qlora-r4-a8-s0-random-gpt2-tiny", "comparison-qlora-all-linear-r4-a8-s0-random-gpt2-tiny",
    ]
    assert len(plan.runs) == 10 and {r.record["targets"] for r in plan.runs} == {None, "all-linear"}
    assert targets_slug("h\\.0\\..*") == "re-" + __import__("hashlib").sha1(b"h\\.0\\..*").hexdigest()[:8]


def test_a_target_set_that_matches_nothing_names_itself(tmp_path, sst2_dir):
    config = _config(tmp_path, sst2_dir.parent, methods=["lora"], targets=[["c_attn"], ["q_proj"]])
    with pytest.raises(ValueError, match=r"^targets=\('q_proj',\) for random-gpt2-tiny: no module matched"):
        plan_experiment(config)


def test_tuning_chooses_a_rate_per_method_and_target_set(tmp_path, sst2_dir, monkeypatch):
    """Each series is tuned on its own: the rate chosen for LoRA on all linear layers is not LoRA's on the default
    set, and every run takes its own series' rate."""
    config = _config(tmp_path, sst2_dir.parent, methods=["lora"], targets=[None, "all-linear"], lr=TUNE,
                     lr_grid={"lora": [1e-3, 3e-2]}, tune_holdout_size=32)
    plan = plan_experiment(config)
    tuning = [(r.spec.method, r.record["targets"], r.record["lr"]) for r in plan.runs if r.spec.group == TUNE_GROUP]
    assert tuning == [("lora", None, 1e-3), ("lora", None, 3e-2), ("lora", "all-linear", 1e-3),
                      ("lora", "all-linear", 3e-2)]

    chosen = {"lora": 1e-3, "lora:all-linear": 3e-2}
    monkeypatch.setattr(experiment, "choose_learning_rates", lambda runs: chosen)
    table = run_comparison(config)
    assert dict(zip(table["run_id"], table["lr"])) == {
        "comparison-lora-r4-a8-s0-random-gpt2-tiny": 1e-3, "comparison-lora-all-linear-r4-a8-s0-random-gpt2-tiny": 3e-2}


def test_the_best_rate_is_chosen_within_each_series():
    def run(targets, lr, accuracy):
        return {"method": "lora", "targets": targets, "lr": lr, "final_accuracy": accuracy, "final_eval_loss": 1.0}

    runs = [run(None, 1e-3, 0.9), run(None, 3e-2, 0.5), run("all-linear", 1e-3, 0.5), run("all-linear", 3e-2, 0.9),
            run(["query"], 1e-3, 0.7), run(["query"], 3e-2, 0.6), {**run(None, 1e-4, 0.8), "method": "full"}]
    assert choose_learning_rates(runs) == {"lora": 1e-3, "lora:all-linear": 3e-2, "lora:query": 1e-3, "full": 1e-4}


def test_runs_of_two_target_sets_are_two_series_in_one_folder(tmp_path, sst2_dir):
    """A folder may hold LoRA on the default layers and on all linear layers; another setting of one set is a new
    setting of that set's series, planned beside its finished run."""
    run_comparison(_config(tmp_path, sst2_dir.parent, methods=["lora"], targets="all-linear"))
    run_comparison(_config(tmp_path, sst2_dir.parent, methods=["lora"]))  # another series
    events = read_events(tmp_path / "comparison-lora-all-linear-r4-a8-s0-random-gpt2-tiny.jsonl")
    assert events[0]["targets"] == "all-linear"
    assert set(RunStore(tmp_path).load().runs["series"]) == {"lora", "lora:all-linear"}
    [run] = plan_experiment(_config(tmp_path, sst2_dir.parent, methods=["lora"], targets="all-linear",
                                    dropout=0.1)).runs
    assert not run.complete and run.run_id == f"{run.name}-{setting_id(run.record)}"
