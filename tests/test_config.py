"""The typed configuration: every value checked when it is made, one table behind the notebook, the CLI and the
records, and the profiles as instances of it."""
from __future__ import annotations

import ast
import json
from dataclasses import replace

import pytest

from conftest import REPO_ROOT
from peft_utils import experiment
from peft_utils.config import (
    PARAMETERS,
    PROFILES,
    ExperimentConfig,
    TrainConfig,
    make_config,
    NOTEBOOK_PARAMETERS,
    notebook_values,
    resolve_profile,
)

# What used to pass silently (and train something else), each with the message it must now give.
SILENT_BEFORE = [
    ({"rank": 2.5}, "rank must be a positive integer, got 2.5"),
    ({"rank": True}, "rank must be a positive integer, got True"),
    ({"sweep_ranks": [2.5]}, "sweep_ranks must be a positive integer, got 2.5"),
    ({"lr": {"lroa": 5e-4}}, "lr names unknown method(s) 'lroa'"),
    ({"methods": []}, "methods is empty"),
    ({"seeds": [0, 0]}, "seeds lists 0 more than once"),
    ({"seeds": [-1]}, "seeds must be non-negative integers, got -1"),
    ({"seeds": [1.5]}, "seeds must be non-negative integers, got 1.5"),
    ({"alpha": 0}, "alpha must be a positive number, got 0"),
    ({"alpha": True}, "alpha must be a positive number, got True"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"lr": {"lora": 0}}, "lr['lora'] must be a positive number"),
    ({"train_size": 2.5}, "train_size must be a positive number of rows or 'all', got 2.5"),
    ({"eval_size": 0}, "eval_size must be a positive number of rows or 'all', got 0"),
    ({"epochs": 1.0}, "epochs must be a positive integer, got 1.0"),
    ({"sweep_alpha_ratios": []}, "sweep_alpha_ratios is empty"),
    ({"targets": []}, "targets is empty"),
    ({"device": "tpu"}, "device must be one of"),
    ({"learning_rate": 1e-3}, "unknown parameter(s) 'learning_rate'; known: model, methods"),
]


@pytest.mark.parametrize("parameters,message", SILENT_BEFORE)
def test_bad_values_fail_naming_the_setting(parameters, message):
    with pytest.raises(ValueError) as error:
        make_config("cpu", **parameters)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_single_method_string_means_that_method():
    assert make_config("cpu", methods="lora").methods == ("lora",)
    assert make_config("cpu", methods=["dora", "lora"]).methods == ("dora", "lora")


def test_none_keeps_the_profile_and_all_means_every_row():
    config = make_config("cpu", rank=None, train_size="all", eval_size=100, lr={"lora": 5e-4})
    assert config.adapter.rank == PROFILES["cpu"].adapter.rank
    assert config.data.train_size is None and config.data.eval_size == 100
    assert config.lr["lora"] == 5e-4 and config.lr["full"] == PROFILES["cpu"].lr["full"]
    assert set(make_config("cpu", lr=3e-4).lr.values()) == {3e-4}


def test_profiles_are_validated_instances_with_their_own_results_folder(monkeypatch):
    for name, profile in PROFILES.items():
        assert isinstance(profile, ExperimentConfig) and profile.profile == name
        assert make_config(name) == profile
        assert profile.results_dir == f"results/{name}" and profile.figures_dir == f"results/{name}/imgs"
        assert set(profile.methods) <= set(profile.lr)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile("auto") == "full"
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        resolve_profile("huge")


def test_train_config_checks_its_own_fields():
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="TrainConfig.warmup_ratio must be a number in"):
        TrainConfig(warmup_ratio=1.5)


def _parameters_cell() -> str:
    notebook = json.loads((REPO_ROOT / "peft.ipynb").read_text())
    return "".join(next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))["source"])


