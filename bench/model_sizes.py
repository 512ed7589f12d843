"""In-memory size of GPT-2 Large: fp32 vs NF4 (without / with double quantisation) vs the analytic bound, and the
LoRA adapter file, printed as a Markdown table next to the seed article's figures.

    python bench/model_sizes.py                 # GPT-2 Large shape, random weights (~6 GB RAM, a few minutes on CPU)
    python bench/model_sizes.py --size tiny     # smoke test

The model is random-initialised from ``gpt2_config(size)``, written to a temporary folder with the real GPT-2
tokenizer (``save_random_gpt2``) and read back through the same loaders the experiments use (``load_model`` for
fp32, ``load_quantized`` for NF4), so the 4-bit numbers come from transformers' real quantisation path. Sizes
depend on shapes and dtypes only, not on weight values. The folder is deleted at the end.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python bench/model_sizes.py` works as well as `python -m bench.model_sizes`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from peft_utils.checkpoints import save_adapters
from peft_utils.data import find_gpt2_tokenizer
from peft_utils.core.inject import apply_adapters
from peft_utils.models import GPT2_SHAPES, load_model, load_quantized, save_random_gpt2
from peft_utils.sizes import model_size, nf4_bits_per_weight

REPO = Path(__file__).resolve().parents[1]
# Reported by the seed article for GPT-2 Large (its "GB"; 2.88 matches GiB: 774M params x 4 B = 3.10e9 B).
ARTICLE_FP32_GB, ARTICLE_4BIT_GB = 2.88, 0.46


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(size: str, tokenizer_dir: Path, rank: int) -> dict:
    """Every number of the table, from one random GPT-2 of shape ``size`` written to and read from a temp folder."""
    sizes: dict = {}
    with tempfile.TemporaryDirectory(prefix="peft-lab-sizes-") as tmp:
        folder = Path(tmp) / f"gpt2-{size}"
        start = time.perf_counter()
        save_random_gpt2(folder, tokenizer_dir, size)
        gc.collect()
        log(f"random GPT-2 {size} written in {time.perf_counter() - start:.0f}s")

        model, _ = load_model(folder)
        sizes["fp32"] = model_size(model, "full")
        sizes["n_params"] = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()

        for double_quant in (False, True):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _ = load_quantized(folder, compute_dtype=torch.float32, double_quant=double_quant,
                                          device_map={"": "cpu"})
            log(f"NF4 (double_quant={double_quant}) loaded in {time.perf_counter() - start:.0f}s")
            sizes[f"nf4_dq{int(double_quant)}"] = model_size(model, "full")
            if double_quant:
                sizes["n_quantized"] = sum(int(torch.Size(p.quant_state.shape).numel())
                                           for p in model.parameters() if getattr(p, "quant_state", None) is not None)
                model = apply_adapters(model, "lora", ["c_attn"], rank=rank, alpha=2 * rank)
                sizes["adapter_file"] = save_adapters(model, Path(tmp) / "adapter")
                sizes["qlora"] = model_size(model, "qlora", saved_bytes=sizes["adapter_file"])
                sizes["lora"] = model_size(model, "lora", saved_bytes=sizes["adapter_file"])
                sizes["adapter_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                # What a 16-bit load of the un-quantised share (torch_dtype=bf16, the usual QLoRA recipe) holds:
                # measured on the same model after casting its embeddings, norms, biases and head to bf16.
                model = model.requires_grad_(False)
                for parameter in model.parameters():
                    if getattr(parameter, "quant_state", None) is None and parameter.is_floating_point():
                        parameter.data = parameter.data.to(torch.bfloat16)
                sizes["nf4_dq1_bf16_rest"] = model_size(model, "full")
            del model
            gc.collect()
    return sizes


def table(sizes: dict, size: str, rank: int) -> str:
    fp32 = sizes["fp32"]["total_bytes"]
    dq0, dq1, bf16_rest = sizes["nf4_dq0"], sizes["nf4_dq1"], sizes["nf4_dq1_bf16_rest"]
    rest_fp32 = dq1["frozen_bytes"] + dq1["trainable_bytes"]  # the un-quantised share (embeddings, norms, head...)
    n_q = sizes["n_quantized"]

    def row(label, n_bytes, source, reference=fp32):
        """``reference``: the fp32 bytes of the same thing (the whole model unless a share is shown)."""
        gb, gib = n_bytes / 1e9, n_bytes / 2**30
        return f"| {label} | {n_bytes:,} | {gb:.3f} | {gib:.3f} | {reference / n_bytes:.2f}x | {source} |"

    def share(report):
        return report["quantized_bytes"] + report["quant_state_bytes"]

    lines = [
        f"GPT-2 {size} ({sizes['n_params'] / 1e6:.1f}M parameters, {n_q / 1e6:.1f}M of them in 4-bit layers; "
        f"random weights, CPU, bitsandbytes NF4, blocksize 64)",
        "",
        "| What | Bytes | GB (1e9) | GiB | fp32 of the same / this | Source |",
        "|---|---:|---:|---:|---:|---|",
        row("fp32, every weight", fp32, "measured (`model_size`)"),
        row("NF4, no double quant; un-quantised share fp32", dq0["total_bytes"], "measured (`load_quantized`)"),
        row("NF4 + double quant; un-quantised share fp32", dq1["total_bytes"], "measured (`load_quantized`)"),
        row("NF4 + double quant; un-quantised share bf16", bf16_rest["total_bytes"], "measured (rest cast to bf16)"),
        row("analytic: NF4 bound (4.127 bit) + fp32 share", dq1["nf4_bound_bytes"] + rest_fp32,
            "n x bits/8 + measured rest"),
        row("4-bit layers only, no double quant", share(dq0),
            f"measured; bound {dq0['nf4_bound_bytes']:,} B (4.5 bit)", 4 * n_q),
        row("4-bit layers only, double quant", share(dq1),
            f"measured; bound {dq1['nf4_bound_bytes']:,} B ({nf4_bits_per_weight():.3f} bit)", 4 * n_q),
        row("un-quantised share (embeddings, norms, biases, head), fp32", rest_fp32, "measured", rest_fp32),
        row(f"LoRA r={rank} adapter file (c_attn + score head)", sizes["adapter_file"],
            f"measured (`save_adapters`, {sizes['adapter_params']:,} params)"),
        row("QLoRA ship: 4-bit base + adapter", sizes["qlora"]["disk_bytes"], "`model_size(..., 'qlora')`"),
        f"| fp32 GPT-2 Large | — | {ARTICLE_FP32_GB} \"GB\" | — | 1.00x | **reported by the seed article** |",
        f"| 4-bit GPT-2 Large | — | {ARTICLE_4BIT_GB} \"GB\" | — | {ARTICLE_FP32_GB / ARTICLE_4BIT_GB:.2f}x "
        "| **reported by the seed article** |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="large", choices=sorted(GPT2_SHAPES))
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the shared data folder's gpt2-tokenizer/")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        tokenizer_dir = args.tokenizer_dir or find_gpt2_tokenizer(REPO.parent / "shared" / "data")
    except FileNotFoundError as error:
        parser.error(f"{error} (or pass --tokenizer-dir)")
    torch.manual_seed(0)
    print(table(measure(args.size, tokenizer_dir, args.rank), args.size, args.rank))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
