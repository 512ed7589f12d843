"""``make run``: execute ``peft.ipynb`` with live progress in the terminal, then say what it produced and where.

papermill's command line shows only a cell counter while a cell trains for minutes, and its kernel warns that it
runs over TCP without encryption. This driver calls papermill's Python API instead, so that:

- the kernel talks over IPC sockets in a private temporary folder (no network port, no warning);
- everything the notebook prints (the per-run progress lines of :mod:`peft_utils.progress`, evaluation results,
  real warnings) is forwarded to this terminal as it happens;
- at the end it writes the executed notebook as a self-contained HTML report and prints the results table and
  the paths of the notebook, the report and the figures.

The report reads offline: figures are embedded, the formulas are rendered to MathML when the report is written
(nbconvert's default loads MathJax from a CDN, so offline a reader would see raw TeX), and no script is loaded from
anywhere. The per-run progress lines, which the terminal showed live, are left out of it (:data:`PROGRESS_LINE`);
the executed notebook keeps them.

``--commit-outputs`` also writes the executed notebook, cleaned (:func:`committed_copy`), over ``--notebook``: how
the outputs saved in ``peft.ipynb`` are made (docs/notebook.md). Without it the source notebook is never written.

A cell that fails on the user's input (a wrong path, an unknown method) ends with one line naming the error.

    python -m peft_utils.run_notebook --profile smoke --data-dir ../shared/data --imgs-dir results/smoke/imgs
"""
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

from .progress import MODE_ENV

