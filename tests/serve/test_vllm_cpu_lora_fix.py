"""The vLLM CPU LoRA-op fix: a token without an adapter (index -1) gets no LoRA contribution."""

from __future__ import annotations

import pytest
import torch

from serve.vllm_cpu_lora_fix import PATCHED_OPS, register, without_lora_for_negative_indices

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shrink = torch.randn(2, 1, 3, 5)  # (slots, 1, rank, in)
    expand = torch.randn(2, 1, 5, 3)  # (slots, 1, out, rank)
    indices = torch.tensor([0, -1, 1])  # token 1 has no adapter
    return shrink, expand, indices


def test_unpatched_op_applies_the_last_slot_to_tokens_without_adapter() -> None:
    shrink, _, indices = _weights()
    inputs = torch.randn(3, 5)
    out = torch.zeros(3, 3)
    original = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    original(inputs, shrink, out, indices, 1.0)
    assert out[1].abs().sum() > 0  # the bug this plugin exists for


@pytest.mark.parametrize("name", PATCHED_OPS)
def test_patched_ops_add_nothing_for_index_minus_one(name: str) -> None:
    shrink, expand, indices = _weights()
    original = getattr(lora_ops, name)
    original = getattr(original, "__wrapped__", original)
    fixed = without_lora_for_negative_indices(original)
    if name == "bgmv_shrink":
        inputs, weights, out, extra = torch.randn(3, 5), shrink, torch.zeros(3, 3), (1.0,)
    elif name == "bgmv_expand":
        inputs, weights, out, extra = torch.randn(3, 3), expand, torch.ones(3, 5), (True,)
    else:
        inputs, weights, out, extra = torch.randn(3, 3), expand, torch.ones(3, 7), (1, 5, True)
    expected = out.clone()
    original(inputs, weights, expected, indices, *extra)
    fixed(inputs, weights, out, indices, *extra)
    untouched = torch.zeros(3, 3) if name == "bgmv_shrink" else torch.ones(out.shape)
    torch.testing.assert_close(out[1], untouched[1])  # no adapter: nothing added
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]])  # adapter tokens exactly as before


def test_register_patches_the_cpu_punica_wrapper_once() -> None:
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    register()
    first = punica_cpu.bgmv_shrink
    register()
    assert punica_cpu.bgmv_shrink is first
    assert all(getattr(getattr(lora_ops, name), "__tuneserve_patched__", False) for name in PATCHED_OPS)
