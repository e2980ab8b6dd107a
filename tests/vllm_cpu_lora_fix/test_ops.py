"""The vLLM CPU LoRA ops, grouped by adapter: same results as vLLM's for tokens with an adapter, exactly no
LoRA for tokens without one (index -1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import vllm_cpu_lora_fix.ops as fix
from vllm_cpu_lora_fix import register
from vllm_cpu_lora_fix.ops import (
    FUSED,
    LIVE,
    PATCHED_OPS,
    REPLACEMENTS,
    LoraBatchPlan,
    fused_weights,
    group_by_slot,
    long_runs,
    lora_matmul,
    track_live_slots,
)

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, FEATURES, TOKENS = 4, 3, 5, 9


def _vllm_op(name: str) -> Callable[..., Any]:
    op = getattr(lora_ops, name)
    return getattr(op, "__wrapped__", op)  # vLLM's own, whether or not the plugin is registered


def _case(name: str, indices: list[int], dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    """(inputs, weights, output, indices, *extra) for op `name`, non-zero output to show what is kept."""
    generator = torch.Generator().manual_seed(0)
    index = torch.tensor(indices)
    if (
        name == "bgmv_shrink"
    ):  # (tokens, features) x (slots, 1, rank, features) -> (tokens, rank), fp32 buffer
        inputs = torch.randn(len(indices), FEATURES, generator=generator).to(dtype)
        weights = torch.randn(SLOTS, 1, RANK, FEATURES, generator=generator).to(dtype)
        return inputs, weights, torch.ones(len(indices), RANK), index, 0.5
    inputs = torch.randn(len(indices), RANK, generator=generator)
    weights = torch.randn(SLOTS, 1, FEATURES, RANK, generator=generator).to(dtype)
    if name == "bgmv_expand":
        return inputs, weights, torch.ones(len(indices), FEATURES, dtype=dtype), index, True
    return inputs, weights, torch.ones(len(indices), 2 * FEATURES + 1, dtype=dtype), index, 3, FEATURES, True


def _run(op: Callable[..., Any], case: tuple[Any, ...]) -> torch.Tensor:
    output = case[2].clone()
    op(case[0], case[1], output, *case[3:])
    return output


@pytest.mark.parametrize("name", PATCHED_OPS)
@pytest.mark.parametrize(
    "indices",
    [
        [2] * TOKENS,  # the whole batch on one adapter: one matmul
        [0, 1, 2, 3, 0, 1, 2, 3, 3],  # every slot
        [1, 1, 3, 3, 3, 1, 0, 0, 1],  # runs of the same adapter
    ],
)
def test_grouped_ops_equal_vllms_for_tokens_with_an_adapter(name: str, indices: list[int]) -> None:
    case = _case(name, indices)
    expected = _run(_vllm_op(name), case)
    got = _run(REPLACEMENTS[name](_vllm_op(name)), case)
    torch.testing.assert_close(got, expected)


def test_vllms_op_applies_the_last_slot_to_tokens_without_adapter() -> None:
    case = _case("bgmv_shrink", [0, -1, 1])
    assert _run(_vllm_op("bgmv_shrink"), case)[1].abs().sum() > 0  # the bug the plugin exists for


@pytest.mark.parametrize("name", PATCHED_OPS)
@pytest.mark.parametrize("indices", [[0, -1, 1, -1, 3, 3], [-1, -1, -1], [-1, 2, 2]])
def test_tokens_without_adapter_get_no_lora(name: str, indices: list[int]) -> None:
    case = _case(name, indices)
    got = _run(REPLACEMENTS[name](_vllm_op(name)), case)
    missing = torch.tensor(indices) < 0
    if name == "bgmv_shrink":  # the shrink writes its buffer: zero rows
        torch.testing.assert_close(got[missing], torch.zeros_like(got[missing]))
    else:  # the expands add to the layer output: nothing added
        torch.testing.assert_close(got[missing], case[2][missing])
    expected = _run(_vllm_op(name), case)  # rows with an adapter: exactly vLLM's
    torch.testing.assert_close(got[~missing], expected[~missing])


@pytest.mark.parametrize("name", PATCHED_OPS)
def test_bf16_weights_compute_in_the_output_dtype_like_vllm(name: str) -> None:
    case = _case(name, [0, 2, 2, 1], dtype=torch.bfloat16)
    expected = _run(_vllm_op(name), case)
    got = _run(REPLACEMENTS[name](_vllm_op(name)), case)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_expand_without_add_inputs_overwrites() -> None:
    inputs, weights, output, index, _ = _case("bgmv_expand", [1, 0, -1])
    expected = _run(_vllm_op("bgmv_expand"), (inputs, weights, output, index, False))
    got = _run(REPLACEMENTS["bgmv_expand"](_vllm_op("bgmv_expand")), (inputs, weights, output, index, False))
    torch.testing.assert_close(got[:2], expected[:2])
    torch.testing.assert_close(got[2], torch.zeros(FEATURES))


def test_shapes_without_one_index_per_row_keep_vllms_op() -> None:
    calls = []

    def vllm_op(*args: Any) -> None:
        calls.append(args)

    inputs, weights, output, _, scaling = _case("bgmv_shrink", [0, 1])
    REPLACEMENTS["bgmv_shrink"](vllm_op)(inputs, weights, output, torch.tensor([0]), scaling)
    assert len(calls) == 1


def test_lora_matmul_is_a_per_token_matmul() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(7, FEATURES, generator=generator)
    weights = torch.randn(SLOTS, RANK, FEATURES, generator=generator)
    indices = torch.tensor([3, -1, 0, 0, 2, -1, 3])
    got = lora_matmul(inputs, weights, indices, torch.float32)
    for token, slot in enumerate(indices.tolist()):
        expected = torch.zeros(RANK) if slot < 0 else weights[slot] @ inputs[token]
        torch.testing.assert_close(got[token], expected)


def test_sgmv_ops_go_through_the_grouped_ops_after_register() -> None:
    register()
    inputs, weights, output, _, scaling = _case("bgmv_shrink", [0] * 3 + [-1] * 2 + [2] * 4)
    got = output.clone()
    # three sequences of 3, 2 and 4 tokens on slots 0, none and 2
    lora_ops.sgmv_shrink(
        inputs,
        weights,
        got,
        torch.tensor([0, 3, 5]),
        torch.tensor([3, 2, 4]),
        torch.tensor([0, -1, 2]),
        3,
        4,
        9,
        scaling,
    )
    torch.testing.assert_close(got[3:5], torch.zeros(2, RANK))
    torch.testing.assert_close(got[:3], scaling * inputs[:3] @ weights[0, 0].t())
    torch.testing.assert_close(got[5:], scaling * inputs[5:] @ weights[2, 0].t())


def test_register_patches_the_cpu_punica_wrapper_once() -> None:
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    register()
    first = punica_cpu.bgmv_shrink
    register()
    assert punica_cpu.bgmv_shrink is first
    assert all(getattr(getattr(lora_ops, name), "__tuneserve_patched__", False) for name in PATCHED_OPS)


def _wrapper(token_slots: list[int], slots: int) -> Any:
    """vLLM's CPU punica wrapper set up for one step whose tokens use `token_slots` (-1: no adapter)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")
    ids = [slot + 1 for slot in token_slots]  # adapter id = slot + 1; 0 = the base model
    mapping = LoRAMapping(ids, ids, is_prefill=True)  # vLLM's v1 runner always sets is_prefill
    wrapper.update_metadata(mapping, list(range(1, slots + 1)), slots + 1, 1000)
    assert wrapper.token_lora_indices.tolist() == token_slots
    return wrapper


