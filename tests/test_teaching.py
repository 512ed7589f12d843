"""The helpers of the notebook's teaching cells (``peft_utils.teaching``); the cells themselves run, asserting
what each shows, in ``tests/test_notebook.py``'s smoke run of the whole notebook."""
from __future__ import annotations

import pytest
import torch

from peft_utils import teaching


def test_a_minilm_weight_is_read_offline(minilm_dir):
    weight = teaching.minilm_weight()
    assert weight.shape == (384, 384) and weight.dtype == torch.float32
    assert 0.05 < weight.std().item() < 0.2  # pretrained, not an initialisation


def test_facts_is_a_markdown_table_and_refuses_a_pipe():
    assert teaching.facts({"rank": 8}) == "| what | value |\n|---|---:|\n| rank | 8 |"
    with pytest.raises(ValueError, match="split a Markdown table row"):
        teaching.facts({"max |x|": 1})
