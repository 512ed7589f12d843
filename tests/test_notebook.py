"""The notebook runs top to bottom in the smoke profile and writes every figure (what `make run` does, small)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

EXPECTED_FIGURES = (
    "loss.png", "accuracy.png", "accuracy_curve.png", "time.png", "model_size.png", "memory.png",
    "trainable_params.png", "sweep.png", "summary.png",
)


def run_notebook(tmp_path: Path, sst2_dir: Path, *parameters: str) -> tuple[Path, Path]:
    """Execute peft.ipynb with papermill in the smoke profile (plus ``-p name value`` pairs); returns its folders."""
    results, imgs = tmp_path / "results", tmp_path / "imgs"
    command = [
        sys.executable, "-m", "papermill", str(REPO_ROOT / "peft.ipynb"), str(tmp_path / "out.ipynb"),
        "-p", "profile", "smoke", "-p", "data_dir", str(sst2_dir.parent),
        "-p", "results_dir", str(results), "-p", "imgs_dir", str(imgs), *parameters, "--cwd", str(REPO_ROOT),
    ]
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return results, imgs


def test_notebook_runs_in_smoke_profile(tmp_path: Path, sst2_dir: Path, gpt2_tokenizer_dir: Path):
    pytest.importorskip("papermill")
    results, imgs = run_notebook(tmp_path, sst2_dir)
    missing = [name for name in EXPECTED_FIGURES if not (imgs / name).is_file()]
    assert not missing, f"notebook did not write {missing}"
    assert len(list(results.glob("comparison-*.jsonl"))) == 5


def test_notebook_runs_on_a_local_llama_folder(tmp_path: Path, sst2_dir: Path):
    """A new family from a local folder: a tiny random Llama whose tokenizer has no pad token, every method (the
    sweep is the smoke test's; skipping it keeps this one short)."""
    pytest.importorskip("papermill")
    from test_families import save_tiny

    folder = save_tiny("llama", tmp_path / "tiny-llama")
    results, imgs = run_notebook(tmp_path, sst2_dir, "-p", "model", str(folder), "-p", "sweep", "False")
    records = sorted(results.glob("comparison-*.jsonl"))
    assert len(records) == 5 and all("tiny-llama" in path.name for path in records), records
    assert (imgs / "summary.png").is_file()
