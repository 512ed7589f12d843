"""``make run``: execute ``peft.ipynb`` with live progress in the terminal, then say what it produced and where.

papermill's command line shows only a cell counter while a cell trains for minutes, and its kernel warns that it
runs over TCP without encryption. This driver calls papermill's Python API instead, so that:

- the kernel talks over IPC sockets in a private temporary folder (no network port, no warning);
- everything the notebook prints (the per-run progress lines of :mod:`peft_utils.progress`, evaluation results,
  real warnings) is forwarded to this terminal as it happens;
- at the end it writes the executed notebook as a self-contained HTML report (figures embedded) and prints the
  results table and the paths of the notebook, the report and the figures.

A cell that fails on the user's input (a wrong path, an unknown method) ends with one line naming the error.

    python -m peft_utils.run_notebook --profile smoke --data-dir ../shared/data --imgs-dir results/smoke/imgs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .progress import MODE_ENV

NOTEBOOK = Path("peft.ipynb")
EXECUTED = Path("peft.out.ipynb")


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

    The parameters' names are checked first (:func:`~peft_utils.config.check_parameter_names`): the notebook
    refuses a misspelt one too, but only once a kernel has started and imported torch.
    The kernel inherits this process's environment (see :func:`main` for what ``make run`` sets there).
    """
    import papermill

    from .config import CONFIG_NAMES, check_parameter_names

    check_parameter_names(parameters, CONFIG_NAMES)
    with tempfile.TemporaryDirectory(prefix="peft-lab-") as socket_dir:
        papermill.execute_notebook(
            str(source), str(executed), parameters=parameters, cwd=str(cwd), progress_bar=False,
            stdout_file=sys.stdout, stderr_file=sys.stderr, kernel_manager_class=_ipc_kernel_manager(socket_dir),
        )


def export_html(executed: Path) -> Path:
    """The executed notebook as one HTML file beside it; figures are embedded, so it opens in any browser."""
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter(template_name="lab", embed_images=True).from_filename(str(executed))
    path = executed.with_suffix(".html")
    path.write_text(html, encoding="utf-8")
    return path


def closing_summary(results_dir: Path, executed: Path, html: Path, imgs_dir: Path) -> str:
    """The results table and where everything is, as the last thing ``make run`` prints."""
    from .report import format_summary
    from .store import RunStore

    table = format_summary(RunStore(results_dir).summary())
    figures = sorted(imgs_dir.glob("*.png"))
    lines = ["", "Results:", table.to_string(index=False) if not table.empty else "(no finished run)", "",
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    from .config import PROFILES, resolve_profile

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
    parameters = {"profile": profile, "data_dir": args.data_dir, "results_dir": str(results_dir),
                  "imgs_dir": args.imgs_dir}
    print(f"Running {args.notebook} ({profile} profile) -> {args.output}", flush=True)
    try:
        execute_notebook(args.notebook, args.output, parameters)
    except PapermillExecutionError as error:
        print(f"\nerror: {error.ename}: {error.evalue}\n(in cell {error.exec_count} of {args.notebook}; the "
              f"executed notebook with the full traceback is {args.output})", file=sys.stderr)
        return 1
    html = export_html(args.output)
    print(closing_summary(results_dir, args.output, html, Path(args.imgs_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
