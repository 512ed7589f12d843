"""``make run``: execute ``peft.ipynb`` with papermill, its printed output forwarded live, then write an offline
HTML report and print the results table and where everything is (docs/notebook.md: the report, --commit-outputs)."""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import NOTEBOOK_PARAMETERS, PROFILE_NAMES, check_parameter_names, notebook_values
from .progress import MODE_ENV

# A run's progress line or a note under it ("run 3/32 lora | step 40/250 ..."); "[run 3/32] ...: training" stays.
PROGRESS_LINE = re.compile(r"^run \d+/\d+ \S+ \| .*(?:\n|$)", re.MULTILINE)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # a progress bar drawn in JupyterLab
# nbconvert's "lab" page without the scripts it loads from a CDN (the notebook needs none: its math is MathML).
REPORT_TEMPLATE = "peft-lab-report.html.j2"
REPORT_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def execute_notebook(source: Path, executed: Path, parameters: dict[str, Any]) -> None:
    """Run ``source`` into ``executed`` with ``parameters``, forwarding its output live; the names are checked first
    (a misspelt one would go unused)."""
    import papermill
    from traitlets.config import Config

    check_parameter_names(parameters, NOTEBOOK_PARAMETERS)
    # The kernel talks over IPC sockets (no network port, no warning that TCP is not encrypted) in a private (0700),
    # short folder: a Unix socket path may not exceed about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="peft-lab-") as sockets:
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "kernel")}})
        papermill.execute_notebook(str(source), str(executed), parameters=parameters, config=ipc,
                                   progress_bar=False, stdout_file=sys.stdout, stderr_file=sys.stderr)


def without_progress(notebook):
    """A copy of ``notebook`` (an ``nbformat`` node) without :data:`PROGRESS_LINE` lines and progress-bar widgets:
    the terminal showed them live, and a saved page of a hundred "step 40/250" lines buries the results."""
    notebook = copy.deepcopy(notebook)
    for cell in (cell for cell in notebook.cells if cell.cell_type == "code"):
        for output in cell.outputs:
            if output.output_type == "stream":
                output.text = PROGRESS_LINE.sub("", "".join(output.text))
        cell.outputs = [output for output in cell.outputs if output.get("text", True)
                        and WIDGET_VIEW not in output.get("data", {})]
    return notebook


def committed_copy(executed):
    """The executed notebook as ``peft.ipynb`` keeps it: without progress, without papermill's injected parameters
    cell (JupyterLab must run the notebook's own) and without papermill's and nbclient's timings."""
    notebook = without_progress(executed)
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    for metadata in (notebook.metadata, *(cell.metadata for cell in notebook.cells)):
        metadata.pop("papermill", None)
        metadata.pop("execution", None)
    return notebook


def export_html(executed: Path) -> Path:
    """The executed notebook as one HTML file beside it that reads offline: figures embedded, formulas as MathML
    (nbconvert's default loads MathJax from a CDN), no script, no progress lines."""
    import nbformat
    from jinja2 import DictLoader
    from latex2mathml.converter import convert
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class MathMLRenderer(IPythonRenderer):
        def inline_math(self, body: str) -> str:
            return convert(body)

        def block_math(self, body: str) -> str:
            return convert(body, display="block")

    def markdown2html(source: str) -> str:  # HTMLExporter's own filter, with the renderer above
        return MarkdownWithMath(renderer=MathMLRenderer(escape=False)).render(source)

    exporter = HTMLExporter(template_name="lab", template_file=REPORT_TEMPLATE,
                            extra_loaders=[DictLoader({REPORT_TEMPLATE: REPORT_TEMPLATE_SOURCE})],
                            filters={"markdown2html": markdown2html})
    notebook = without_progress(nbformat.read(executed, as_version=4))
    html, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": executed.stem}})
    path = executed.with_suffix(".html")
    path.write_text(html, encoding="utf-8")
    return path


def closing_summary(results_dir: Path, executed: Path, html: Path, imgs_dir: Path) -> str:
    """The results table (each series' setting asked for last), the other settings tried in the folder where there
    are any, and where everything is: the last thing ``make run`` prints."""
    from .report import format_summary, settings_text
    from .store import RunStore

    table = format_summary(RunStore(results_dir).summary())
    several = settings_text(results_dir)
    return "\n".join(["", "Results:", table.to_string(index=False) if not table.empty else "(no finished run)", "",
                      *([several, ""] if several else []), f"Executed notebook: {executed}",
                      f"HTML report:       {html}  (open it in any browser)", f"Run records:       {results_dir}/",
                      f"Figures:           {imgs_dir}/  " + " ".join(p.name for p in sorted(imgs_dir.glob("*.png")))])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.run_notebook", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", choices=("auto", *PROFILE_NAMES))
    parser.add_argument("--data-dir", default="", help="folder holding sst2/ (and gpt2-tokenizer/); '': the hub")
    parser.add_argument("--results-dir", help="run records (default: results/<profile>)")
    parser.add_argument("--imgs-dir", default="imgs", help="where the figures are written (default: imgs)")
    parser.add_argument("--notebook", type=Path, default=Path("peft.ipynb"))
    parser.add_argument("--output", type=Path, default=Path("peft.out.ipynb"), help="the executed notebook")
    parser.add_argument("--commit-outputs", action="store_true",
                        help="also save the executed notebook, cleaned, over --notebook (docs/notebook.md)")
    args = parser.parse_args(argv)
    if args.output.resolve() == args.notebook.resolve():
        parser.error(f"--output {args.output} is the notebook itself: the executed copy must be another file "
                     "(--commit-outputs saves a cleaned copy over the notebook)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    args = _parse_args(argv)
    # For the kernel: progress as plain lines, which read well once forwarded (a bar's carriage returns do not).
    os.environ.setdefault(MODE_ENV, "lines")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    values = notebook_values(args.profile)
    results_dir = Path(args.results_dir or values["results_dir"])
    parameters = {**values, "data_dir": args.data_dir, "results_dir": str(results_dir), "imgs_dir": args.imgs_dir}
    print(f"Running {args.notebook} ({values['profile']} profile) -> {args.output}", flush=True)
    try:
        execute_notebook(args.notebook, args.output, parameters)
    except PapermillExecutionError as error:
        print(f"\nerror: {error.ename}: {error.evalue}\n(in cell {error.exec_count} of {args.notebook}; the "
              f"executed notebook with the full traceback is {args.output})", file=sys.stderr)
        return 1
    html = export_html(args.output)
    if args.commit_outputs:
        nbformat.write(committed_copy(nbformat.read(args.output, as_version=4)), args.notebook)
        print(f"Saved the outputs, cleaned, in {args.notebook}", flush=True)
    print(closing_summary(results_dir, args.output, html, Path(args.imgs_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
