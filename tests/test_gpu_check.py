"""bench/gpu_check.py on the CPU (``--quick``): every part runs and passes its checks, so that the one-shot GPU check
works the first time a GPU is at hand. One to two minutes on 2 idle cores (tiny GPT-2, a few steps, one thread)."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path, sst2_dir, gpt2_tokenizer_dir):
    report, table = tmp_path / "GPU.md", tmp_path / "gpu.csv"
    env = {**os.environ, "PEFT_LAB_DATA": str(sst2_dir.parent), "HF_HUB_OFFLINE": "1",
           "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(REPO_ROOT / ".cache" / "matplotlib")),
           "PEFT_LAB_CACHE": os.environ.get("PEFT_LAB_CACHE", str(REPO_ROOT / ".cache" / "peft-lab"))}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(report), "--csv", str(table)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    text = report.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s[:3] for s in sections] == ["(a)", "(a)", "(b)", "(d)", "(e)", "(f)"], text
    for section in sections:
        title = section.splitlines()[0]
        assert "Status: **ok**" in section, title
        assert not re.search(r"FAILED|\*\*failed\*\*|\*\*stopped\*\*|\*\*skipped\*\*|\*\*partial\*\*", section), title
    for line in ("- versions: ", "- CPU: ", "- command: `python -m bench.gpu_check --device cpu --quick"):
        assert line in text

    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    statuses = {(r["part"], r["case"]): r["value"] for r in rows if r["key"] == "status"}
    assert statuses == {("a", "fp32"): "ok", ("a", "bf16"): "ok", ("b", "b"): "ok", ("d", "d"): "ok",
                        ("e", "e"): "ok", ("f", "f"): "ok"}

    def values(part: str, key: str) -> dict[str, str]:
        return {r["method"]: r["value"] for r in rows if r["part"] == part and r["key"] == key}

    assert set(values("a", "final_eval_loss")) == {"full", "lora", "dora", "qlora", "qdora"}
    assert set(values("b", "peak_bytes")) == {"full", "lora", "dora", "qlora", "qdora"}
    for ratio in values("b", "peak_over_estimate").values():  # the planner against the CPU allocator's peak
        assert 0.5 < float(ratio) < 2.0
    assert all(float(v) > 0 for v in values("b", "tokens_per_s").values())

    def cases(part: str, key: str) -> dict[tuple[str, str], float]:
        return {(r["case"], r["method"]): float(r["value"]) for r in rows if r["part"] == part and r["key"] == key}

    step_ms = cases("d", "step_ms")  # eager and compiled (dynamo's eager backend on a CPU), each method and shape
    assert {(mode, method) for (mode, method) in step_ms} == {(f"{mode}/{shape}", method) for mode in (
        "eager", "compiled") for shape in ("4x32", "sst2") for method in ("full", "lora")}
    assert all(v > 0 for v in step_ms.values()) and all(v > 0 for v in cases("d", "aten_ops").values())
    assert cases("d", "host_reads")[("eager/4x32", "lora")] >= 1  # the loop's one read of the loss, at least
    throughput = cases("e", "steps_per_s_in_all")
    assert set(throughput) == {("1 runs", "lora"), ("2 runs", "lora")} and all(v > 0 for v in throughput.values())
    minutes = cases("f", "eager_minutes")  # per method of the full profile (measured in (d) or (b)), and in all
    total = minutes.pop(("total", ""))
    assert {method for _, method in minutes} == {"full", "lora", "dora", "qlora", "qdora"}
    assert abs(sum(minutes.values()) - total) <= 1e-9 * total
