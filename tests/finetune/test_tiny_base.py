"""Tests for the embedded tiny base model: deterministic cached build, transformers and vLLM loading."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from finetune.tiny_base import MARKER_FILE, TinyBaseSpec, build_tiny_base

# A few steps are enough to exercise pre-training; the corpus is cut down to keep the build ~2 s.
FAST_SPEC = TinyBaseSpec(corpus_documents=400, pretrain_steps=4, warmup_steps=2)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "List two colors."},
    {"role": "assistant", "content": "- red\n- blue"},
]
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nList two colors.<|im_end|>\n"
    "<|im_start|>assistant\n- red\n- blue<|im_end|>\n"
)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fast build of the tiny base; the shared `tiny_base` fixture is the full default build."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", FAST_SPEC)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    first = build_tiny_base(tmp_path / "first", FAST_SPEC)
    second = build_tiny_base(tmp_path / "second", FAST_SPEC)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _sha256(first / name) == _sha256(second / name), name
    assert json.loads((first / MARKER_FILE).read_text())["spec"]["pretrain_steps"] == FAST_SPEC.pretrain_steps
    # Only the finished folder is left: no temporary sibling survives the build.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "second"]

    mtimes = {path.name: path.stat().st_mtime_ns for path in first.iterdir()}
    started = time.perf_counter()
    assert build_tiny_base(first, FAST_SPEC) == first
    assert time.perf_counter() - started < 1.0
    assert {path.name: path.stat().st_mtime_ns for path in first.iterdir()} == mtimes


def test_stale_build_is_rebuilt_and_foreign_folder_needs_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = build_tiny_base(tmp_path / "base", FAST_SPEC)
    other_spec = TinyBaseSpec(corpus_documents=400, pretrain_steps=0)
    with caplog.at_level("INFO"):
        build_tiny_base(out_dir, other_spec)
    assert "pretrain_steps=4 (wanted 0)" in caplog.text
    assert json.loads((out_dir / MARKER_FILE).read_text())["spec"]["pretrain_steps"] == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="--force"):
        build_tiny_base(foreign, other_spec)
    assert (foreign / "notes.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_base(empty, other_spec) / "model.safetensors").is_file()


def test_invalid_spec_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyBaseSpec(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyBaseSpec(vocab_size=100)


def test_transformers_loads_model_and_chatml_tokenizer(quick_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(quick_base)
    model = AutoModelForCausalLM.from_pretrained(quick_base)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.config.head_dim == 64
    assert model.dtype == torch.float32

    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (model.config.eos_token_id, model.config.pad_token_id) == (eos_id, pad_id)
    generation_config = GenerationConfig.from_pretrained(quick_base)
    assert (generation_config.eos_token_id, generation_config.pad_token_id) == (eos_id, pad_id)
    assert generation_config.bos_token_id is None

    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML.split("- red")[0]

    text = 'Ünïcödé 日本 🙂 {"a": 1}\n\ttabs and  spaces'
    ids = tokenizer(text)["input_ids"]  # default add_special_tokens=True must add no BOS
    assert tokenizer.unk_token_id is None
    assert tokenizer.decode(ids) == text
    special_ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert special_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special_ids[-1] == eos_id

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, vocab)
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_chat_template_marks_assistant_tokens(quick_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quick_base)
    encoded: Any = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = tokenizer.decode([token for token, keep in zip(ids, mask, strict=True) if keep])
    assert trained == "- red\n- blue<|im_end|>"