def _linear_case(tokens: int, slots: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A q/k/v-like layer: three output slices of different widths, vLLM's stacked (slots, 1, ...) weights."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, FEATURES, generator=generator)
    shrink = [torch.randn(slots, 1, RANK, FEATURES, generator=generator) for _ in range(3)]
    expand = [torch.randn(slots, 1, size, RANK, generator=generator) for size in (4, 2, 2)]
    return x, shrink, expand


def _ours_and_vllms(
    wrapper: Any, x: torch.Tensor, shrink: list[torch.Tensor], expand: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """y from the patched add_lora_linear and from vLLM's own, for `_linear_case`'s q/k/v-like layer."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    got, expected = torch.zeros(len(x), 8), torch.zeros(len(x), 8)
    PunicaWrapperCPU.add_lora_linear(wrapper, got, x, tuple(shrink), tuple(expand), 1.0, (4, 2, 2))
    PunicaWrapperCPU.add_lora_linear.__wrapped__(
        wrapper, expected, x, tuple(shrink), tuple(expand), 1.0, (4, 2, 2)
    )
    return got, expected


@pytest.mark.parametrize(
    ("token_slots", "slots"),
    [
        ([1] * 6, 4),  # one adapter: plain matmuls
        ([0, -1, 0, 2, -1, 2, 2], 4),  # base and adapter tokens mixed
        ([0, 1, 2, 3, 4, 5, 6, 7] * 3, 8),  # decode step over every slot: batched over the slots
        ([5, 1, -1, 1, 5, 3, 3, -1], 8),  # some slots: their weights gathered, base tokens read a padding row
        ([3, 2, 4, 2, 3, 4, -1], 8),  # consecutive slots, not from 0: a view of the stacks
        ([0, 1, -1, 1, 0, -1], 2),  # no padding in the batched layout: one zero row added for base tokens
        ([0] * 20 + [1, 2, 3], 8),  # one long prefill and a few decodes: one GEMM per adapter
        ([0] * 40 + [-1] * 8 + [1] * 40 + [0] * 40, 4),  # long prefill runs: matmuls in place per run
        ([2] * 40 + [0, 1, 2, 3, -1, 1, 0, 3, 2], 4),  # a prefill run and decodes (batched over adapters)
        ([-1] * 5, 2),  # no adapter at all
    ],
)
@pytest.mark.parametrize("fuse", [True, False], ids=["one-product-per-layer", "one-per-slice"])
def test_grouped_add_lora_linear_equals_vllms(
    token_slots: list[int], slots: int, fuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if not fuse:
        monkeypatch.setattr(fix, "FUSED_MAX_EXTRA_BYTES", 0)
    register()
    patched = PunicaWrapperCPU.add_lora_linear
    vllm_method = patched.__wrapped__
    wrapper = _wrapper(token_slots, slots)
    x, shrink, expand = _linear_case(len(token_slots), slots)
    expected = torch.ones(len(token_slots), 9)  # one column more than the slices: left alone
    vllm_method(wrapper, expected, x, tuple(shrink), tuple(expand), 0.5, (4, 2, 2))
    got = torch.ones(len(token_slots), 9)
    for _ in range(2):  # the second call reuses the step's plan
        got = torch.ones(len(token_slots), 9)
        patched(wrapper, got, x, tuple(shrink), tuple(expand), 0.5, (4, 2, 2))
    torch.testing.assert_close(got, expected)
    missing = torch.tensor(token_slots) < 0
    torch.testing.assert_close(got[missing], torch.ones(int(missing.sum()), 9))
    if not missing.all():
        assert (getattr(shrink[0], FUSED)[2] is not None) == fuse


def test_fused_weights_stack_a_and_lay_b_out_block_diagonally(monkeypatch: pytest.MonkeyPatch) -> None:
    _, shrink, expand = _linear_case(3, 2)
    fused = fused_weights(shrink, expand, torch.float32)
    assert fused is not None
    a, b = fused
    assert a.shape == (2, 3 * RANK, FEATURES) and b.shape == (2, 8, 3 * RANK)
    off_blocks = b.clone()
    for i, (start, stop) in enumerate([(0, 4), (4, 6), (6, 8)]):
        ranks = slice(i * RANK, (i + 1) * RANK)
        assert torch.equal(a[:, ranks], shrink[i].squeeze(1))
        assert torch.equal(b[:, start:stop, ranks], expand[i].squeeze(1))
        off_blocks[:, start:stop, ranks] = 0
    assert not off_blocks.any()  # slice i's columns read only its own ranks
    assert b.transpose(1, 2).is_contiguous()  # B^T is the contiguous one: the layout bmm reads fastest
    assert fused_weights(shrink, expand, torch.float32)[0] is a  # type: ignore[index]  # cached
    zeros = 2 * RANK * 8 * (3 - 1) * 4  # slots x rank x columns x (slices - 1) x float32: B's zero blocks
    monkeypatch.setattr(fix, "FUSED_MAX_EXTRA_BYTES", zeros - 1)
    _, shrink, expand = _linear_case(3, 2)
    assert fused_weights(shrink, expand, torch.float32) is None


def test_fused_weights_follow_adapters_written_into_slots() -> None:
    """vLLM loads an adapter by copying its weights into a slot of the stacks and clears a slot by zeroing
    it: the fused product must not keep serving the old weights."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    register()
    wrapper = _wrapper([0, 1, 0, 1, 1], 2)
    x, shrink, expand = _linear_case(5, 2)
    PunicaWrapperCPU.add_lora_linear(
        wrapper, torch.zeros(5, 8), x, tuple(shrink), tuple(expand), 1.0, (4, 2, 2)
    )
    assert getattr(shrink[0], FUSED)[2] is not None
    shrink[1][1, 0].copy_(torch.randn(RANK, FEATURES))  # as vLLM's set_lora writes a new adapter
    expand[2][0, 0].zero_()  # as its reset_lora clears one
    got, expected = _ours_and_vllms(wrapper, x, shrink, expand)
    torch.testing.assert_close(got, expected)
    assert not got[[0, 2], 6:].any()


@pytest.mark.parametrize(
    ("token_slots", "slots"),
    [
        ([2], 4),
        ([1] * 6, 4),
        ([0, -1, 0, 2, -1, 2, 2], 4),
        ([0, 1, 2, 3, 4, 5, 6, 7] * 3, 8),
        ([2] * 40 + [0, 1, 3, -1], 4),  # a prefill run in place, decodes batched
    ],
)
def test_grouped_add_lora_linear_in_bfloat16_equals_vllms(token_slots: list[int], slots: int) -> None:
    """A bf16 model: the shrink runs in float32 and the expand in y's dtype, as in vLLM's ops."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    register()
    wrapper = _wrapper(token_slots, slots)
    x, shrink, expand = _linear_case(len(token_slots), slots)
    x = x.bfloat16()
    shrink = [weights.bfloat16() for weights in shrink]
    expand = [weights.bfloat16() for weights in expand]
    expected = torch.ones(len(token_slots), 9, dtype=torch.bfloat16)
    PunicaWrapperCPU.add_lora_linear.__wrapped__(
        wrapper, expected, x, tuple(shrink), tuple(expand), 0.5, (4, 2, 2)
    )
    got = torch.ones(len(token_slots), 9, dtype=torch.bfloat16)
    PunicaWrapperCPU.add_lora_linear(wrapper, got, x, tuple(shrink), tuple(expand), 0.5, (4, 2, 2))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=5e-2)
    assert not torch.equal(got, torch.ones_like(got)) or all(slot < 0 for slot in token_slots)


def test_add_lora_linear_plan_follows_each_steps_mapping() -> None:
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    register()
    wrapper = _wrapper([0, 0, 1], 2)
    x, shrink, expand = _linear_case(3, 2)
    PunicaWrapperCPU.add_lora_linear(
        wrapper, torch.zeros(3, 8), x, tuple(shrink), tuple(expand), 1.0, (4, 2, 2)
    )
    ids = (2, 0, 1)  # next step, same token count, other adapters
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [1, 2], 3, 1000)
    got, expected = _ours_and_vllms(wrapper, x, shrink, expand)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[1], torch.zeros(8))


def test_group_by_slot() -> None:
    assert group_by_slot(torch.tensor([], dtype=torch.long)) == []
    assert group_by_slot(torch.tensor([3])) == [(3, None)]
    assert group_by_slot(torch.tensor([2, 2, 2])) == [(2, None)]  # one adapter: no row lists
    assert group_by_slot(torch.tensor([-1, -1])) == []  # base model only
    groups = group_by_slot(torch.tensor([4, -1, 1, 4, 1, 1]))
    assert [(slot, rows.tolist()) for slot, rows in groups if rows is not None] == [
        (1, [2, 4, 5]),
        (4, [0, 3]),
    ]
    assert [(slot, rows.tolist()) for slot, rows in group_by_slot(torch.tensor([-1, 0]))] == [(0, [1])]


def test_plan_uses_the_batched_layout_only_when_it_wastes_little() -> None:
    assert LoraBatchPlan(torch.tensor([0, 1, 2, 3] * 4)).padded
    assert LoraBatchPlan(torch.tensor([9, 2] * 4 + [-1] * 3)).padded  # only the slots in use count
    assert not LoraBatchPlan(torch.tensor([0] * 30 + [1, 2, 3, 4, 5])).padded  # mostly padding
    assert not LoraBatchPlan(torch.tensor([0, 1] * 40)).padded  # groups long enough for one GEMM each
    assert not LoraBatchPlan(torch.tensor([3] * 8)).padded  # one adapter: a plain matmul


def test_long_runs_of_one_adapter_run_in_place() -> None:
    assert long_runs(torch.tensor([2] * 40 + [-1] * 8 + [0] * 40 + [2] * 40), 32) == [
        (2, 0, 40),
        (0, 48, 88),  # the base model's run has no matmul
        (2, 88, 128),
    ]
    assert long_runs(torch.tensor([2] * 40 + [0] * 20), 32) == [(2, 0, 40)]  # 20 tokens: too short
    prefill = LoraBatchPlan(torch.tensor([(token // 64) % 4 for token in range(512)]))  # 8 prompts of 64
    assert len(prefill.runs) == 8 and not prefill.groups  # every token in a run
    # A served load's steady state: a new prompt's prefill, and the other requests decoding.
    mixed = LoraBatchPlan(torch.tensor([3] * 64 + [token % 16 for token in range(31)]))
    assert mixed.runs == [(3, 0, 64)]
    assert mixed.padded and len(mixed.groups) == 16  # the decode tokens: batched over their adapters
    assert mixed.layout().gather(mixed.layout().scatter(torch.ones(95, 1)))[:64].eq(0).all()  # not twice
    decode = LoraBatchPlan(torch.tensor([token % 2 for token in range(128)]))
    assert not decode.runs and not decode.padded  # runs of one token: one GEMM per adapter
    assert not LoraBatchPlan(torch.tensor([1] * 64)).runs  # one adapter: one matmul for the batch


def test_batched_layout_puts_each_token_in_its_adapters_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fix, "MIN_MATMUL_ROWS", 1)  # the layout as it is, without rows added for the GEMM
    plan = LoraBatchPlan(torch.tensor([5, 1, -1, 1, 5, 3]))
    assert plan.padded
    layout = plan.layout()
    assert layout.weights_index is not None and layout.weights_index.tolist() == [1, 3, 5]  # slots in use
    x = torch.arange(6.0).unsqueeze(1) + 1
    padded = layout.scatter(x)  # (adapters in use, longest, features)
    assert padded.squeeze(2).tolist() == [[2.0, 4.0], [6.0, 0.0], [1.0, 5.0]]
    gathered = layout.gather(padded).squeeze(1)
    assert gathered.tolist() == [1.0, 2.0, 0.0, 4.0, 5.0, 6.0]  # back in token order; no adapter: zero
    assert layout.permutation is None  # base tokens and padding: scattered into zeros
    stacked = torch.arange(8.0).view(8, 1, 1)  # slot i holds i
    assert layout.weights(stacked).flatten().tolist() == [1.0, 3.0, 5.0]
    full = LoraBatchPlan(torch.tensor([3, 2, 2, 3])).layout()
    assert full.weights_index is None  # consecutive slots: a view of the stacks, no gather
    assert full.weights(stacked).flatten().tolist() == [2.0, 3.0]
    assert full.weights(stacked).data_ptr() == stacked[2].data_ptr()
    assert full.permutation is not None  # every row a token: the layout is a reordering
    x = torch.arange(4.0).unsqueeze(1)
    assert full.scatter(x).squeeze(2).tolist() == [[1.0, 2.0], [0.0, 3.0]]  # slot 2's tokens, then slot 3's
    assert full.gather(full.scatter(x)).squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0]


def _live_case() -> tuple[Any, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    wrapper = _wrapper([0, 1, 0, 1, -1], 2)
    x, shrink, expand = _linear_case(5, 2)
    return wrapper, x, shrink, expand


def test_slices_whose_slots_in_use_are_all_zero_are_skipped() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    register()
    wrapper, x, shrink, expand = _live_case()
    setattr(expand[1], LIVE, frozenset())  # the k-like slice: no adapter adapts it
    setattr(shrink[2], LIVE, frozenset({1}))  # the v-like slice: only slot 1 does
    got, expected = _ours_and_vllms(wrapper, x, shrink, expand)
    torch.testing.assert_close(got[:, :4], expected[:, :4])
    assert not got[:, 4:6].any()  # skipped, though its weights (not really zero here) would add something
    torch.testing.assert_close(got[:, 6:], expected[:, 6:])  # slot 1 is live, so the slice runs
    setattr(shrink[2], LIVE, frozenset({7}))  # live only in a slot this step does not use
    got = torch.zeros(5, 8)
    PunicaWrapperCPU.add_lora_linear(wrapper, got, x, tuple(shrink), tuple(expand), 1.0, (4, 2, 2))
    assert not got[:, 4:].any()


def test_logits_lora_is_skipped_when_no_slot_adapts_the_lm_head() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    register()
    wrapper, x, shrink, expand = _live_case()
    shrink_a, expand_b = shrink[0].clone(), expand[0].clone()
    expected = torch.zeros(5, 4)
    PunicaWrapperCPU.add_lora_logits.__wrapped__(wrapper, expected, x, shrink_a, expand_b, 1.0)
    got = torch.zeros(5, 4)
    PunicaWrapperCPU.add_lora_logits(wrapper, got, x, shrink_a, expand_b, 1.0)
    torch.testing.assert_close(got, expected)  # liveness unknown: computed
    setattr(expand_b, LIVE, frozenset())
    got = torch.zeros(5, 4)
    PunicaWrapperCPU.add_lora_logits(wrapper, got, x, shrink_a, expand_b, 1.0)
    assert not got.any()


def test_activating_an_adapter_records_which_slots_hold_non_zero_weights() -> None:
    slots = 3
    packed = (torch.zeros(slots, 1, 2, 4), torch.zeros(slots, 1, 2, 4))  # a two-slice layer
    module = type("Layer", (), {"lora_a_stacked": packed, "lora_b_stacked": torch.zeros(slots, 1, 4, 2)})()
    written: dict[int, tuple[bool, bool]] = {7: (True, False), 8: (True, True), 9: (False, False)}

    def activate(manager: Any, lora_id: int) -> bool:  # vLLM's: first free slot, weights written or zeroed
        index = manager.lora_index_to_id.index(None)
        manager.lora_index_to_id[index] = lora_id
        for weights, present in zip(packed, written[lora_id], strict=True):
            weights[index] = 1.0 if present else 0.0
        module.lora_b_stacked[index] = 1.0 if any(written[lora_id]) else 0.0
        return True

    manager = type("Manager", (), {"lora_index_to_id": [None] * slots, "modules": {"layer": module}})()
    tracked = track_live_slots(activate)
    for lora_id in written:
        assert tracked(manager, lora_id)
    assert getattr(packed[0], LIVE) == {0, 1}
    assert getattr(packed[1], LIVE) == {1}
    assert getattr(module.lora_b_stacked, LIVE) == {0, 1}
    manager.lora_index_to_id[1] = None  # slot 1 freed and reused by an adapter without the second slice
    written[10] = (True, False)
    tracked(manager, 10)
    assert getattr(packed[1], LIVE) == set()


# The slots of the tokens batched after a token on slot 1 (-1: base-model tokens); that token's output must
# not change in any bit whatever it is batched with.
BATCH_MATES = [
    [],  # alone: the reference
    [1],  # beside one more token on its adapter
    [1] * 6,
    [1] * 47,  # a prefill run of 48 tokens
    [0, 2, 3] + [0, 1, 2, 3] * 7,  # a decode step over 4 adapters: batched over adapters
    [-1, 0, 2, -1],  # with base tokens
    [1] * 39 + [0, 2, 3] * 3,  # a prefill run beside decodes on other adapters
    [0] * 40 + [1, 2, 3],  # beside another adapter's prefill run: a small group of its own
    [1] * 20 + [0] * 30,  # two groups, one GEMM per adapter
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fuse", [True, False], ids=["one-product-per-layer", "one-per-slice"])
def test_a_tokens_lora_output_does_not_depend_on_its_batch(
    dtype: torch.dtype, fuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch invariance, as vLLM's own ops have it: the plugin's paths (one run, batched over adapters, one
    GEMM per adapter) and their matmul sizes must give a token the same bits. They did not (a token decoding
    alone took a 1-row matmul and a fused add; beside others, more rows and a separate add), and near-tie
    greedy answers changed under mixed load (issue 18, bench/batch_invariance.py)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if not fuse:
        monkeypatch.setattr(fix, "FUSED_MAX_EXTRA_BYTES", 0)
    register()
    generator = torch.Generator().manual_seed(3)
    features, rank, sizes = 256, 16, (128, 64, 64)
    shrink = [torch.randn(4, 1, rank, features, generator=generator).to(dtype) * 0.05 for _ in sizes]
    expand = [torch.randn(4, 1, size, rank, generator=generator).to(dtype) * 0.05 for size in sizes]
    x_all = torch.randn(64, features, generator=generator).to(dtype)
    y_all = torch.randn(64, sum(sizes), generator=generator).to(dtype)
    outputs = []
    for mates in BATCH_MATES:
        token_slots = [1, *mates]
        wrapper = _wrapper(token_slots, 4)
        y = y_all[: len(token_slots)].clone()
        PunicaWrapperCPU.add_lora_linear(
            wrapper, y, x_all[: len(token_slots)], tuple(shrink), tuple(expand), 0.5, sizes
        )
        outputs.append(y[0])
    changed = [
        mates for mates, out in zip(BATCH_MATES, outputs, strict=True) if not torch.equal(out, outputs[0])
    ]
    assert not changed, f"token 0's output changed in the batches {changed}"


def test_every_lora_matmul_has_at_least_min_matmul_rows() -> None:
    layout = LoraBatchPlan(torch.tensor([5, 1, -1, 1, 5, 3])).layout()
    assert layout.longest == fix.MIN_MATMUL_ROWS  # 3 adapters x 8 rows, most of them zero
    assert layout.scatter(torch.ones(6, 2)).shape == (3, fix.MIN_MATMUL_ROWS, 2)
