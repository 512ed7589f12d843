"""A newcomer's first hour: progress they can watch, inputs that fail kindly, no noise, `make run` / `make lab`."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from peft_utils import quiet, run_notebook
from peft_utils.data import load_sst2
from peft_utils.models import load_model, random_gpt2, resolve_model_source, save_random_gpt2
from peft_utils.progress import MODE_ENV, Progress, progress_mode
from peft_utils.config import TrainConfig
from peft_utils.store import RunRecorder
from peft_utils.train import Recording, train

TSV = "sentence\tlabel\na fine film \t1\nawful\t0\n"


# ------------------------------------------------------------------------------------------- progress


class CountingLoss:
    """A loss that counts how often it is read: reading a CUDA loss synchronises the device."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def test_progress_lines_show_label_step_rate_loss_and_eta():
    out = io.StringIO()
    progress = Progress(10, "run 2/5 lora", mode="lines", line_interval_s=0.0, stream=out)
    progress.update(4, torch.tensor(0.25))
    progress.write("step 4: dev accuracy 0.5000")
    progress.update(10, 0.125)
    progress.close()
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"run 2/5 lora \| step 4/10 \(40%\) \| [\d.]+ steps/s \| loss 0\.2500 \| ETA [\d.]+ s", lines[0])
    assert lines[1] == "run 2/5 lora | step 4: dev accuracy 0.5000"
    assert re.fullmatch(r"run 2/5 lora \| done 10 steps in [\d.]+ s \| [\d.]+ steps/s \| loss 0\.1250", lines[-1])


def test_progress_is_throttled_and_reads_the_loss_only_when_drawing():
    out = io.StringIO()
    progress = Progress(1000, "run 1/1 full", mode="lines", line_interval_s=3600.0, stream=out)
    loss = CountingLoss(0.5)
    for step in range(1, 1001):
        progress.update(step, loss)
    assert out.getvalue() == "" and loss.reads == 0  # no line, no read, for 1000 steps inside the interval
    progress.close()
    assert loss.reads == 1 and out.getvalue().count("\n") == 1 and "done 1000 steps" in out.getvalue()


def test_progress_bar_mode_draws_a_bar_with_the_label():
    out = io.StringIO()
    progress = Progress(8, "run 1/3 dora", mode="bar", stream=out)
    for step in range(1, 9):
        progress.update(step, 0.5)
    progress.close()
    assert "run 1/3 dora" in out.getvalue() and "8/8" in out.getvalue()


def test_progress_mode_from_environment(monkeypatch):
    monkeypatch.setenv(MODE_ENV, "lines")
    assert progress_mode() == "lines"
    monkeypatch.setenv(MODE_ENV, "bars")
    with pytest.raises(ValueError, match="PEFT_LAB_PROGRESS='bars': choose one of bar, lines, off"):
        progress_mode()


