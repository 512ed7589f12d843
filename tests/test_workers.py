"""``workers``: N processes at once on one device split one plan through the results folder (this process and
N - 1 spawned ones): each run trains once, by one of them, and its record says how many ran at once."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from peft_utils.config import make_config
from peft_utils.experiment import plan_experiment
from peft_utils.store import RunStore, read_events

TRAINING = re.compile(r"\[(worker \d+, )?run \d+/\d+\] (\S+): training \(")


@pytest.mark.parametrize("stage,runs", [(("--no-sweep", "--workers", "2"), 5),  # the smoke profile's 5 methods
                                        (("--sweep-only", "--sweep-workers", "2"), 4)])  # its 2 x 2 grid
def test_two_workers_split_a_stage_and_record_it(tmp_path, sst2_dir, stage, runs):
    results = tmp_path / "results"
    command = [sys.executable, "-m", "peft_utils.experiment", "--profile", "smoke", "--train-size", "32",
               "--eval-size", "16", "--max-length", "24", "--no-figures", *stage,
               "--data-dir", str(sst2_dir.parent), "--results-dir", str(results)]
    env = {**os.environ, "PEFT_LAB_PROGRESS": "off"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    trained = TRAINING.findall(done.stdout)
    by_worker = {worker for worker, _ in trained}
    assert by_worker == {"", "worker 1, "}, done.stdout  # this process and the worker both trained runs
    names = sorted(name for _, name in trained)
    assert names == sorted(p.stem for p in results.glob("*.jsonl"))  # each run once
    assert len(RunStore(results).load(every_setting=True).runs) == len(names) == runs
    for path in results.glob("*.jsonl"):
        events = read_events(path)
        assert events[0]["workers"] == 2 and [e["event"] for e in events].count("summary") == 1, path


def test_workers_and_a_launch_are_refused_together(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="workers=2 runs several runs at once on one device"):
        plan_experiment(make_config("smoke", workers=2, results_dir=str(tmp_path)))