def test_the_notebook_parameters_cell_shows_literally_what_trains():
    """The cell assigns each name of NOTEBOOK_PARAMETERS once, as a literal (no None meaning "the profile's"), in a
    short cell of short lines; run as it stands it is the cpu profile, every value shown taking effect."""
    source = _parameters_cell()
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    assert tuple(values) == NOTEBOOK_PARAMETERS
    lines = source.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 100
    config = make_config(**values)
    assert config == replace(PROFILES["cpu"], results_dir="results/cpu-reference", imgs_dir="imgs")
    assert {k: v for k, v in values.items() if k not in ("data_dir", "results_dir", "imgs_dir")} == {
        k: v for k, v in notebook_values("cpu").items() if k != "results_dir"}


@pytest.mark.parametrize("profile", ["full", "cpu", "smoke"])
def test_make_run_fills_the_cell_with_a_profiles_values(profile: str):
    """What ``make run PROFILE=...`` passes to papermill: every name of the cell, and together they are the profile."""
    values = notebook_values(profile)
    assert set(values) == set(NOTEBOOK_PARAMETERS) - {"data_dir", "imgs_dir"}
    assert make_config(**values) == PROFILES[profile]
    assert None not in (values["lr"], values["train_size"])  # literal values: "all", a rate per method


def test_every_parameter_is_a_command_line_flag():
    args = experiment._parse_args(["--rank", "3", "--lr", "lora=5e-4", "full=2e-5", "--train-size", "all",
                                   "--targets", "query", "value", "--no-sweep", "--seeds", "0", "1"])
    assert set(PARAMETERS) <= set(vars(args))
    from peft_utils.config import cli_parameters

    given = cli_parameters(args)  # shaped as the notebook writes them; numbers are read by their checks
    assert given["lr"] == {"lora": "5e-4", "full": "2e-5"} and given["targets"] == ["query", "value"]
    config = make_config("cpu", **given)
    assert (config.adapter.rank, config.data.train_size, config.sweep.enabled, config.seeds) == (3, None, False, (0, 1))
    assert (config.lr["lora"], config.lr["full"]) == (5e-4, 2e-5)
    assert config.targets == (("query", "value"),)


@pytest.mark.parametrize("value, sets", [
    (None, (None,)),
    ("all-linear", ("all-linear",)),
    (["query", "value"], (("query", "value"),)),
    (["attn", "all-linear"], ("attn", "all-linear")),
    ([None, "all-linear"], (None, "all-linear")),
    ([["query", "value"], "all-linear"], (("query", "value"), "all-linear")),
])
def test_targets_take_one_set_or_several(value, sets):
    """A list of presets (or of sets) is several target sets, an axis of the experiment; a list of module names is
    one set."""
    config = make_config("smoke", targets=value)
    assert config.targets == sets
    assert [a.targets for a in config.adapters] == list(sets) and config.adapter.targets is None


@pytest.mark.parametrize("tokens, sets", [
    (["all-linear"], ("all-linear",)),
    (["query", "value"], (("query", "value"),)),
    (["attn", "all-linear"], ("attn", "all-linear")),
    (["query,value", "all-linear"], (("query", "value"), "all-linear")),
])
def test_targets_on_the_command_line(tokens, sets):
    from peft_utils.config import cli_parameters

    assert make_config("smoke", **cli_parameters(experiment._parse_args(["--targets", *tokens]))).targets == sets


@pytest.mark.parametrize("value, message", [
    (["attn", "dense"], r"targets mixes target sets \('attn'\) with module names \('dense'\): give several sets "),
    (["attn", "attn"], r"targets lists 'attn' more than once"),
    ([["query", "va lue"], "attn"], r"targets\[0\] item 'va lue' is not a module name"),
])
def test_ambiguous_or_repeated_target_sets_are_one_line(value, message):
    with pytest.raises(ValueError, match=message):
        make_config("smoke", targets=value)


def test_an_experiment_config_takes_its_targets_as_an_axis():
    from peft_utils.config import ExperimentConfig
    from peft_utils.core.settings import AdapterSettings

    with pytest.raises(ValueError, match=r"takes its target sets as targets=\(\.\.\.\), not adapter\.targets"):
        ExperimentConfig(profile="smoke", model="m", methods=("lora",), lr={"lora": 1e-3},
                         adapter=AdapterSettings(targets="all-linear"))
