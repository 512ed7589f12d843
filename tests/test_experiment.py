"""Comparisons end to end on the smoke profile (tiny random GPT-2, real tokenizer, real SST-2 rows): method
building, run ids, complete records for the plots, resume after a crash, and refusing mismatched records."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from peft_utils import experiment
from peft_utils.experiment import (
    METHODS,
    PROFILES,
    RunSpec,
    build_model,
    profile_settings,
    resolve_profile,
    run_comparison,
    run_id,
    run_sweep,
)
from peft_utils.inject import count_parameters
from peft_utils.quant import SIZE_KEYS
from peft_utils.results import is_complete, load_results, read_events

# The smallest useful smoke comparison: 16 rows, 2 steps, evaluated on 16 dev rows.
TINY = {"train_size": 16, "eval_size": 16, "max_length": 24}

CONFIG_FIELDS = ("run_id", "group", "method", "model", "rank", "alpha", "dropout", "targets", "seed", "lr", "epochs",
                 "batch_size", "max_length", "train_size", "eval_size", "device", "compute_dtype",
                 "trainable_params", "total_params")
SUMMARY_FIELDS = ("train_time_s", "eval_time_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes",
                  "memory_kind", "final_accuracy", "final_eval_loss", "n_eval", "steps")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, sst2_dir, gpt2_tokenizer_dir):
    """Full fine-tuning, QDoRA and a one-point LoRA sweep, recorded once for the tests below."""
    results = tmp_path_factory.mktemp("results")
    table = run_comparison(["full", "qdora"], data_dir=sst2_dir.parent, results_dir=results, profile="smoke",
                           sweep=True, sweep_ranks=(2,), sweep_alpha_ratios=(1,), **TINY)
    return results, table


def test_records_hold_every_field_the_plots_read(smoke_results):
    results, table = smoke_results
    assert list(table["run_id"]) == [
        "comparison-full-s0-random-gpt2-tiny", "comparison-qdora-r4-a8-s0-random-gpt2-tiny",
        "sweep-lora-r2-a2-s0-random-gpt2-tiny",
    ]
    runs = load_results(results).runs.set_index("run_id")
    for field in CONFIG_FIELDS[1:] + SUMMARY_FIELDS + tuple(f"size.{k}" for k in SIZE_KEYS):
        assert field in runs.columns, field
    full, qdora, sweep = (runs.loc[r] for r in table["run_id"])
    assert (full["group"], qdora["group"], sweep["group"]) == ("comparison", "comparison", "sweep")
    assert pd.isna(full["rank"]) and pd.isna(full["alpha"])  # no adapter
    assert (qdora["rank"], qdora["alpha"], sweep["rank"], sweep["alpha"]) == (4, 8, 2, 2)
    assert full["lr"] == PROFILES["smoke"]["lr"] and full["model"] == "random-gpt2-tiny"
    assert (full["train_size"], full["eval_size"], full["n_eval"], full["steps"]) == (16, 16, 16, 2)
    assert full["trainable_params"] == full["total_params"]
    assert 0 < qdora["trainable_params"] < qdora["total_params"]
    assert full["size.disk_kind"] == "full checkpoint" and qdora["size.disk_kind"] == "4-bit base + adapter"
    assert qdora["size.quantized_bytes"] > 0 and full["size.quantized_bytes"] == 0
    assert sweep["size.disk_bytes"] < 10_000  # the adapter only, as written by save_adapters
    steps, evals = load_results(results).steps, load_results(results).evals
    assert set(steps["run_id"]) == set(evals["run_id"]) == set(table["run_id"])


def test_rerun_skips_complete_runs(smoke_results, sst2_dir, monkeypatch):
    results, table = smoke_results
    monkeypatch.setattr(experiment, "train", _fail)
    again = run_comparison(["full", "qdora"], data_dir=sst2_dir, results_dir=results, profile="smoke", **TINY)
    assert list(again["run_id"]) == list(table["run_id"][:2])


def test_finished_record_with_other_settings_is_refused(smoke_results, sst2_dir):
    results, _ = smoke_results
    with pytest.raises(ValueError, match="other settings.*epochs"):
        run_comparison(["full"], data_dir=sst2_dir, results_dir=results, profile="smoke", epochs=2, **TINY)


def test_resume_after_a_crash_continues_with_the_next_method(tmp_path, sst2_dir, gpt2_tokenizer_dir, monkeypatch):
    real_train, calls, crash = experiment.train, [], {"lora"}

    def train_or_crash(*args, run_info, **kwargs):
        calls.append(run_info["method"])
        if run_info["method"] in crash:
            raise RuntimeError("simulated crash")
        return real_train(*args, run_info=run_info, **kwargs)

    monkeypatch.setattr(experiment, "train", train_or_crash)
    settings = dict(data_dir=sst2_dir, results_dir=tmp_path, profile="smoke", **TINY)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_comparison(["full", "lora"], **settings)
    full_id, lora_id = "comparison-full-s0-random-gpt2-tiny", "comparison-lora-r4-a8-s0-random-gpt2-tiny"
    assert is_complete(tmp_path, full_id) and not is_complete(tmp_path, lora_id)
    full_file = (tmp_path / f"{full_id}.jsonl").read_bytes()

    calls.clear()
    crash.clear()
    table = run_comparison(["full", "lora"], **settings)
    assert calls == ["lora"]  # the finished method is not trained again
    assert (tmp_path / f"{full_id}.jsonl").read_bytes() == full_file
    assert list(table["run_id"]) == [full_id, lora_id]
    assert [e["event"] for e in read_events(tmp_path / f"{lora_id}.jsonl")].count("config") == 1


def test_sweep_grid_uses_alpha_ratios(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(experiment, "_run_specs", lambda specs, *a: planned.extend(specs))
    run_sweep(ranks=(2, 8), alpha_ratios=(1, 2), profile="smoke", results_dir=tmp_path, seeds=(0, 1))
    assert {(s.rank, s.alpha, s.seed) for s in planned} == {
        (r, ratio * r, seed) for r in (2, 8) for ratio in (1, 2) for seed in (0, 1)}
    assert {s.group for s in planned} == {"sweep"} and {s.method for s in planned} == {"lora"}


@pytest.mark.parametrize("method", METHODS)
def test_build_model_trains_the_right_parameters(smoke_results, method):
    results, _ = smoke_results
    model, tokenizer = build_model(method, results / "_models" / "random-gpt2-tiny", rank=2, alpha=4)
    counts = count_parameters(model)
    assert tokenizer.pad_token_id == model.config.pad_token_id is not None
    if method == "full":
        assert counts.trainable == counts.total
        return
    assert 0 < counts.trainable < counts.total / 100
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    has_4bit = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert has_4bit == method.startswith("q")
    has_magnitude = any(hasattr(m, "magnitude") for m in model.modules())
    assert has_magnitude == method.endswith("dora")


def test_unknown_method_lists_the_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'adalora'.*full.*qdora"):
        build_model("adalora", "unused")
    with pytest.raises(ValueError, match="unknown method"):
        run_comparison(["lora", "adalora"], results_dir=tmp_path, profile="smoke")


def test_run_ids_are_deterministic_and_readable():
    assert run_id(RunSpec("comparison", "lora", 8, 16.0, 0), "minilm") == "comparison-lora-r8-a16-s0-minilm"
    assert run_id(RunSpec("comparison", "full", None, None, 1), "openai-community/gpt2-large") == (
        "comparison-full-s1-gpt2-large")
    assert run_id(RunSpec("sweep", "lora", 4, 2.0, 0), "/x/My Model") == "sweep-lora-r4-a2-s0-my-model"


def test_profiles_and_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile("auto") == "full"
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("huge")
    assert PROFILES["cpu"]["model"] == "minilm" and PROFILES["cpu"]["eval_size"] is None
    settings = profile_settings("cpu", lr={"lora": 5e-4}, epochs=None, train_size=100)
    assert settings["lr"]["lora"] == 5e-4 and settings["lr"]["full"] == PROFILES["cpu"]["lr"]["full"]
    assert settings["epochs"] == PROFILES["cpu"]["epochs"] and settings["train_size"] == 100
    with pytest.raises(ValueError, match="unknown setting"):
        profile_settings("cpu", learning_rate=1e-3)


def test_all_rows_has_its_own_spelling():
    """None keeps the profile's subset size, so "every train row" is asked for with "all" (CLI and API)."""
    assert PROFILES["cpu"]["train_size"] is not None
    settings = profile_settings("cpu", train_size="all", eval_size=100)
    assert settings["train_size"] is None and settings["eval_size"] == 100
    for bad in (0, -5, 2.5, "most", True):
        with pytest.raises(ValueError, match="train_size must be a positive number of rows or 'all'"):
            profile_settings("cpu", train_size=bad)
    args = experiment._parse_args(["--train-size", "all", "--eval-size", "64"])
    assert (args.train_size, args.eval_size) == ("all", 64)
    with pytest.raises(SystemExit):
        experiment._parse_args(["--train-size", "many"])

    splits = {"train": pd.DataFrame({"sentence": [f"s{i}" for i in range(10)], "label": [0] * 6 + [1] * 4}),
              "dev": pd.DataFrame({"sentence": ["a", "b", "c"], "label": [0, 1, 1]})}
    train_frame, eval_frame = experiment._frames(settings | {"eval_size": None}, splits, seed=0)
    assert len(train_frame) == 10 and len(eval_frame) == 3  # every row, class imbalance and all
    train_frame, _ = experiment._frames(settings | {"train_size": 4}, splits, seed=0)
    assert train_frame["label"].tolist().count(0) == 2  # a size still means a balanced subset


def test_command_line_reports_the_table(smoke_results, sst2_dir, capsys):
    results, table = smoke_results
    assert experiment.main(["--profile", "smoke", "--methods", "full", "qdora", "--results", str(results),
                            "--data-dir", str(sst2_dir),
                            "--train-size", "16", "--eval-size", "16", "--max-length", "24"]) == 0
    out = capsys.readouterr().out
    assert all(rid in out for rid in table["run_id"][:2]) and "skipped" in out


def _fail(*args, **kwargs):
    raise AssertionError("a complete run was trained again")
