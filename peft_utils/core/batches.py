"""Rows of text and label to padded batches, in an order that depends only on the seed.

Every method must see exactly the same rows in the same order for a given seed, otherwise accuracy differences
could come from the data rather than the method: hence a private seeded ``torch.Generator`` behind every shuffle.
Sentences are tokenised once and padded per batch, to the batch's own longest row (or a multiple above it); length
bucketing puts rows of similar length together so that little of each batch is padding.

One optimiser step takes one *global* batch, the same rows on every process; :func:`micro_batches` cuts out this
process's parts. Not accelerate's sharding: it fills a short last batch by repeating rows, while bucketing puts the
short batch anywhere in the epoch, and a repeated row would make N processes train another run than one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypedDict

import torch
from torch.utils.data import DataLoader, Sampler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]
# Bucketing sorts by length inside windows of this many batches: wide enough to group similar lengths
# (fewer pad tokens), narrow enough that the batch order stays well mixed across the epoch.
BUCKET_WINDOW_BATCHES = 50


class EncodedRow(TypedDict):
    """One tokenised example: unpadded token ids (padding is per batch, in :func:`collate`) and its label."""

    input_ids: list[int]
    label: int


def encode(texts: Sequence[str], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase,
           max_length: int, pairs: Sequence[str] | None = None) -> list[EncodedRow]:
    """Tokenise every text once (with its pair's second text, as the tokenizer joins two: BERT's ``[SEP]``),
    truncated to ``max_length`` tokens and unpadded."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    second = list(pairs) if pairs is not None else None
    ids = tokenizer(list(texts), second, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": list(row), "label": int(label)} for row, label in zip(ids, labels)]


def collate(rows: Sequence[EncodedRow], pad_token_id: int, pad_to_multiple: int | None = None) -> Batch:
    """Right-pad rows to the longest, or up to a multiple of ``pad_to_multiple`` (fewer shapes for a compiled model);
    long tensors ``input_ids``, ``attention_mask``, ``labels``. Right padding matters for decoders such as GPT-2:
    their classifier reads the last non-pad token."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token first")
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    if pad_to_multiple:
        width = math.ceil(width / pad_to_multiple) * pad_to_multiple
    # One tensor from padded lists, the mask from the lengths: a batch costs a few tensor calls, not a few per row.
    padded = [row["input_ids"] + [pad_token_id] * (width - length) for row, length in zip(rows, lengths)]
    input_ids = torch.tensor(padded, dtype=torch.long)
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (fewer pad tokens) in a seeded random order.

    Each epoch: shuffle the rows (if ``shuffle``), sort each window of ``BUCKET_WINDOW_BATCHES`` batches by
    length, cut it into batches, then shuffle the batch order. The generator is advanced every epoch, like
    ``DataLoader(shuffle=True, generator=...)``: epochs differ, yet the whole sequence repeats for a seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, generator: torch.Generator):
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        window = self.batch_size * BUCKET_WINDOW_BATCHES
        batches = []
        for chunk in order.split(window):
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(batch.tolist() for batch in chunk.split(self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter(batches)


def make_loader(rows: Sequence[EncodedRow], batch_size: int, pad_token_id: int, shuffle: bool, seed: int,
                bucket_by_length: bool = False, padded: bool = True, pad_to_multiple: int | None = None) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``seed``: a private ``torch.Generator``, not the global RNG, so
    model initialisation or dropout cannot shift it. ``padded=False`` yields each batch as its list of rows, for
    :class:`StepBatches` to split across processes and accumulation steps before padding: every process then draws
    the same global batches."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    collate_fn = partial(collate, pad_token_id=pad_token_id, pad_to_multiple=pad_to_multiple) if padded else list
    if bucket_by_length:
        sampler = LengthBucketBatchSampler([len(row["input_ids"]) for row in rows], batch_size, shuffle, generator)
        # generator= too: without it each iteration draws its base seed from the global RNG (shifting dropout).
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0, generator=generator)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn,
                      num_workers=0)


def row_order(loader: DataLoader) -> list[int]:
    """Row positions in the order ``loader`` yields them (length bucketing reorders them even without shuffling)."""
    return [index for batch in loader.batch_sampler for index in batch]


# ------------------------------------------------------------------------------------------ global batches


def micro_batches(rows: Sequence[EncodedRow], processes: int, accumulation: int,
                  rank: int) -> list[tuple[list[EncodedRow], float]]:
    """This process's ``accumulation`` parts of one global batch, each with its share of the batch's rows.

    The batch is cut into ``accumulation x processes`` contiguous near-equal parts; micro-step ``a`` of process
    ``p`` is part ``a * processes + p``, so one process with one step takes the whole batch unchanged. A part left
    empty (a last batch with fewer rows than parts) is stood in for by the batch's first row with weight 0: every
    process must run the same number of backward passes, or the gradient all-reduce would wait forever.
    """
    parts = accumulation * processes
    bounds = [len(rows) * k // parts for k in range(parts + 1)]
    chosen = []
    for micro_step in range(accumulation):
        k = micro_step * processes + rank
        part = list(rows[bounds[k]:bounds[k + 1]])
        chosen.append((part, len(part) / len(rows)) if part else ([rows[0]], 0.0))
    return chosen


@dataclass(frozen=True)
class StepBatch:
    """What one optimiser step trains on: this process's padded micro-batches with their weights (shares of the
    global batch's rows), and the global batch's row and non-pad token counts (for throughput)."""

    micro_batches: list[tuple[Batch, float]]
    rows: int
    tokens: int


@dataclass(frozen=True)
class StepBatches:
    """The global batches of ``loader`` (built with ``padded=False``) as this process's :class:`StepBatch` es;
    iterable once per epoch, like the loader."""

    loader: DataLoader
    processes: int
    accumulation: int
    rank: int
    pad_token_id: int
    pad_to_multiple: int | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[StepBatch]:
        for rows in self.loader:
            parts = micro_batches(rows, self.processes, self.accumulation, self.rank)
            padded = [(collate(part, self.pad_token_id, self.pad_to_multiple), weight) for part, weight in parts]
            yield StepBatch(padded, len(rows), sum(len(row["input_ids"]) for row in rows))