NOTEBOOK = Path("peft.ipynb")
EXECUTED = Path("peft.out.ipynb")
# A progress line of one run (peft_utils.progress, labelled ``run <i>/<n> <method>`` by experiment.run_plan) or a
# note under it: "run 3/32 lora | step 40/250 (16%) | 3.1 steps/s | ...", "run 3/32 lora | step 125: dev accuracy
# ...". The lines that say what happened to each run ("[run 3/32] ...: training", "... already complete ...,
# skipped") are not progress, and stay.
PROGRESS_LINE = re.compile(r"^run \d+/\d+ \S+ \| .*(?:\n|$)", re.MULTILINE)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # a progress bar drawn in JupyterLab
# nbconvert's "lab" page without its CDN scripts: require.js and widgets (this notebook has neither JavaScript
# outputs nor widgets), MathJax (the math is MathML already) and mermaid (no diagrams).
REPORT_TEMPLATE = "peft-lab-report.html.j2"
REPORT_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _ipc_kernel_manager(socket_dir: str) -> type:
    """A kernel manager whose kernel listens on IPC sockets in ``socket_dir`` instead of local TCP ports.

    The folder is private (``mkdtemp`` makes it 0700) and short, because a Unix socket path may not exceed about
    100 bytes, which a kernel's default (next to its connection file, in a project's runtime folder) can.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return os.path.join(socket_dir, "kernel")

    return IPCKernelManager


def execute_notebook(source: Path, executed: Path, parameters: dict[str, Any], cwd: Path | str = ".") -> None:
    """Run ``source`` into ``executed`` with ``parameters``, forwarding its printed output live.

    The parameters' names are checked first (:func:`~peft_utils.config.check_parameter_names`): the notebook reads
    the names of its parameters cell and no other, so a misspelt one would be an unused variable there.
    The kernel inherits this process's environment (see :func:`main` for what ``make run`` sets there).
    """
    import papermill

    from .config import NOTEBOOK_PARAMETERS, check_parameter_names

    check_parameter_names(parameters, NOTEBOOK_PARAMETERS)
    with tempfile.TemporaryDirectory(prefix="peft-lab-") as socket_dir:
        papermill.execute_notebook(
            str(source), str(executed), parameters=parameters, cwd=str(cwd), progress_bar=False,
            stdout_file=sys.stdout, stderr_file=sys.stderr, kernel_manager_class=_ipc_kernel_manager(socket_dir),
        )


def without_progress(notebook):
    """A copy of ``notebook`` (an ``nbformat`` node) without per-run progress: :data:`PROGRESS_LINE` lines are
    dropped from printed output, and progress-bar widgets (which need JupyterLab to draw) from displayed output.

    Why: the terminal showed the progress live; a saved page of a hundred "step 40/250" lines buries the results.
    """
    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text = output["text"] if isinstance(output["text"], str) else "".join(output["text"])
                output["text"] = PROGRESS_LINE.sub("", text)
                if not output["text"]:
                    continue
            elif WIDGET_VIEW in output.get("data", {}):
                continue
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept
    return notebook


def committed_copy(executed):
    """The executed notebook as ``peft.ipynb`` keeps it: without papermill's injected parameters cell (the notebook
    opened in JupyterLab must run its own parameters cell, not the ones a run injected), without volatile metadata
    (papermill's record and timings, nbclient's execution timestamps) and without progress."""
    notebook = without_progress(executed)
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    notebook.metadata.pop("papermill", None)
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    return notebook


def _report_exporter():
    """nbconvert's HTML exporter (the "lab" look, figures embedded) with every formula rendered to MathML and the
    :data:`REPORT_TEMPLATE`: the page needs no network and no script to show its math."""
    from jinja2 import DictLoader, pass_context
    from latex2mathml.converter import convert
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class MathMLRenderer(IPythonRenderer):
        def inline_math(self, body: str) -> str:
            return convert(body)

        def block_math(self, body: str) -> str:
            return convert(body, display="block")

        def latex_environment(self, name: str, body: str) -> str:
            return convert(f"\\begin{{{name}}}{body}\\end{{{name}}}", display="block")

    class ReportExporter(HTMLExporter):
        @pass_context
        def markdown2html(self, context, source: str) -> str:  # HTMLExporter's, with the renderer above
            cell = context.get("cell", {})
            renderer = MathMLRenderer(
                escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
                path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                anchor_link_text=self.anchor_link_text, exclude_anchor_links=self.exclude_anchor_links,
                **self.lexer_options,
            )
            return MarkdownWithMath(renderer=renderer).render(source)

    return ReportExporter(template_name="lab", template_file=REPORT_TEMPLATE, embed_images=True,
                          extra_loaders=[DictLoader({REPORT_TEMPLATE: REPORT_TEMPLATE_SOURCE})])


def export_html(executed: Path) -> Path:
    """The executed notebook as one HTML file beside it that opens in any browser, offline: figures embedded, math
    as MathML, no script from a CDN, no progress lines (:func:`without_progress`)."""
    import nbformat

    notebook = without_progress(nbformat.read(executed, as_version=4))
    resources = {"metadata": {"name": executed.stem, "path": str(executed.parent)}}
    html, _ = _report_exporter().from_notebook_node(notebook, resources=resources)
    path = executed.with_suffix(".html")
    path.write_text(html, encoding="utf-8")
    return path


def closing_summary(results_dir: Path, executed: Path, html: Path, imgs_dir: Path) -> str:
    """The results table (each series' setting asked for last: the notebook's), the other settings tried in the
    folder where there are any, and where everything is, as the last thing ``make run`` prints."""
    from .report import format_summary, settings_text
    from .store import RunStore

    table = format_summary(RunStore(results_dir).summary())
    figures = sorted(imgs_dir.glob("*.png"))
    several = settings_text(results_dir)
    lines = ["", "Results:", table.to_string(index=False) if not table.empty else "(no finished run)", "",
             *([several, ""] if several else []),
             f"Executed notebook: {executed}", f"HTML report:       {html}  (open it in any browser)",
             f"Run records:       {results_dir}/",
             f"Figures:           {imgs_dir}/  " + " ".join(path.name for path in figures)]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_utils.run_notebook", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", help="auto | full | cpu | smoke")
    parser.add_argument("--data-dir", default="", help="folder holding sst2/ (and gpt2-tokenizer/); '': the hub")
    parser.add_argument("--results-dir", help="run records (default: results/<profile>)")
    parser.add_argument("--imgs-dir", default="imgs", help="where the figures are written (default: imgs)")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    parser.add_argument("--output", type=Path, default=EXECUTED, help="the executed notebook (default: peft.out.ipynb)")
    parser.add_argument("--commit-outputs", action="store_true",
                        help="also save the executed notebook, cleaned, over --notebook (how peft.ipynb's saved "
                             "outputs are made; see docs/notebook.md)")
    args = parser.parse_args(argv)
    if args.output.resolve() == args.notebook.resolve():
        parser.error(f"--output {args.output} is the notebook itself: the executed copy must be another file "
                     "(--commit-outputs saves a cleaned copy over the notebook)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    from .config import PROFILES, notebook_values, resolve_profile

    args = _parse_args(argv)
    # For the kernel: progress as plain lines, which read well once forwarded (a bar's carriage returns do not),
    # and no transformers "Loading weights" bar, which would arrive here as carriage-return noise.
    os.environ.setdefault(MODE_ENV, "lines")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        profile = resolve_profile(args.profile)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir or PROFILES[profile].results_dir)
    # every name of the parameters cell, with the profile's value: papermill's cell under it shows what trains
    parameters = {**notebook_values(profile), "data_dir": args.data_dir, "results_dir": str(results_dir),
                  "imgs_dir": args.imgs_dir}
    print(f"Running {args.notebook} ({profile} profile) -> {args.output}", flush=True)
    try:
        execute_notebook(args.notebook, args.output, parameters)
    except PapermillExecutionError as error:
        print(f"\nerror: {error.ename}: {error.evalue}\n(in cell {error.exec_count} of {args.notebook}; the "
              f"executed notebook with the full traceback is {args.output})", file=sys.stderr)
        return 1
    html = export_html(args.output)
    if args.commit_outputs:
        import nbformat

        nbformat.write(committed_copy(nbformat.read(args.output, as_version=4)), args.notebook)
        print(f"Saved the outputs, cleaned, in {args.notebook}", flush=True)
    print(closing_summary(results_dir, args.output, html, Path(args.imgs_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