def test_train_reports_progress_under_the_given_label(gpt2_tokenizer, monkeypatch, capsys):
    monkeypatch.setenv(MODE_ENV, "lines")
    frame = pd.DataFrame({"sentence": ["good", "bad", "fine", "awful"] * 2, "label": [1, 0, 1, 0] * 2})
    config = TrainConfig(batch_size=4, max_length=8, device="cpu", log_every=1)
    train(random_gpt2("tiny"), gpt2_tokenizer, frame, frame, config, lr=1e-3, seed=0,
          recording=Recording(label="run 3/4 lora"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run 3/4 lora | step 2: dev accuracy ")
    assert re.fullmatch(r"run 3/4 lora \| done 2 steps in .* \| loss \d\.\d{4}", lines[-1])


# ------------------------------------------------------------------------------------------- TSV input


def _sst2_folder(folder: Path, train: bytes) -> Path:
    folder.mkdir()
    (folder / "train.tsv").write_bytes(train)
    (folder / "dev.tsv").write_text(TSV, encoding="utf-8")
    return folder


def test_tsv_with_a_byte_order_mark_reads_like_without(tmp_path):
    plain = _sst2_folder(tmp_path / "plain", TSV.encode("utf-8"))
    bom = _sst2_folder(tmp_path / "bom", TSV.encode("utf-8-sig"))
    assert (bom / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    pd.testing.assert_frame_equal(load_sst2(bom)["train"], load_sst2(plain)["train"])


def test_non_utf8_byte_names_file_and_byte(tmp_path):
    folder = _sst2_folder(tmp_path / "sst2", TSV.encode() + "caf\xe9 au lait\t1\n".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        load_sst2(folder)
    assert str(error.value).startswith(f"dataset {folder / 'train.tsv'}: cannot read it as csv: 'utf-8' codec can't "
                                       "decode byte 0xe9")


# ------------------------------------------------------------------------------------------- model input


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "a/b/c", "~/models/gpt2"])
def test_missing_local_model_path_says_so(name):
    with pytest.raises(FileNotFoundError) as error:
        load_model(name)
    message = str(error.value)
    assert message.startswith(f"model path {name} does not exist (it is read as a local folder, not a hub id")
    assert "\n" not in message


def test_missing_folder_under_an_existing_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="model path models/gpt2-tuned does not exist"):
        resolve_model_source("models/gpt2-tuned")


def test_folder_without_config_json_says_so(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(f"model folder {tmp_path} has no config.json")):
        load_model(tmp_path)


def test_hub_ids_and_model_folders_pass_unchanged(tmp_path, gpt2_tokenizer_dir):
    assert resolve_model_source("openai-community/gpt2-large") == "openai-community/gpt2-large"
    assert resolve_model_source("gpt2") == "gpt2"
    folder = save_random_gpt2(tmp_path / "tiny", gpt2_tokenizer_dir)
    assert resolve_model_source(folder) == str(folder)


# ------------------------------------------------------------------------------------------- noise


def _stderr_of(*programs: str) -> list[str]:
    """The standard error of each program, run side by side in fresh interpreters (import-time messages)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
            for code in programs]
    return [run.communicate(timeout=120)[1] for run in runs]


def test_bitsandbytes_kernels_notice_is_silenced_and_other_warnings_kept():
    silenced, plain = _stderr_of(
        "import logging, peft_utils.models, bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real warning')",
        "import bitsandbytes",
    )
    assert quiet.BNB_KERNELS_NOTICE not in silenced
    assert "a real warning" in silenced
    if quiet.BNB_KERNELS_NOTICE not in plain:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not log the notice here")


def test_peft_reading_a_deprecated_attribute_is_silenced_and_other_future_warnings_kept():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model; the user cannot
    act on that FutureWarning, so it is dropped (and only it: another FutureWarning still shows)."""
    program = ("import warnings, transformers\n{setup}"
               "model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2))\n"
               "model.is_gradient_checkpointing\n"
               "warnings.warn('another deprecation', FutureWarning)\n")
    silenced, plain = _stderr_of(program.format(setup="import peft_utils.models\n"), program.format(setup=""))
    assert quiet.DEPRECATED_CHECKPOINTING_READ in plain  # the message exists: the filter is not vacuous
    assert quiet.DEPRECATED_CHECKPOINTING_READ not in silenced
    assert "another deprecation" in silenced


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_logs():
    logger, handler = logging.getLogger(quiet.TRANSFORMERS_LOAD_LOGGER), ListHandler()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_new_head_load_report_becomes_one_line(quantized, minilm_dir, load_logs, capsys):
    load_model(minilm_dir, quantized=quantized)
    assert capsys.readouterr().out.splitlines() == ["new classification head: 2 labels, randomly initialised"]
    assert not [m for m in load_logs if quiet.LOAD_REPORT_MARK in m]


def test_load_report_is_kept_when_body_weights_are_missing(tmp_path, gpt2_tokenizer_dir, load_logs, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_random_gpt2(tmp_path / "tiny", gpt2_tokenizer_dir)
    weights = load_file(folder / "model.safetensors")
    dropped = next(key for key in weights if ".h.0." in key)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    load_model(folder)
    assert "new classification head" not in capsys.readouterr().out
    reports = [m for m in load_logs if quiet.LOAD_REPORT_MARK in m]
    assert len(reports) == 1 and dropped.removeprefix("transformer.") in reports[0]


# ------------------------------------------------------------------------------------------- make run driver


def _tiny_notebook(path: Path, body: str) -> Path:
    parameters = nbformat.v4.new_code_cell('imgs_dir = "imgs"', metadata={"tags": ["parameters"]})
    notebook = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(body)])
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_run_notebook_forwards_output_writes_html_and_prints_table_and_paths(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MODE_ENV, raising=False)
    with RunRecorder(tmp_path / "results", "comparison-lora-r8-a16-s0-tiny") as recorder:
        recorder.log("config", run_id="comparison-lora-r8-a16-s0-tiny", group="comparison", method="lora",
                     trainable_params=2176)
        recorder.log("summary", final_accuracy=0.5, train_time_s=1.25, peak_memory_bytes=5e8, memory_kind="rss")
    notebook = _tiny_notebook(tmp_path / "in.ipynb", (
        "import os, pathlib, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from IPython.display import Image, display\n"
        "print('progress mode in the kernel:', os.environ['PEFT_LAB_PROGRESS'])\n"
        "pathlib.Path(imgs_dir).mkdir(exist_ok=True)\nplt.plot([0, 1]); plt.savefig(f'{imgs_dir}/line.png'); plt.close()\n"
        "display(Image(filename=f'{imgs_dir}/line.png'))"
    ))
    code = run_notebook.main(["--profile", "smoke", "--notebook", str(notebook), "--output", "out.ipynb",
                              "--results-dir", "results", "--imgs-dir", "imgs"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "progress mode in the kernel: lines" in out  # forwarded from the kernel
    assert "without encryption" not in err  # IPC transport
    assert re.search(r"comparison-lora-r8-a16-s0-tiny\s+lora\s+50\.0", out)
    for line in ("Executed notebook: out.ipynb", "HTML report:       out.html", "Figures:           imgs/  line.png"):
        assert line in out
    html = (tmp_path / "out.html").read_text()
    assert html.count('src="data:image/png;base64,') == 1  # the figure is inside the file


def test_run_notebook_failure_is_one_readable_line(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notebook = _tiny_notebook(tmp_path / "in.ipynb", "raise FileNotFoundError('model path ./x does not exist')")
    code = run_notebook.main(["--profile", "smoke", "--notebook", str(notebook), "--output", "out.ipynb"])
    err = capfd.readouterr().err
    assert code == 1
    assert "error: FileNotFoundError: model path ./x does not exist\n" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- make lab


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, token: str, method: str = "GET"):
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
        return json.loads(body) if body else None


def test_make_lab_serves_the_notebook_with_the_project_kernel():
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    lab_args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --ServerApp.port_retries=0 " \
               f"--IdentityProvider.token={token}"
    # -o: the environment is already installed (this test runs inside it); test the `lab` recipe only.
    server = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.installed", "lab", f"LAB_ARGS={lab_args}"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline, notebook = time.monotonic() + 60, None
        while notebook is None:
            assert server.poll() is None, f"make lab exited: {server.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
            try:
                notebook = _get_json(f"{base}/api/contents/peft.ipynb?content=1", token)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert notebook["type"] == "notebook"
        cells = notebook["content"]["cells"]
        assert any("parameters" in cell["metadata"].get("tags", []) for cell in cells)
        specs = _get_json(f"{base}/api/kernelspecs", token)
        argv = specs["kernelspecs"][notebook["content"]["metadata"]["kernelspec"]["name"]]["spec"]["argv"]
        assert Path(argv[0]).parent.parent.resolve() == Path(sys.prefix).resolve()  # the project's own venv
        _get_json(f"{base}/api/shutdown", token, method="POST")
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
