"""The notebook: it runs top to bottom in the smoke profile and writes every figure (what `make run` does, small); its
parameters cell shows the profiles' values; the outputs committed with it are the committed records' tables; and the
HTML report reads offline (math rendered, no CDN script) without the per-run progress lines."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from peft_utils import config as cfg
from peft_utils import run_notebook as driver

EXPECTED_FIGURES = ("loss.png", "accuracy.png", "cost.png", "pareto.png", "sweep.png")
NOTEBOOK = REPO_ROOT / "peft.ipynb"
# The records the committed outputs were made from, and those of the "results first" cell.
COMMITTED_RESULTS = REPO_ROOT / "results" / "cpu-reference"
FULL_TRAIN_RESULTS = REPO_ROOT / "results" / "cpu-fulltrain-all-linear"


def run_notebook(tmp_path: Path, sst2_dir: Path, *parameters: str) -> tuple[Path, Path]:
    """Execute peft.ipynb with papermill in the smoke profile (then ``-p name value`` pairs); returns its folders.

    Progress as plain lines, as ``make run`` sets it (in a kernel it would otherwise draw widgets)."""
    results, imgs = tmp_path / "results", tmp_path / "imgs"
    values = {**cfg.notebook_values("smoke"), "data_dir": str(sst2_dir.parent), "results_dir": str(results),
              "imgs_dir": str(imgs)}  # every name of the parameters cell, as make run passes them
    command = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(tmp_path / "out.ipynb"),
               "-y", json.dumps(values), *parameters, "--cwd", str(REPO_ROOT)]
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": str(REPO_ROOT),
           "PEFT_LAB_PROGRESS": "lines"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return results, imgs


def _notebook(path: Path = NOTEBOOK):
    import nbformat

    return nbformat.read(path, as_version=4)


def _tagged(notebook, tag: str) -> list:
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def _shows(cell) -> bool:
    """Whether a code cell is meant to show something: it ends in an expression (a ``display(...)``, a table), where
    a cell that only defines a class, a function or names shows nothing by design."""
    body = ast.parse(cell.source).body
    return bool(body) and isinstance(body[-1], (ast.Expr, ast.If))


def _stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def _markdown_outputs(cell) -> list[str]:
    return [output.data["text/markdown"] for output in cell.outputs if "text/markdown" in output.get("data", {})]


# ------------------------------------------------------------------------------------------- running it


def test_notebook_runs_in_smoke_profile(tmp_path: Path, sst2_dir: Path, gpt2_tokenizer_dir: Path):
    """The whole notebook, teaching cells included; then its HTML report, as ``make run`` writes it: the executed
    notebook keeps the progress lines, the report drops them and keeps what happened to each run."""
    pytest.importorskip("papermill")
    results, imgs = run_notebook(tmp_path, sst2_dir)
    missing = [name for name in EXPECTED_FIGURES if not (imgs / name).is_file()]
    assert not missing, f"notebook did not write {missing}"
    assert len(list(results.glob("comparison-*.jsonl"))) == 5
    executed = _notebook(tmp_path / "out.ipynb")
    assert all(cell.outputs for cell in _tagged(executed, "teaching") if _shows(cell)), "a teaching cell showed nothing"
    printed = "".join(_stream_text(cell) for cell in executed.cells)
    assert driver.PROGRESS_LINE.search(printed) and "| done 4 steps in" in printed
    html = driver.export_html(tmp_path / "out.ipynb").read_text(encoding="utf-8")
    assert "steps/s" not in html and "| done 4 steps in" not in html
    assert html.count(": training (smoke profile)") == printed.count(": training (smoke profile)") == 9


def test_notebook_runs_on_a_local_llama_folder(tmp_path: Path, sst2_dir: Path):
    """A new family from a local folder: a tiny random Llama whose tokenizer has no pad token, every method (the
    sweep is the smoke test's; skipping it keeps this one short)."""
    pytest.importorskip("papermill")
    from test_families import save_tiny

    folder = save_tiny("llama", tmp_path / "tiny-llama")
    results, imgs = run_notebook(tmp_path, sst2_dir, "-p", "model", str(folder), "-p", "sweep", "False")
    records = sorted(results.glob("comparison-*.jsonl"))
    assert len(records) == 5 and all("tiny-llama" in path.name for path in records), records
    assert (imgs / "pareto.png").is_file()


# ------------------------------------------------------------------------------------------- the parameters cell


def test_the_notebook_passes_every_name_of_its_parameters_cell_to_one_call():
    """The cell after the parameters is one ``make_config`` call with every name of the cell as itself, so what the
    cell (or papermill's cell under it) shows is what trains; no other name is read."""
    code = [cell for cell in _notebook().cells if cell.cell_type == "code"]
    call = next(node for node in ast.walk(ast.parse(code[1].source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "make_config")
    given = [call.args[0].id] + [keyword.arg for keyword in call.keywords]
    assert tuple(given) == cfg.NOTEBOOK_PARAMETERS
    assert all(keyword.value.id == keyword.arg for keyword in call.keywords)


# ------------------------------------------------------------------------------------------- the committed outputs


def test_the_committed_notebook_has_outputs_from_the_committed_records():
    """Saved with outputs (``run_notebook --commit-outputs``, docs/notebook.md), from the cpu profile on the records
    in results/cpu-reference, where every run was already complete: nothing trained to make them."""
    notebook = _notebook()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "a code cell was never run"
    without = [cell.source.splitlines()[0] for cell in code if not cell.outputs and _shows(cell)]
    assert not without, f"code cells without outputs: {without}"
    assert not any(output.output_type == "error" for cell in code for output in cell.outputs)
    assert _markdown_outputs(code[1])[0].startswith("`cpu` profile:")
    printed = "".join(_stream_text(cell) for cell in code)
    comparison = len(list(COMMITTED_RESULTS.glob("comparison-*.jsonl")))
    sweep = len(list(COMMITTED_RESULTS.glob("sweep-*.jsonl")))
    for stage in (comparison, sweep):  # one line per stage, not one per run
        assert f"{stage} of {stage} runs already complete in results/cpu-reference, skipped" in printed
    assert ": training (" not in printed


def test_the_committed_notebook_is_clean():
    """No papermill cell (JupyterLab runs the notebook's own parameters), no timings, no progress, no widgets."""
    notebook = _notebook()
    assert not _tagged(notebook, "injected-parameters")
    assert "papermill" not in notebook.metadata
    assert not [key for cell in notebook.cells for key in ("papermill", "execution") if key in cell.metadata]
    printed = "".join(_stream_text(cell) for cell in notebook.cells)
    assert not driver.PROGRESS_LINE.search(printed)
    assert driver.WIDGET_VIEW not in json.dumps(notebook)


@pytest.mark.parametrize("tag, results", [("results-table", COMMITTED_RESULTS),
                                          ("committed-results", FULL_TRAIN_RESULTS)])
def test_the_committed_tables_are_the_committed_records(tag: str, results: Path):
    """The tables saved in the notebook are ``report.comparison_markdown`` of the records (and, for the committed
    result, its readings by the decision rule), byte for byte: a change to the records or to the tables' code fails
    here until the outputs are made again."""
    from peft_utils import report

    [cell] = _tagged(_notebook(), tag)
    readings = [report.readings_markdown(results)] if tag == "committed-results" else []
    assert _markdown_outputs(cell) == [report.comparison_markdown(results), *readings]


# ------------------------------------------------------------------------------------------- the report


def test_the_report_reads_offline(tmp_path: Path):
    """The committed notebook as ``make run``'s HTML report: every formula of its Markdown is MathML, and nothing is
    loaded from the network (no script, stylesheet or image from a URL)."""
    from bs4 import BeautifulSoup

    executed = tmp_path / "peft.out.ipynb"
    executed.write_bytes(NOTEBOOK.read_bytes())
    soup = BeautifulSoup(driver.export_html(executed).read_text(encoding="utf-8"), "html.parser")
    loaded = [tag.get("src") or tag.get("href") for tag in soup.find_all(["script", "link", "img", "iframe"])]
    assert not [url for url in loaded if url and re.match(r"(https?:)?//", url)], loaded
    assert not [script for script in soup.find_all("script") if "http" in (script.string or "")]  # no import()
    assert "mathjax" not in str(soup).lower()
    markdown = "\n".join(cell.source for cell in _notebook().cells if cell.cell_type == "markdown")
    displayed = re.findall(r"\$\$.+?\$\$", markdown, flags=re.S)
    inline = re.findall(r"(?<![\\$])\$[^$]+\$", re.sub(r"\$\$.+?\$\$", "", markdown, flags=re.S))
    formulas = len(displayed) + len(inline)
    assert formulas > 20 and len(soup.find_all("math")) == formulas
    rendered = " ".join(div.get_text() for div in soup.select(".jp-RenderedMarkdown"))
    assert not re.search(r"\\(frac|alpha|lVert|mathbb)|\$", rendered), "raw TeX left in the report"


def test_the_report_drops_progress_lines_only():
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    printed = ("[run 2/5] comparison-lora-s0: training (smoke profile)\n"
               "run 2/5 lora | step 4/8 (50%) | 3.10 steps/s | loss 0.6931 | ETA 1.3 s\n"
               "run 2/5 lora | step 8: dev accuracy 0.5000, loss 0.6900\n"
               "run 2/5 lora | done 8 steps in 2.6 s | 3.08 steps/s | loss 0.6822\n"
               "[run 3/5] comparison-dora-s0: already complete in results/x, skipped\n")
    cell = new_code_cell("run()", outputs=[new_output("stream", name="stdout", text=printed),
                                           new_output("stream", name="stdout", text="run 1/1 full | step 1/2\n")])
    cleaned = driver.without_progress(new_notebook(cells=[cell]))
    assert [output.text for output in cleaned.cells[0].outputs] == [
        "[run 2/5] comparison-lora-s0: training (smoke profile)\n"
        "[run 3/5] comparison-dora-s0: already complete in results/x, skipped\n"]
    assert cell.outputs[0].text == printed  # the executed notebook itself keeps them
    nbformat.validate(cleaned)


def test_make_run_never_writes_the_notebook_itself():
    with pytest.raises(SystemExit):
        driver._parse_args(["--output", "peft.ipynb"])
    defaults = driver._parse_args([])
    assert defaults.output == Path("peft.out.ipynb") and not defaults.commit_outputs
