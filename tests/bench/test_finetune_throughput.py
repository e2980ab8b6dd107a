"""bench.finetune_throughput: token counting, batch matching, label comparison and the MFU formula."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import finetune_throughput as ft
from bench.fixtures import BASES


def test_segment_lengths_splits_a_padding_free_row_where_positions_restart() -> None:
    assert ft.segment_lengths([0, 1, 2, 0, 1, 0, 1, 2, 3]) == [3, 2, 4]
    assert ft.segment_lengths([0]) == [1]
    assert ft.segment_lengths([]) == []


def test_count_batch_counts_real_tokens_of_a_padded_batch() -> None:
    counts = ft.TokenCounts()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100, -100], [-100, -100, 7, 8, 9]])
    ft._count_batch(
        {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels, "attention_mask": mask}, counts
    )
    assert counts.real_tokens == 8
    assert counts.computed_tokens == 10
    assert counts.label_tokens == 5
    assert counts.samples == 2
    assert counts.sum_sq_lengths == 3 * 3 + 5 * 5
    assert counts.sum_sq_rows == 2 * 5 * 5  # dense attention over each padded row


def test_count_batch_counts_a_padding_free_row_by_its_segments() -> None:
    counts = ft.TokenCounts()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    labels = torch.tensor([[-100, -100, 3, 4, -100, 6, 7]])
    ft._count_batch(
        {"input_ids": torch.zeros(1, 7, dtype=torch.long), "labels": labels, "position_ids": positions},
        counts,
    )
    assert (counts.real_tokens, counts.computed_tokens, counts.label_tokens) == (7, 7, 4)
    assert counts.samples == 2
    assert counts.sum_sq_lengths == 16 + 9
    assert counts.sum_sq_rows == 7 * 7  # one flattened row: sdpa scores all of it


def test_label_count_ignores_the_first_token_and_ignored_labels() -> None:
    assert ft.label_count([9, -100, 4, 5]) == 2  # a label on the first token is never trained
    assert ft.label_count([-100, -100]) == 0


def test_samples_digest_is_blind_to_the_first_label_only() -> None:
    a = [([1, 2, 3], [-100, 2, 3])]
    assert ft.samples_digest(a) == ft.samples_digest([([1, 2, 3], [1, 2, 3])])
    assert ft.samples_digest(a) != ft.samples_digest([([1, 2, 3], [-100, -100, 3])])
    assert ft.samples_digest(a) != ft.samples_digest([([1, 2, 4], [-100, 2, 3])])


def test_matched_batch_size_carries_the_same_real_tokens_per_step() -> None:
    assert ft.matched_batch_size(2004.0, 60.7) == 33
    assert ft.matched_batch_size(10.0, 60.0) == 1  # never zero
    with pytest.raises(ValueError):
        ft.matched_batch_size(0.0, 60.0)


def test_tail_mean_uses_the_last_fifth_with_a_floor() -> None:
    values = [10.0] * 20 + [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, error = ft.tail_mean(values)
    assert mean == 3.0
    assert error == pytest.approx(math.sqrt(2.5) / math.sqrt(5))
    assert ft.tail_mean([2.0])[0] == 2.0
    assert math.isnan(ft.tail_mean([])[0])


def test_matmul_params_matches_a_real_qwen2_model() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**ft.QWEN2_SMOKE))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert ft.matmul_params(ft.QWEN2_SMOKE) == linear  # every linear layer, lm_head included


def test_matmul_params_of_qwen25_7b() -> None:
    # 7.62B parameters in all, minus the 152064 x 3584 input embedding, minus norms and q/k/v biases.
    n = ft.matmul_params(ft.QWEN25_7B)
    assert n == 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944) + 3584 * 152064
    assert 7.0e9 < n < 7.1e9


def test_model_flops_formula() -> None:
    config = {**ft.QWEN25_7B}
    n = ft.matmul_params(config)
    tokens, sum_sq = 4096, 64 * 64**2  # 64 samples of 64 tokens
    attention = 12 * 28 * 28 * 128 * sum_sq
    report = ft.model_flops(config, tokens, sum_sq, seconds=2.0, peak_flops=989e12, lora_params=40_000_000)
    assert report.model_flops == pytest.approx(6 * n * tokens + attention)
    assert report.lora_flops == pytest.approx((4 * n + 6 * 40_000_000) * tokens + attention)
    assert report.mfu == pytest.approx(report.model_flops / (2.0 * 989e12))
    assert report.mfu_lora < report.mfu


def test_settings_reach_the_recipe_config_unchanged(tmp_path: Path) -> None:
    from finetune.config import load_config

    settings = ft.settings_from_demo_config(Path("base"), Path("data.jsonl"), steps=40)
    config = load_config(ft.DEMO_CONFIG, settings.overrides(tmp_path / "out"))
    training = config.training
    assert training.max_steps == 40
    assert math.ceil(training.warmup_ratio * 40) == settings.warmup_steps == 2
    assert (training.micro_batch_size, config.data.max_seq_len) == (8, 256)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32, 0.0)
    assert config.lora.target_modules == "all-linear"
    assert training.packing and not training.gradient_checkpointing
    assert config.data.eval_fraction == 0
    assert training.save_every > 40 and training.eval_every > 40
    assert training.attn_implementation == "sdpa"
    flex = replace(settings, attn_implementation="flex_attention")
    assert load_config(ft.DEMO_CONFIG, flex.overrides(tmp_path / "out")).training.attn_implementation == (
        "flex_attention"
    )


def test_trl_gets_the_lora_our_recipe_trains_with() -> None:
    from finetune.recipe import peft_lora_config

    settings = ft.settings_from_demo_config(Path("base"), Path("data.jsonl"), steps=40)
    lora = settings.recipe_config(Path("unused")).lora  # what run_trl hands peft_lora_config
    config = peft_lora_config(lora)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.0)
    assert (config.target_modules, config.use_rslora, config.bias) == ("all-linear", lora.use_rslora, "none")


def test_block_sparse_scores_count_the_blocks_a_sample_spans() -> None:
    # One sample of 256 tokens: blocks 0 and 1, causal pairs (0,0), (1,0), (1,1).
    assert ft.block_sparse_scores([256], block=128) == 3 * 128 * 128
    # Two samples of 128 tokens, one block each: no pair across them.
    assert ft.block_sparse_scores([128, 128], block=128) == 2 * 128 * 128
    # A sample straddling the block boundary links blocks 0 and 1; the shared blocks count once.
    assert ft.block_sparse_scores([100, 100, 56], block=128) == 3 * 128 * 128
    # Many short samples in one 4096-token row: far below the dense causal score matrix.
    dense_causal_blocks = 32 * 33 // 2
    assert ft.block_sparse_scores([64] * 64, block=128) == 32 * 128 * 128 < dense_causal_blocks * 128 * 128


def test_steady_rate_leaves_out_the_first_steps() -> None:
    marks = [(5.0, 100, 10), (6.0, 200, 20), (7.0, 300, 30), (8.0, 400, 40)]  # a slow first step
    assert ft.steady_rate(marks, 0) == (8.0, 400, 40)
    assert ft.steady_rate(marks, 1) == (3.0, 300, 30)
    assert ft.steady_rate(marks, 9) == (1.0, 100, 10)  # never fewer than the last step
    assert [ft.warmup_steps_excluded(n) for n in (1, 6, 20, 60)] == [0, 1, 3, 3]


def test_flex_side_is_refused_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal without a CUDA GPU")
    with pytest.raises(SystemExit):
        ft.main(["--sides", "ours,ours_flex", "--quick"])
    assert "ours_flex trains on a CUDA GPU only" in capsys.readouterr().err


def test_gpu_section_reports_every_side_with_mfu() -> None:
    """The GPU report (only a CUDA run writes it) from the saved CPU run's figures, as if on a GPU, plus a
    flex side: every side gets a row, MFU columns and the flex variant's comparison."""
    import copy
    import json
    from types import SimpleNamespace

    document = json.loads((ft.results_dir(ft.NAME) / "results.json").read_text(encoding="utf-8"))
    results = document["results"]
    for result in results.values():
        result.pop("labels", None)  # saved without the per-sample counts the label check needs
        result |= {
            "device": "cuda",
            "gpu_peak_bytes": result["peak_rss_bytes"],
            "gpu_before_train_bytes": result["rss_before_train_bytes"],
        }
    flex = copy.deepcopy(results["ours"]) | {"side": "ours_flex", "attention_overcompute": 1.9}
    flex["tokens_per_s"] *= 1.5
    results["ours_flex"] = flex
    plan = SimpleNamespace(model_config=ft.QWEN25_7B)
    document |= {"mode": "gpu", "peak_tflops": 989.0, "summary": ft.summarize(results, plan, 989.0)}  # type: ignore[arg-type]
    document["plan"]["model_config"] = ft.QWEN25_7B
    text = "\n".join(ft.gpu_markdown(document))
    assert text.count("| ours, `flex_attention`: one packed row per micro-batch") == 1
    assert "MFU (6N)" in text and "1.50x the speed of ours" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + len(results)


