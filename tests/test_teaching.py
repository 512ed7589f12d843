"""The notebook's teaching cells (tagged ``teaching`` in peft.ipynb) run on a CPU in seconds, with nothing to
download, and their checks hold: each cell asserts what it shows (LoRA on GPT-2's Conv1D changes nothing at
initialisation, the hand count, plain torch == the core's LoRA, the paper's DoRA == the layer and its factored
norm, merge == unmerged, one MiniLM weight in NF4). Also the helpers they use, from ``peft_utils.teaching``."""
from __future__ import annotations

import ast
import time

import pytest
import torch

from conftest import REPO_ROOT
from peft_utils import teaching

# Seconds: each cell takes well under one on an idle core once torch and transformers are imported; the bound
# leaves room for a loaded 2-core CI machine and for the first import of transformers' model code.
CELL_SECONDS, ALL_SECONDS = 30.0, 60.0


def _cells() -> tuple[str, list[str]]:
    """(the import statements of the notebook's setup cell, the teaching cells' sources in order)."""
    import nbformat

    notebook = nbformat.read(REPO_ROOT / "peft.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    setup = next(cell for cell in code if "parameters" not in cell.metadata.get("tags", []))
    imports = [ast.get_source_segment(setup.source, node) for node in ast.parse(setup.source).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(imports), [cell.source for cell in code if "teaching" in cell.metadata.get("tags", [])]


def test_the_teaching_cells_run_in_seconds_and_their_checks_hold(minilm_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import IPython.display

    shown: list = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **_: shown.extend(objects))
    imports, cells = _cells()
    assert len(cells) >= 7, "the teaching cells lost their tag"
    namespace: dict = {}
    exec(imports, namespace)  # the setup cell's imports (display, Markdown, report...), as the kernel has them
    seconds = []
    for source in cells:
        shown.clear()
        start = time.perf_counter()
        exec(compile(source, "<teaching cell>", "exec"), namespace)  # each cell asserts its own checks
        seconds.append(time.perf_counter() - start)
        assert shown, f"this teaching cell showed nothing:\n{source}"
    assert max(seconds) < CELL_SECONDS and sum(seconds) < ALL_SECONDS, [round(s, 2) for s in seconds]


def test_a_minilm_weight_is_read_offline(minilm_dir):
    weight = teaching.minilm_weight()
    assert weight.shape == (384, 384) and weight.dtype == torch.float32
    assert 0.05 < weight.std().item() < 0.2  # pretrained, not an initialisation
    with pytest.raises(KeyError, match="not a MiniLM weight"):
        teaching.minilm_weight("encoder.layer.0.attention.self.qeury.weight")


def test_stored_bits_are_the_formula_plus_the_tables():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from peft_utils.sizes import nf4_bits_per_weight

    weight = torch.randn(512, 1024)
    tables_bits = 8 * (16 * 4 + 256 * 4 + 4)  # NF4 table, the nested absmax table and the offset (float32 each)
    for double_quant in (False, True):
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        tables = tables_bits if double_quant else 8 * 16 * 4
        expected = nf4_bits_per_weight(double_quant=double_quant) + tables / weight.numel()
        assert teaching.stored_bits_per_weight(packed, state) == pytest.approx(expected, rel=1e-6)


def test_the_histogram_is_a_stable_png():
    weight = torch.randn(64, 64)
    restored = weight + 0.01 * torch.randn(64, 64)
    png = teaching.error_histogram(weight, restored, "title")
    assert png.startswith(b"\x89PNG") and png == teaching.error_histogram(weight, restored, "title")


def test_facts_is_a_markdown_table_and_refuses_a_pipe():
    assert teaching.facts({"rank": 8}) == "| what | value |\n|---|---:|\n| rank | 8 |"
    with pytest.raises(ValueError, match="split a Markdown table row"):
        teaching.facts({"max |x|": 1})
