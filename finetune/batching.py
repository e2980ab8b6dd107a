"""Micro-batches for training: padding-free packed rows, or padded length-grouped rows as a fallback.

Packed: the samples of a micro-batch are concatenated into one row whose position ids restart at 0 for
each sample; with `attention_mask=None`, transformers then builds a block-diagonal causal mask (flash
attention uses the same position ids for its varlen kernel), so no sample attends to another.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finetune.prompting import IGNORE_INDEX, EncodedSample


@dataclass
class Batch:
    """Tensors for one forward pass. Shapes (B, T); B == 1 when packed."""

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


def plan_packed(lengths: Sequence[int], token_budget: int, seed: int) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `token_budget` tokens, in a seeded random order.

    Greedy in shuffled order: a micro-batch is closed when the next sample would overflow it, so the only
    waste is the unfilled tail of each row, and no padding is ever computed.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + lengths[index] > token_budget:
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


def collate_packed(samples: Sequence[EncodedSample]) -> Batch:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for sample in samples:
        ids.extend(sample.input_ids)
        labels.extend(_labels_for_row(sample))
        positions.extend(range(len(sample.input_ids)))
    return Batch(
        input_ids=torch.tensor([ids]),
        labels=torch.tensor([labels]),
        position_ids=torch.tensor([positions]),
        attention_mask=None,
        n_tokens=len(ids),
        n_label_tokens=sum(label != IGNORE_INDEX for label in labels),
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
