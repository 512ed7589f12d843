"""``report_to`` (issue 28): each run's steps, evaluations, summary and settings in an experiment tracker, through
accelerate. TensorBoard (pinned, fully offline) is read back and compared with the run's JSON-lines record, which
stays the source of truth; a tracker that is misspelt or not installed is a one-line error before anything trains."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from peft_utils import experiment, trackers
from peft_utils.config import make_config
from peft_utils.devices import make_accelerator
from peft_utils.store import RunStore, read_events

# Two methods of the smoke comparison, tiny: 16 rows in 2 steps, each step logged and evaluated on 16 dev rows.
ARGS = ["--profile", "smoke", "--methods", "full", "lora", "--no-sweep", "--no-figures", "--train-size", "16",
        "--eval-size", "16", "--max-length", "24", "--eval-every", "1"]


def _main(results: Path, data_dir: Path, *args: str) -> int:
    return experiment.main([*ARGS, "--results-dir", str(results), "--data-dir", str(data_dir), *args])


@pytest.fixture(scope="module")
def logged(tmp_path_factory, sst2_dir, gpt2_tokenizer_dir):
    """The comparison run through the command line with ``--report-to tensorboard``: (results folder, data folder)."""
    results = tmp_path_factory.mktemp("tracked")
    assert _main(results, sst2_dir.parent, "--report-to", "tensorboard") == 0
    return results, sst2_dir.parent


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _hyperparameters(folder: Path) -> dict[str, object]:
    """The hyperparameters TensorBoard's HPARAMS dashboard shows for the run (written in a folder inside its own)."""
    for events_file in sorted(folder.glob("*/events.out.tfevents.*")):
        events = EventAccumulator(str(events_file.parent))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                return {key: value.string_value or value.number_value
                        for key, value in data.session_start_info.hparams.items()}
    raise AssertionError(f"no hyperparameters under {folder}")


def _pairs(events: list[dict], event: str, field: str) -> list[tuple[int, float]]:
    return [(e["step"], e[field]) for e in events if e["event"] == event]


def _same_curve(logged: list[tuple[int, float]], recorded: list[tuple[int, float]]) -> bool:
    """The same steps, and the same values up to TensorBoard's float32."""
    return ([step for step, _ in logged] == [step for step, _ in recorded]
            and [value for _, value in logged] == pytest.approx([value for _, value in recorded], rel=1e-6))


def test_each_run_logs_its_record_to_tensorboard_under_the_results_folder(logged):
    results, _ = logged
    records = sorted(results.glob("*.jsonl"))
    assert len(records) == 2
    assert sorted(p.name for p in (results / "runs").iterdir()) == [p.stem for p in records]  # one folder per run
    for path in records:
        events, folder = read_events(path), results / "runs" / path.stem
        for event, field in (("step", "loss"), ("step", "lr"), ("eval", "accuracy"), ("eval", "loss")):
            expected = _pairs(events, event, field)
            assert len(expected) == 2 and _same_curve(_scalars(folder, f"{event}/{field}"), expected), (event, field)
        summary = events[-1]
        assert _same_curve(_scalars(folder, "summary/final_accuracy"), [(summary["steps"], summary["final_accuracy"])])
        config = events[0]
        hyperparameters = _hyperparameters(folder)
        assert (hyperparameters["run_id"], hyperparameters["method"]) == (path.stem, config["method"])
        assert hyperparameters["lr"] == pytest.approx(config["lr"])
    assert len(RunStore(results).load().runs) == 2  # the records are still the folder's runs, complete


def test_a_rerun_starts_the_run_log_over_and_report_to_is_not_a_setting_of_the_runs(logged, monkeypatch):
    results, data_dir = logged
    record = results / "comparison-full-s0-random-gpt2-tiny.jsonl"
    record.write_text(record.read_text().splitlines()[0] + "\n")  # interrupted after its config event
    assert _main(results, data_dir, "--report-to", "tensorboard") == 0  # only that run trains again
    folder = results / "runs" / record.stem
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # its first log is gone, as its first record is
    assert _same_curve(_scalars(folder, "step/loss"), _pairs(read_events(record), "step", "loss"))
    monkeypatch.setattr(experiment, "train", _fail)
    assert _main(results, data_dir) == 0  # without trackers, the same runs: complete, nothing trains


