"""bench/gpu_check.py on the CPU (``--quick``): every part runs and passes its checks, so that the one-shot GPU check
works the first time a GPU is at hand. About a minute on 2 idle cores (tiny GPT-2, a few steps, one thread)."""
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
    assert [s[:3] for s in sections] == ["(a)", "(a)", "(a)", "(b)", "(c)"], text
    for section in sections:
        title = section.splitlines()[0]
        assert "Status: **ok**" in section, title
        assert not re.search(r"FAILED|\*\*failed\*\*|\*\*stopped\*\*|\*\*skipped\*\*|\*\*partial\*\*", section), title
    assert "fp16 on this device: refused, as expected" in text
    for line in ("- versions: ", "- CPU: ", "- command: `python -m bench.gpu_check --device cpu --quick"):
        assert line in text

    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    statuses = {(r["part"], r["case"]): r["value"] for r in rows if r["key"] == "status"}
    assert statuses == {("a", "fp32"): "ok", ("a", "bf16"): "ok", ("a", "fp16"): "ok", ("b", "b"): "ok",
                        ("c", "c"): "ok"}

    def values(part: str, key: str) -> dict[str, str]:
        return {r["method"]: r["value"] for r in rows if r["part"] == part and r["key"] == key}

    assert set(values("a", "final_eval_loss")) == {"full", "lora", "dora", "qlora", "qdora"}
    assert set(values("b", "peak_bytes")) == {"full", "lora", "dora", "qlora"}
    for ratio in values("b", "peak_over_estimate").values():  # the planner against the CPU allocator's peak
        assert 0.5 < float(ratio) < 2.0
    assert {m for m, v in values("c", "ours_over_peft").items() if v} == {"lora/ours", "dora/ours", "qlora/ours"}
    assert all(float(v) > 0 for v in values("b", "tokens_per_s").values())
    assert (tmp_path / "gpu-step_time.csv").is_file()