def test_smollm2_settings_come_from_its_demo_config() -> None:
    smollm2 = BASES["smollm2"]
    settings = ft.settings_from_demo_config(
        Path("base"), Path("data.jsonl"), steps=40, demo_config=smollm2.finetune_config
    )
    assert (settings.micro_batch_size, settings.max_seq_len) == (1, 384)
    assert settings.precision in ("bf16", "fp32")  # `auto` resolved, so TRL gets the same
    config = settings.recipe_config(Path("out"))
    assert config.training.precision == settings.precision and config.data.max_seq_len == 384
    assert not ft.several_rows(smollm2, None) and ft.several_rows(BASES["tiny"], None)


def test_trl_template_for_smollm2_marks_the_tokens_our_recipe_labels(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    from finetune.prompting import IGNORE_INDEX, encode_conversation, end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    marked = ft.with_generation_markers(tokenizer.chat_template)
    assert ft.with_generation_markers(marked) == marked
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in capitals."},
        {"role": "assistant", "content": "RED"},
    ]
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=marked) == plain
    theirs: Any = tokenizer.apply_chat_template(
        messages, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = encode_conversation(tokenizer, messages, end_of_turn_ids(tokenizer))
    assert theirs["input_ids"] == ours.input_ids
    assert [bool(m) for m in theirs["assistant_masks"]] == [label != IGNORE_INDEX for label in ours.labels]
    with pytest.raises(ValueError, match="generation"):
        ft.with_generation_markers("{{ messages }}")


def test_gpu_run_keeps_to_the_tiny_base(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ft.main(["--gpu", "--base", "smollm2"])
    assert "--gpu builds its own model" in capsys.readouterr().err
