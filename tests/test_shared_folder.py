"""Processes sharing one results folder (issue 27's first lost-or-mixed case): two experiments with the same settings
split its runs between them, each run trained once, every record intact; two with other settings train their own
runs; a claim dies with its process; a generated test model is written by one process at a time.

Before claims, both processes trained every run, their lines interleaved in the same files and a summary was lost.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from peft_utils import models
from peft_utils.store import RunInProgress, RunStore, identity, read_events, setting_id

# The smoke comparison and its rank x alpha grid, small: 9 runs of 4 steps each.
ARGS = ["--profile", "smoke", "--train-size", "32", "--eval-size", "16", "--max-length", "24"]
TRAINING = re.compile(r"\] (\S+): training \(")


def _start(results: Path, sst2_dir: Path, log: Path, *more: str) -> subprocess.Popen:
    env = {**os.environ, "PEFT_LAB_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peft_utils.experiment", *ARGS, "--data-dir", str(sst2_dir),
               "--results-dir", str(results), "--imgs-dir", str(results / "imgs"), *more]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def test_two_processes_share_an_experiment_and_train_each_run_once(tmp_path, sst2_dir):
    results = tmp_path / "results"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    processes = [_start(results, sst2_dir, log) for log in logs]  # together, as `make run` twice would
    for process, log in zip(processes, logs):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    trained = [TRAINING.findall(log.read_text()) for log in logs]
    assert all(trained), "each process trains some of the runs"
    every = trained[0] + trained[1]
    assert sorted(every) == sorted(p.stem for p in results.glob("*.jsonl")), trained  # each run once, by one process
    for path in sorted(results.glob("*.jsonl")):  # intact: one config, steps in order, one summary, last
        events = [e["event"] for e in read_events(path)]
        assert events[0] == "config" and events.count("config") == 1 and events[-1] == "summary", path
        assert events.count("summary") == 1, path
    assert len(RunStore(results).load().runs) == len(every) == 9  # the smoke profile's 5 methods and 4 grid points
    for log in logs:  # both end with the table of every run (waiting for the other's last runs) and the figures
        table = log.read_text().rpartition("figures:")[0].splitlines()[-len(every) - 1:]
        assert sorted(line.split()[0] for line in table[1:]) == sorted(p.stem for p in results.glob("*.jsonl"))


def test_two_processes_with_other_settings_train_their_own_runs(tmp_path, sst2_dir):
    """Started together with another epoch count (a setting the run id does not name), two processes train one run
    each, one under the readable name and the other under that name and its setting's hash, and each reports its own."""
    results = tmp_path / "results"
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    processes = [_start(results, sst2_dir, log, "--methods", "full", "--no-sweep", "--no-figures", "--epochs", epochs)
                 for log, epochs in zip(logs, ("1", "2"))]
    for process, log in zip(processes, logs):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    trained = [TRAINING.findall(log.read_text()) for log in logs]
    files = sorted(p.stem for p in results.glob("*.jsonl"))
    assert sorted(sum(trained, [])) == files  # each run trained once, by one process
    name = "comparison-full-s0-random-gpt2-tiny"
    [hashed] = [file for file in files if file != name]
    assert hashed == f"{name}-{setting_id(read_events(results / f'{hashed}.jsonl')[0])}"
    runs = RunStore(results).load(every_setting=True).runs.set_index("run_id")
    assert sorted(runs["epochs"]) == [1, 2] and runs["setting"].nunique() == 2
    for log, [run], epochs in zip(logs, trained, (1, 2)):  # each trained its own setting, and its table shows it
        table = log.read_text().partition(" run_id ")[2].splitlines()[1]  # the table's one line, under its header
        assert runs.loc[run, "epochs"] == epochs and table.split()[0] == run


_HOLD = """
import sys, time
from peft_utils.store import RunStore
claim = RunStore(sys.argv[1]).claim("comparison-lora-s0", {"group": "comparison", "method": "lora"})
print("claimed", flush=True)
time.sleep(float(sys.argv[2]))
claim.release()
"""


def _hold_claim(results: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(results), str(seconds)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[1])
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def test_a_run_another_process_trains_is_passed_over_or_waited_for(tmp_path):
    store, planned = RunStore(tmp_path), {"group": "comparison", "method": "lora"}
    holder = _hold_claim(tmp_path, 2)
    with pytest.raises(RunInProgress):
        store.claim("comparison-lora-s0", planned)
    with store.claim("comparison-lora-s0", planned, wait=True) as claim:  # once the holder releases it
        assert claim is not None and holder.wait(timeout=30) == 0


def test_a_killed_process_leaves_no_claim(tmp_path):
    holder = _hold_claim(tmp_path, 300)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with RunStore(tmp_path).claim("comparison-lora-s0", {"group": "comparison", "method": "lora"}) as claim:
        assert claim is not None


def test_a_glance_at_a_free_claim_does_not_make_its_run_look_busy(tmp_path):
    """Reading the folder tests each claim by taking its lock for an instant; a claim made then still succeeds."""
    planned = {"group": "comparison", "method": "lora"}
    glance = FileLock(tmp_path / ".claims" / f"comparison-lora-s0.{identity(planned)}.lock", thread_local=False)
    glance.acquire()
    threading.Timer(0.05, glance.release).start()
    with RunStore(tmp_path).claim("comparison-lora-s0", planned) as claim:
        assert claim is not None


def test_a_complete_run_is_not_claimed(tmp_path):
    store = RunStore(tmp_path)
    with store.recorder("comparison-lora-s0") as recorder:
        recorder.log("config", group="comparison", method="lora", run_id="comparison-lora-s0")
        recorder.log("summary", final_accuracy=0.5)
    assert store.claim("comparison-lora-s0", {"group": "comparison", "method": "lora"}) is None


def test_a_generated_model_is_written_once_under_a_lock(tmp_path, monkeypatch, sst2_dir):
    """Processes that start together on a cold cache (one launch's processes, test workers) write the random
    GPT-2 one at a time: while another holds the lock, resolve_model_source waits without writing, then finds the
    folder complete or writes it once."""
    monkeypatch.setenv("PEFT_LAB_CACHE", str(tmp_path))
    folder = models.model_cache_dir() / "random-gpt2-tiny"
    folder.parent.mkdir(parents=True)
    writing, save = threading.Event(), models.save_random_gpt2

    def save_and_tell(*args):
        writing.set()
        save(*args)

    monkeypatch.setattr(models, "save_random_gpt2", save_and_tell)
    written = []
    with FileLock(folder.parent / ".random-gpt2-tiny.lock"):  # another process writing it
        waiting = threading.Thread(
            target=lambda: written.append(models.resolve_model_source("random-gpt2-tiny", sst2_dir.parent)))
        waiting.start()
        assert not writing.wait(timeout=5.0) and waiting.is_alive()
    waiting.join(timeout=120)
    assert writing.is_set() and written == [str(folder)] and (folder / "config.json").is_file()
    assert not list(folder.parent.glob(".*.new-*"))
