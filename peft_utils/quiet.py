"""Known-harmless messages from our dependencies, silenced at their source one exact message at a time, and every
other message kept: a newcomer cannot tell noise from trouble, so every message they see must matter."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
TRANSFORMERS_LOAD_LOGGER = "transformers.modeling_utils"
LOAD_REPORT_MARK = "LOAD REPORT"
DEPRECATED_CHECKPOINTING_READ = "`is_gradient_checkpointing` is deprecated"


def _not_bnb_notice(record: logging.LogRecord) -> bool:
    return BNB_KERNELS_NOTICE not in record.getMessage()


def silence_known_noise() -> None:
    """bitsandbytes' notice that a CPU kernel is missing (it serves a layout ``core.quant.load_4bit`` turns off), and
    peft reading transformers' deprecated ``is_gradient_checkpointing`` (addressed to peft; the answer is right)."""
    logging.getLogger(BNB_CPU_OPS_LOGGER).addFilter(_not_bnb_notice)  # addFilter adds a filter once
    warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING_READ, category=FutureWarning,
                            module="transformers.modeling_utils")


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """``datasets``' bars ("Generating train split" over a small file) off while the block runs, unless they are off
    already or ``HF_DATASETS_DISABLE_PROGRESS_BARS`` decides (the library refuses, with a warning, to override it)."""
    import datasets
    from datasets import config

    if config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextmanager
def loading_bars_off() -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") off while the block runs, through its tqdm
    hook: its global switch would take huggingface_hub's with them, and a download keeps its bar."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.set_tqdm_hook(
        lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        transformers_logging.set_tqdm_hook(previous)


def _only_a_new_head(model, loading_info: dict[str, Any]) -> bool:
    """Whether the load was exactly "pretrained body + new head": keys outside the base model missing, or
    re-initialised for another number of classes, and nothing else missing, mismatched or unexpected."""
    mismatched = [key[0] if isinstance(key, tuple) else key for key in loading_info.get("mismatched_keys", ())]
    new = [*loading_info.get("missing_keys", ()), *mismatched]
    if not new or any(loading_info.get(kind) for kind in ("unexpected_keys", "error_msgs")):
        return False
    return not any(key.startswith(f"{model.base_model_prefix}.") for key in new)


def from_pretrained_noting_new_head(model_class, source: str, announce: bool = True, **kwargs: Any):
    """``model_class.from_pretrained(source, **kwargs)``, transformers' LOAD REPORT for a new classification head
    replaced by one line (by nothing without ``announce``: a base whose head an adapter replaces next). Any other
    report is shown in full, and so is a report before a failure (it explains it)."""
    logger, held, new_head = logging.getLogger(TRANSFORMERS_LOAD_LOGGER), [], False

    def hold(record: logging.LogRecord) -> bool:
        if LOAD_REPORT_MARK in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        with loading_bars_off():  # a checkpoint's head for another number of classes is replaced, as a missing one
            model, info = model_class.from_pretrained(source, output_loading_info=True,
                                                      **{"ignore_mismatched_sizes": True, **kwargs})
        new_head = bool(held) and _only_a_new_head(model, info)
    finally:
        logger.removeFilter(hold)
        for record in [] if new_head else held:
            logger.handle(record)
    if new_head and announce:
        print(f"new classification head: {model.config.num_labels} labels, randomly initialised", flush=True)
    return model
