"""Packing: samples share a row without seeing each other, so packed and padded losses agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.batching import (
    collate_packed,
    collate_padded,
    plan_packed,
    plan_padded,
    token_loss_sum,
)
from finetune.prompting import EncodedSample, encode_conversation, end_of_turn_ids


def _samples(tokenizer, n: int):  # type: ignore[no-untyped-def]
    stop = end_of_turn_ids(tokenizer)
    samples = []
    for i in range(n):
        words = " ".join(["apple", "river", "stone", "cloud"][: 1 + i % 4] * (1 + i))
        chat = [
            {"role": "user", "content": f"Say {words} in capitals."},
            {"role": "assistant", "content": words.upper()},
        ]
        samples.append(encode_conversation(tokenizer, chat, stop))
    return samples


@pytest.fixture(scope="module")
def model(tiny_base: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@torch.no_grad()
def test_packed_loss_equals_unpacked_loss(model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(tiny_tokenizer, 5)
    packed = collate_packed(samples)
    padded = collate_padded(samples, tiny_tokenizer.pad_token_id)
    assert packed.input_ids.shape[0] == 1
    assert packed.n_tokens == padded.n_tokens == sum(len(s.input_ids) for s in samples)
    assert packed.n_label_tokens == padded.n_label_tokens
    packed_loss = token_loss_sum(model, packed) / packed.n_label_tokens
    padded_loss = token_loss_sum(model, padded) / padded.n_label_tokens
    one_by_one = (
        sum(float(token_loss_sum(model, collate_packed([s]))) for s in samples) / packed.n_label_tokens
    )
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert abs(float(packed_loss) - one_by_one) < 1e-4

    # The check has teeth: without restarting positions, samples see each other and the loss moves.
    leaky = collate_packed(samples)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1])[None]
    assert abs(float(token_loss_sum(model, leaky) / leaky.n_label_tokens) - float(packed_loss)) > 1e-3


@torch.no_grad()
def test_rows_of_bounded_length_give_the_same_loss(model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(tiny_tokenizer, 6)
    lengths = [len(s.input_ids) for s in samples]
    row_len = max(lengths) + min(lengths)  # some rows hold two samples, others one
    rows = collate_packed(samples, row_len=row_len, pad_id=tiny_tokenizer.pad_token_id)
    one_row = collate_packed(samples)
    assert 1 < rows.input_ids.shape[0] < len(samples)
    assert rows.input_ids.shape[1] <= row_len
    # Filler tokens are neither counted nor trained; every row restarts positions for each segment.
    assert (rows.n_tokens, rows.n_label_tokens) == (one_row.n_tokens, one_row.n_label_tokens)
    assert (rows.position_ids[:, 0] == 0).all()
    torch.testing.assert_close(
        token_loss_sum(model, rows) / rows.n_label_tokens,
        token_loss_sum(model, one_row) / one_row.n_label_tokens,
        rtol=1e-5,
        atol=1e-5,
    )


@torch.no_grad()
def test_eager_attention_packs_too(tiny_base: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    from finetune.recipe import packing_isolates_samples

    samples = _samples(tiny_tokenizer, 3)
    eager = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation="eager")
    assert packing_isolates_samples(eager, samples, torch.float32)
    packed = collate_packed(samples)
    padded = collate_padded(samples, tiny_tokenizer.pad_token_id)
    torch.testing.assert_close(
        token_loss_sum(eager, packed), token_loss_sum(eager, padded), rtol=1e-5, atol=1e-4
    )


@pytest.mark.slow
@torch.no_grad()
def test_flex_attention_keeps_a_packed_row_apart(model, tiny_base: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """flex_attention trains on one packed row per micro-batch (packed_row_len None): its block mask must keep
    the samples of the row apart. Forward only: FlexAttention has no CPU backward (the recipe refuses it
    there); the first call compiles the kernel (about 25 s on 2 cores)."""
    from transformers import AutoModelForCausalLM

    from finetune.config import load_config
    from finetune.recipe import packed_row_len

    config = load_config(None, ["base_model=x", "output_dir=o", "data.path=d.jsonl"])
    flex_config = config.model_copy(
        update={"training": config.training.model_copy(update={"attn_implementation": "flex_attention"})}
    )
    assert packed_row_len(config) == config.data.max_seq_len and packed_row_len(flex_config) is None
    flex = AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    samples = _samples(tiny_tokenizer, 5)
    row = collate_packed(samples)
    assert row.input_ids.shape[0] == 1
    one_by_one = sum(token_loss_sum(model, collate_packed([s])) for s in samples)  # sdpa, each alone
    torch.testing.assert_close(token_loss_sum(flex, row), one_by_one, rtol=1e-5, atol=1e-4)


def test_packing_probe_detects_leaking_attention(model, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A model that ignores position-id restarts (here: positions forced to run on) is caught by the probe."""
    from finetune.recipe import packing_isolates_samples

    class IgnoresRestarts(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, **kwargs):  # type: ignore[no-untyped-def]
            return self.inner(
                input_ids=input_ids, position_ids=torch.arange(input_ids.shape[1])[None], **kwargs
            )

    samples = _samples(tiny_tokenizer, 2)
    assert packing_isolates_samples(model, samples, torch.float32)
    assert not packing_isolates_samples(IgnoresRestarts(model), samples, torch.float32)


def test_plans_cover_every_sample_once_and_respect_the_budget() -> None:
    lengths = [5, 17, 3, 40, 22, 9, 31, 12, 8, 26]
    one_row = plan_packed(lengths, rows=2, row_len=24, seed=3, one_row=True)
    assert sorted(i for batch in one_row for i in batch) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 48 for batch in one_row)
    assert one_row == plan_packed(lengths, rows=2, row_len=24, seed=3, one_row=True)
    assert one_row != plan_packed(lengths, rows=2, row_len=24, seed=4, one_row=True)

    packed = plan_packed(lengths, rows=2, row_len=48, seed=3)
    assert sorted(i for batch in packed for i in batch) == list(range(len(lengths)))
    for batch in packed:  # collate_packed lays each micro-batch out in at most 2 rows of <= 48 tokens
        samples = [EncodedSample([1] * lengths[i], [1] * lengths[i]) for i in batch]
        collated = collate_packed(samples, row_len=48)
        assert collated.input_ids.shape[0] <= 2 and collated.input_ids.shape[1] <= 48
    assert len(packed) < len(lengths)  # rows really are shared

    padded = plan_padded(lengths, batch_size=3, seed=3, group=2)
    assert sorted(i for batch in padded for i in batch) == list(range(len(lengths)))
    assert all(len(batch) <= 3 for batch in padded)
    # Length grouping: inside each window of 6, batches hold neighbours in length order.
    for batch in padded:
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)


def test_padded_batch_masks_padding(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(tiny_tokenizer, 3)
    batch = collate_padded(samples, pad_id=tiny_tokenizer.pad_token_id)
    assert batch.attention_mask is not None
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.labels[row, n:] == -100).all()
        assert batch.position_ids[row, :n].tolist() == list(range(n))
