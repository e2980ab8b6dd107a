"""Micro-batches for training: padding-free packed rows, or padded length-grouped rows as a fallback.

Packed: the samples of a micro-batch are concatenated into rows whose position ids restart at 0 for
each sample; with `attention_mask=None`, transformers then builds a block-diagonal causal mask (flash
attention uses the same position ids for its varlen kernel), so no sample attends to another. With
SDPA or eager attention a micro-batch is `micro_batch_size` rows of at most `max_seq_len` tokens (the
dense attention then costs rows x max_seq_len^2, not (rows x max_seq_len)^2); with flash attention, whose
varlen kernel wastes nothing on long rows, it is one row (its position-id detection needs batch size 1), and
so it is with FlexAttention, whose block mask skips the blocks where no sample meets itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finetune.prompting import IGNORE_INDEX, EncodedSample


@dataclass
class Batch:
    """Tensors for one forward pass. Shapes (B, T): B packed rows, or B padded samples."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    n_tokens: int  # real (non-padding) tokens
    n_label_tokens: int  # tokens whose next-token prediction is trained

    def to(self, device: torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            n_tokens=self.n_tokens,
            n_label_tokens=self.n_label_tokens,
        )


def _rows(lengths: Sequence[int], row_len: int | None) -> int:
    """Rows that next-fit packing of `lengths`, in order, into rows of at most `row_len` tokens needs."""
    rows, used = 0, 0
    for length in lengths:
        if rows == 0 or (row_len is not None and used + length > row_len):
            rows, used = rows + 1, 0
        used += length
    return rows


def plan_packed(
    lengths: Sequence[int], rows: int, row_len: int, seed: int, *, one_row: bool = False
) -> list[list[int]]:
    """Group sample indices into micro-batches of `rows` packed rows of at most `row_len` tokens each,
    in a seeded random order (`one_row`: the same token budget, `rows * row_len`, in a single row).

    Greedy in shuffled order: samples fill a row until the next one would overflow it, then the next row;
    a micro-batch is closed when its last row is full, so the only waste is the unfilled tail of rows.
    `collate_packed` lays the samples out in rows the same way.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    budget = rows * row_len
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        candidate = [lengths[i] for i in current] + [lengths[index]]
        too_big = used + lengths[index] > budget if one_row else _rows(candidate, row_len) > rows
        if current and too_big:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches


def plan_padded(lengths: Sequence[int], batch_size: int, seed: int, *, group: int = 64) -> list[list[int]]:
    """Micro-batches of `batch_size` samples of similar length (less padding), in a seeded random order.

    Samples are shuffled, cut into windows of `group * batch_size`, sorted by length inside each window,
    chunked, and the chunks shuffled again so long and short batches alternate.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = group * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _labels_for_row(sample: EncodedSample) -> list[int]:
    # The first token of a sample is never a target: in a packed row the model would otherwise be asked
    # to predict it from the previous sample.
    return [IGNORE_INDEX, *sample.labels[1:]]


def collate_packed(samples: Sequence[EncodedSample], row_len: int | None = None, pad_id: int = 0) -> Batch:
    """Samples packed into rows, in order, each row holding at most `row_len` tokens (None: one row).

    Position ids restart at 0 for each sample, so no sample attends to another. Rows shorter than the
    longest are filled with one filler segment (`pad_id`, its own positions from 0, no labels): it attends
    only to itself and is neither trained nor counted. Several short rows, rather than one long one, keep
    the dense (T x T) attention of SDPA or eager attention small: its cost grows with the square of the row.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    used = 0
    for sample in samples:
        n = len(sample.input_ids)
        if not rows or (row_len is not None and used + n > row_len):
            rows.append(([], [], []))
            used = 0
        ids, labels, positions = rows[-1]
        ids.extend(sample.input_ids)
        labels.extend(_labels_for_row(sample))
        positions.extend(range(n))
        used += n
    n_tokens = sum(len(ids) for ids, _, _ in rows)
    width = max(len(ids) for ids, _, _ in rows)
    for ids, labels, positions in rows:
        filler = width - len(ids)
        ids.extend([pad_id] * filler)
        labels.extend([IGNORE_INDEX] * filler)
        positions.extend(range(filler))
    label_tensor = torch.tensor([labels for _, labels, _ in rows])
    return Batch(
        input_ids=torch.tensor([ids for ids, _, _ in rows]),
        labels=label_tensor,
        position_ids=torch.tensor([positions for _, _, positions in rows]),
        attention_mask=None,
        n_tokens=n_tokens,
        n_label_tokens=int((label_tensor != IGNORE_INDEX).sum()),
    )


def collate_padded(samples: Sequence[EncodedSample], pad_id: int) -> Batch:
    width = max(len(sample.input_ids) for sample in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(_labels_for_row(sample))
        mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        input_ids=ids,
        labels=labels,
        position_ids=positions,
        attention_mask=mask,
        n_tokens=int(mask.sum()),
        n_label_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over label tokens of the next-token cross-entropy (divide by the token count for the mean).

    Only positions whose next token is a target get logits (`logits_to_keep`), which saves the (T, vocab)
    logits of prompts, often most of a sample.
    """
    targets = batch.labels[:, 1:]  # (B, T-1): the token each position must predict
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,) positions with any target
    outputs = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = outputs.logits  # (B, K, vocab)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
