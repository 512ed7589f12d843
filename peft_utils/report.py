"""Small display helpers for the notebook: they format, they never compute results.

Kept here so that the notebook holds no logic, only calls.
"""
from __future__ import annotations

import inspect
from typing import Callable

import pandas as pd

from .config import ExperimentConfig, config_record
from .sizes import nf4_bits_per_weight


def show_source(*functions: Callable) -> None:
    """Show the source of library functions, so the notebook shows the code that actually runs.

    As Markdown, not printed: printed output is forwarded to the terminal by ``make run``, the source is for readers.
    """
    from IPython.display import Markdown, display

    for function in functions:
        display(Markdown(f"```python\n{inspect.getsource(function)}\n```"))


def describe_config(config: ExperimentConfig) -> str:
    """The resolved settings as a Markdown table (the profile's values with the notebook's parameters applied)."""
    rows = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in config_record(config).items())
    return f"| setting | value |\n|---|---|\n{rows}"


def describe_quantization() -> str:
    """Bits per weight of the 4-bit formats, from the same function the size report uses."""
    single, double = nf4_bits_per_weight(double_quant=False), nf4_bits_per_weight(double_quant=True)
    return (
        "| storage | bits per weight | vs fp32 |\n|---|---:|---:|\n"
        f"| fp32 | 32 | 1.00x |\n| bf16 | 16 | 2.00x |\n"
        f"| NF4, blocksize 64 | {single:.3f} | {32 / single:.2f}x |\n"
        f"| NF4 + double quantisation | {double:.3f} | {32 / double:.2f}x |"
    )


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader compares, with readable units (accuracy %, seconds, MB)."""
    if table.empty:
        return table
    out = pd.DataFrame({"run": table["run_id"], "method": table["method"]})
    out["dev accuracy %"] = (100 * table["final_accuracy"]).round(2)
    out["train time s"] = table["train_time_s"].round(1)
    out["peak memory MB"] = (table["peak_memory_bytes"] / 1e6).round(0)
    out["memory kind"] = table["memory_kind"]
    out["trainable params"] = table["trainable_params"]
    if "size.disk_bytes" in table:
        out["shipped MB"] = (table["size.disk_bytes"] / 1e6).round(2)
    return out


def format_predictions(predictions: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``inference.predict_runs`` output with runs named by method (and seed when there are several), in %."""
    several_seeds = table["seed"].nunique() > 1
    names = {row.run_id: f"{row.method} s{row.seed}" if several_seeds else row.method for row in table.itertuples()}
    out = predictions.rename(columns=names)
    runs = [names[r] for r in table["run_id"] if r in names]
    out[runs] = (100 * out[runs]).round(1)
    return out.rename(columns={name: f"{name}: P(positive) %" for name in runs})
