"""Training text that needs no download, cut into padded micro-batches in a replayable order."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

__all__ = ["builtin_corpus", "collate", "micro_batches", "pack_samples"]


def builtin_corpus() -> str:
    """Python's own help texts (``pydoc_data.topics``, ~460 kB of English prose and code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def pack_samples(
    text: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, *, max_samples: int | None = None
) -> list[list[int]]:
    """Paragraphs (each ending in EOS) packed greedily into samples of at most ``seq_len``
    tokens; samples therefore differ in length, and batches carry real padding."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    encoded = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    samples: list[list[int]] = []
    current: list[int] = []
    for ids in encoded:
        ids = [*ids, eos]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if current and len(current) + len(piece) > seq_len:
                samples.append(current)
                current = []
            current = current + piece
        if max_samples is not None and len(samples) >= max_samples:
            break
    if current:
        samples.append(current)
    return samples[:max_samples] if max_samples is not None else samples


def collate(samples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids, attention_mask (1 = token) and labels
    (-100 on padding, so the loss ignores it)."""
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample)] = torch.tensor(sample)
        attention_mask[row, : len(sample)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batches(
    samples: list[list[int]], batch_size: int, *, pad_id: int, seed: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, reshuffled each epoch from ``seed + epoch``; ``start`` skips that
    many, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = -(-len(samples) // batch_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader: DataLoader[Any] = DataLoader(
            samples,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed + epoch),
            collate_fn=lambda batch: collate(batch, pad_id),
        )
        yield from itertools.islice(loader, skip, None)
        epoch, skip = epoch + 1, 0