@pytest.mark.parametrize("report_to,message", [
    ("tensorbord", "report_to: 'tensorbord' is not a tracker; installed: "),
    (["tensorboard", 3], "report_to must be tracker names, got ['tensorboard', 3]"),
])
def test_an_unknown_tracker_is_refused_naming_the_installed_ones(report_to, message):
    with pytest.raises(ValueError) as error:
        make_config("smoke", report_to=report_to)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    if isinstance(report_to, str):
        assert "tensorboard" in str(error.value).partition("installed: ")[2]


def test_a_tracker_that_is_not_installed_is_refused_before_anything_trains(tmp_path, sst2_dir, capsys, monkeypatch):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    missing = [name for name in sorted(LOGGER_TYPE_TO_CLASS) if name not in map(str, get_available_trackers())]
    if not missing:
        pytest.skip("every tracker accelerate supports is installed here")
    monkeypatch.setattr(experiment, "train", _fail)
    assert _main(tmp_path, sst2_dir.parent, "--report-to", "tensorboard", missing[0]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: report_to: {missing[0]!r} is not installed (pip install {missing[0]}); "
                          "installed: ") and err.count("\n") == 1


def test_no_tracker_is_the_default_and_none_says_so():
    assert make_config("smoke").report_to == make_config("smoke", report_to="none").report_to == ()
    assert make_config("smoke", report_to=["tensorboard", "tensorboard"]).report_to == ("tensorboard",)


def test_hyperparameters_are_scalars_and_strings():
    record = {"targets": ("c_attn", "c_proj"), "dropout": None, "size": {"disk_bytes": 3}, "rank": 4,
              "rslora": False, "source": Path("data"), "eval_labels": [0, 1] * 436}
    assert trackers.hyperparameters(record) == {"targets": "c_attn, c_proj", "dropout": "None", "size.disk_bytes": 3,
                                                "rank": 4, "rslora": False, "source": "data"}  # no per-row data


def test_a_retried_run_is_logged_once(tmp_path):
    """``find_executable_batch_size`` trains a run again with the same accelerator after running out of GPU memory:
    the first attempt's trackers are finished and forgotten, and its log is replaced, as its record is."""
    accelerator = make_accelerator("cpu", "fp32", **trackers.accelerator_arguments(("tensorboard",), tmp_path, "run-1"))
    for attempt in (0, 1):
        run = trackers.RunTrackers(accelerator, "run-1")
        run.log("config", lr=0.1, targets=["c_attn"])
        run.log("step", step=1, loss=float(attempt))
        run.close()
        assert accelerator.trackers == []
    folder = tmp_path / "runs" / "run-1"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1 and _scalars(folder, "step/loss") == [(1, 1.0)]


def test_project_trackers_get_one_project_per_results_folder_and_the_run_id_as_run_name(tmp_path):
    """W&B and MLflow are not installed here: their trackers are built (nothing starts until init_trackers)."""
    arguments = trackers.accelerator_arguments(("tensorboard", "mlflow", "wandb"), tmp_path / "r16", "run-1")
    tensorboard, mlflow, wandb = arguments["log_with"]
    assert arguments["project_dir"] == str(tmp_path / "r16" / "runs") and tensorboard == "tensorboard"
    assert (mlflow.experiment_name, mlflow.run_name) == ("peft-lab-r16", "run-1")
    assert (wandb.run_name, wandb.init_kwargs) == ("peft-lab-r16", {"name": "run-1"})
    assert trackers.accelerator_arguments((), tmp_path, "run-1") == {}


def _fail(*args, **kwargs):
    raise AssertionError("a run was trained although it should not have been")


def test_a_tracker_that_writes_no_files_needs_no_project_dir():
    """An accelerator made by the user with a service tracker (W&B...) and no ``project_dir`` has no logging
    folder: the run logs to the tracker, with no folder to empty first."""
    from accelerate.tracking import GeneralTracker

    class Service(GeneralTracker):
        name, requires_logging_directory, tracker = "service", False, None

        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple] = []

        def store_init_configuration(self, values: dict) -> None:
            self.logged.append(("config", values))

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logged.append((step, values))

    service = Service()
    accelerator = make_accelerator("cpu", "fp32", log_with=[service])
    assert accelerator.logging_dir is None
    run = trackers.RunTrackers(accelerator, "run-1")
    run.log("config", lr=0.1)
    run.log("step", step=1, loss=0.5)
    run.close()
    assert service.logged == [("config", {"lr": 0.1}), (1, {"step/loss": 0.5})]
