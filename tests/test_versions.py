"""Every record names the library versions it ran with, and those versions are provenance, not identity: a folder's
runs still resume and compare after an upgrade. A tiny random GPT-2 keeps the run to seconds."""
from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

import pytest
import torch

from peft_utils import train as train_module
from peft_utils.core.loop import set_seed
from peft_utils.core.settings import AdapterSettings
from peft_utils.models import build_model
from peft_utils.store import IDENTITY_KEYS, RunRecorder, RunStore, read_events
from peft_utils.train import RECORDED_PACKAGES, Recording, train
from test_train import _config, _rule_frame

ABSENT = "peft-lab-no-such-package"


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def recorded(tiny_gpt2_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny LoRA run's folder and its config event, with one package that is not installed asked for as well."""
    folder = tmp_path_factory.mktemp("versions")
    set_seed(0)
    model, tokenizer = build_model("lora", tiny_gpt2_dir, AdapterSettings(rank=2, alpha=4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "RECORDED_PACKAGES", (*RECORDED_PACKAGES, ABSENT))
        with RunRecorder(folder, "run") as recorder:
            train(model, tokenizer, _rule_frame(1), _rule_frame(1), _config(), lr=1e-2, seed=0,
                  recording=Recording(recorder, {"run_id": "run", "group": "comparison", "method": "lora"}))
    return folder, read_events(folder / "run.jsonl")[0]


def test_the_record_names_the_installed_versions(recorded) -> None:
    _, config = recorded
    versions = config["versions"]
    assert set(versions) == {"python", *RECORDED_PACKAGES, ABSENT}
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__  # the build too (PyPI's CUDA wheels leave it out of metadata)
    for package in (p for p in RECORDED_PACKAGES if p != "torch"):
        assert versions[package] == _installed(package), package
    assert versions[ABSENT] is None  # not installed: recorded as such, and the run is not refused


def test_versions_are_not_part_of_a_runs_identity(recorded) -> None:
    """A run recorded with other library versions is the same run: the folder still loads and counts it done."""
    folder, config = recorded
    assert not any(key == "versions" or key.startswith("versions.") for key in IDENTITY_KEYS)
    events = read_events(folder / "run.jsonl")
    events[0] = {**config, "versions": {**config["versions"], "torch": "1.0.0", "transformers": "4.0.0"}}
    (folder / "run.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    planned = {key: value for key, value in config.items() if key not in ("event", "versions")}
    assert RunStore(folder).find([("run", planned)]) == [("run", True)]  # found complete, under its own name
    runs = RunStore(folder).load().runs
    assert runs.loc[0, "versions.torch"] == "1.0.0"  # one column per package in the run table
