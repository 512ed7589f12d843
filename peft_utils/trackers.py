"""Experiment trackers (``report_to``): a view of each run's record (the source of truth) in TensorBoard, MLflow,
W&B... through accelerate, under the record's names (``step/loss``, ``summary/size.disk_bytes``), logging to
``<results_dir>/runs/<run id>`` or to a project ``peft-lab-<results folder name>``."""
from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The keyword that names the run, for trackers whose first argument is a project (one per results folder).
_RUN_NAME = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name",
             "clearml": "task_name"}
_LONGEST_SETTING_LIST = 32  # a longer list is data, not a setting (a config event's eval_labels)


def accelerator_arguments(report_to: tuple[str, ...], results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """``Accelerator``'s ``log_with`` and ``project_dir`` for one run. Trackers that write files open under the run
    id; the others are built here, as ``init_trackers`` would name their *project* after the run."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if not report_to:
        return {}
    project = f"peft-lab-{Path(results_dir).resolve().name}"
    log_with = [name if LOGGER_TYPE_TO_CLASS[name].requires_logging_directory else
                LOGGER_TYPE_TO_CLASS[name](project, **({_RUN_NAME[name]: run_id} if name in _RUN_NAME else {}))
                for name in report_to]
    return {"log_with": log_with, "project_dir": str(Path(results_dir) / "runs")}


def _flat(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every field, nested mappings flattened (``size.disk_bytes``)."""
    for key, value in record.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def hyperparameters(record: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A ``config`` event as scalars and strings (TensorBoard refuses a list and leaves ``None`` out of its table),
    without per-row data (``eval_labels``)."""
    values: dict[str, bool | int | float | str] = {}
    for key, value in _flat(record):
        if isinstance(value, (list, tuple)):
            if len(value) > _LONGEST_SETTING_LIST:
                continue
            value = ", ".join(map(str, value))
        values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


class RunTrackers:
    """One run's events to the accelerator's trackers, with ``RunRecorder``'s ``log``. ``config`` starts them in an
    emptied log folder (a re-run starts over, as its record does); ``close`` finishes them without
    ``accelerator.end_training()``, which would also end the next run's process group."""

    def __init__(self, accelerator, run_id: str) -> None:
        self.accelerator, self.run_id = accelerator, run_id

    def log(self, event: str, **fields: Any) -> None:
        if event == "config":
            if self.accelerator.logging_dir is not None:  # None: trackers that write no files, no project_dir
                shutil.rmtree(Path(self.accelerator.logging_dir) / self.run_id, ignore_errors=True)
            self.accelerator.init_trackers(self.run_id, config=hyperparameters(fields))
            return
        step = fields.pop("step") if "step" in fields else fields["steps"]
        numbers = {f"{event}/{key}": value for key, value in _flat(fields)
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()  # a retried run (after running out of GPU memory) starts them again
