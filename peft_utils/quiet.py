"""Known-harmless messages from our dependencies, silenced at their source, one exact message at a time.

A newcomer cannot tell noise from trouble, so every message they see must matter. Each filter here drops one
message we have read and judged harmless, on the one logger that emits it, and lets every other record through:

- bitsandbytes (on CPUs with AVX512-BF16) logs "Failed to load CPU gemm_4bit_forward from kernels-community" at
  every import when the optional ``kernels`` package is absent. That kernel serves bitsandbytes' repacked CPU
  inference layout, which ``core.quant.load_4bit`` turns off, so nothing is lost.
- transformers logs a multi-line "LOAD REPORT" whenever a checkpoint lacks some weights. Loading a pretrained body
  under a new classification head always lacks exactly the head: :func:`from_pretrained_noting_new_head` replaces
  that report with one line, and re-emits the full report whenever anything else is missing or unexpected.
- transformers 5 deprecates ``PreTrainedModel.is_gradient_checkpointing`` (a FutureWarning on every read), and
  peft 0.21 reads it each time it wraps a model (``PeftModel.from_pretrained``): the message is addressed to
  peft's maintainers, not to a user loading an adapter, and the attribute still answers correctly.

Progress bars that say nothing to a user are off too, only while the load that draws them runs
(:func:`datasets_bars_off`, :func:`loading_bars_off`): ``datasets``' "Generating train split" and "Map" bars over a
240-row CSV, and transformers' "Loading weights" bar at every model built. The project's own progress lines
(:mod:`peft_utils.progress`) say what runs; a download keeps huggingface_hub's bar, which does.
"""
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


class DropMessage(logging.Filter):
    """Drops the records whose message contains ``text``; every other record passes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Install the permanent filters (idempotent). Cheap: it imports nothing but ``logging``."""
    logger = logging.getLogger(BNB_CPU_OPS_LOGGER)
    if not any(isinstance(f, DropMessage) and f.text == BNB_KERNELS_NOTICE for f in logger.filters):
        logger.addFilter(DropMessage(BNB_KERNELS_NOTICE))
    warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING_READ, category=FutureWarning,
                            module="transformers.modeling_utils")


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """``datasets``' progress bars off while the block runs, as they were after it. A user's own
    ``HF_DATASETS_DISABLE_PROGRESS_BARS`` wins: the library itself refuses (with a warning) to override it."""
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
    """transformers' progress bars ("Loading weights") off while the block runs, as they were after it. A user's own
    ``HF_HUB_DISABLE_PROGRESS_BARS`` wins (transformers' switch follows it).

    transformers' switch turns huggingface_hub's bars off with its own; those are turned back on at once, so that
    a model being downloaded still shows its download."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not None or not transformers_logging.is_progress_bar_enabled():
        yield
        return
    hub_bars = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if hub_bars:
        enable_progress_bars()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()  # huggingface_hub's on with it: as they were
        if not hub_bars:
            disable_progress_bars()


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT records (to re-emit them if they turn out to matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if LOAD_REPORT_MARK in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextmanager
def _load_report_held() -> Iterator[_HoldLoadReport]:
    logger = logging.getLogger(TRANSFORMERS_LOAD_LOGGER)
    hold = _HoldLoadReport()
    logger.addFilter(hold)
    try:
        yield hold
    except BaseException:
        logger.removeFilter(hold)
        _release(logger, hold)  # the report explains the failure: show it
        raise
    logger.removeFilter(hold)


def _release(logger: logging.Logger, hold: _HoldLoadReport) -> None:
    for record in hold.held:
        logger.handle(record)


def new_head_keys(model, loading_info: dict[str, Any]) -> list[str]:
    """The task head's keys (outside the base model) that were missing, or re-initialised because the checkpoint's
    head has another number of classes, when nothing else is amiss.

    Returns ``[]`` when the load was not exactly "pretrained body + new head": another missing or mismatched key,
    an unexpected key, or no new key at all.
    """
    body = f"{model.base_model_prefix}."
    mismatched = [key[0] if isinstance(key, tuple) else key for key in loading_info.get("mismatched_keys", ())]
    new = sorted({*loading_info.get("missing_keys", ()), *mismatched})
    if any(loading_info.get(kind) for kind in ("unexpected_keys", "error_msgs")):
        return []
    if not new or any(key.startswith(body) for key in new):
        return []
    return new


def from_pretrained_noting_new_head(model_class, source: str, announce: bool = True, **kwargs: Any):
    """``model_class.from_pretrained(source, **kwargs)``, with transformers' LOAD REPORT for a freshly initialised
    classification head replaced by one line: ``new classification head: 2 labels, randomly initialised`` (by
    nothing without ``announce``: a base whose head an adapter replaces next).

    Any other report (missing body weights, unexpected or mismatched keys) is shown in full, as transformers
    wrote it.
    """
    with _load_report_held() as hold, loading_bars_off():
        # a checkpoint's head for another number of classes is replaced by a new one, as a missing head would be
        model, info = model_class.from_pretrained(source, output_loading_info=True,
                                                  **{"ignore_mismatched_sizes": True, **kwargs})
    if hold.held and new_head_keys(model, info):
        if announce:
            print(f"new classification head: {model.config.num_labels} labels, randomly initialised", flush=True)
    else:
        _release(logging.getLogger(TRANSFORMERS_LOAD_LOGGER), hold)
    return model
