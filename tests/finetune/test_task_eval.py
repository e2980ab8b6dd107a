"""The task score during training: reading held-out verifiable prompts, scoring replies, and choosing the
exported checkpoint or stopping early by that score instead of eval loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from finetune.recipe import run
from finetune.task_eval import TaskEvalError, follow_flags, load_task_prompts, prompt_ids
from tests.finetune.conftest import overrides

TASK_ITEM = {
    "id": "t1",
    "family": "uppercase",
    "prompt": "Describe the kite in capital letters.",
    "checks": {"all_uppercase": None},
    "reference": "A RED KITE.",
}
IFEVAL_ITEM = {
    "key": 7,
    "prompt": "Describe the kite, all in lowercase.",
    "instruction_id_list": ["change_case:english_lowercase"],
    "kwargs": [{}],
}


def _write(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_both_item_formats_are_read_and_scored_by_their_own_checkers(tmp_path: Path) -> None:
    prompts = load_task_prompts(_write(tmp_path / "items.jsonl", TASK_ITEM, "", IFEVAL_ITEM), None, 0)
    assert [item.origin.rsplit(":", 1)[1] for item in prompts] == ["1", "3"]
    tasks_item, ifeval_item = prompts
    assert tasks_item.follows("  A RED KITE. ") and not tasks_item.follows("A red kite.")
    assert ifeval_item.follows("a red kite.") and not ifeval_item.follows("A red kite.")


def test_a_sample_is_seeded_and_the_same_at_every_load(tmp_path: Path) -> None:
    items = [{**TASK_ITEM, "prompt": f"Describe kite number {i} in capitals."} for i in range(20)]
    path = _write(tmp_path / "items.jsonl", *items)
    first = load_task_prompts(path, 5, seed=3)
    assert [p.prompt for p in first] == [p.prompt for p in load_task_prompts(path, 5, seed=3)]
    assert len(first) == 5 and len({p.prompt for p in first}) == 5
    assert [p.prompt for p in first] != [p.prompt for p in load_task_prompts(path, 5, seed=4)]
    assert len(load_task_prompts(path, 50, seed=3)) == 20  # asking for more than there are takes them all


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"items.jsonl:2: not valid JSON"),
        ('["a list"]', r"items.jsonl:2: expected a JSON object, got list"),
        ({"prompt": "Say hi."}, r"items.jsonl:2: 'checks' must be a non-empty object"),
        ({"checks": {"all_uppercase": None}}, r"items.jsonl:2: needs a non-empty string 'prompt'"),
        ({**TASK_ITEM, "checks": {"shouting": True}}, r"items.jsonl:2: unknown checks \['shouting'\]"),
        ({**IFEVAL_ITEM, "kwargs": [{"num_words": 3}]}, r"items.jsonl:2: field 'kwargs\[0\]'"),
        ({**IFEVAL_ITEM, "instruction_id_list": ["no:such"]}, r"items.jsonl:2: .*no:such"),
    ],
)
def test_a_bad_item_names_its_file_and_line(tmp_path: Path, line: object, message: str) -> None:
    with pytest.raises(TaskEvalError, match=message):
        load_task_prompts(_write(tmp_path / "items.jsonl", TASK_ITEM, line), None, 0)


def test_a_missing_or_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskEvalError, match=r"training\.task_eval\.path: .*nowhere\.jsonl is not a file"):
        load_task_prompts(tmp_path / "nowhere.jsonl", None, 0)
    with pytest.raises(TaskEvalError, match="holds no prompts"):
        load_task_prompts(_write(tmp_path / "empty.jsonl", ""), None, 0)


def test_the_config_refuses_a_metric_it_cannot_measure(tmp_path: Path) -> None:
    base = ["base_model=b", "data.path=d.jsonl", f"output_dir={tmp_path / 'o'}"]
    with pytest.raises(ConfigError, match="best_metric task_score needs task_eval"):
        load_config(None, [*base, "training.best_metric=task_score"])
    with pytest.raises(ConfigError, match=r"data\.eval_fraction is 0"):
        load_config(None, [*base, "data.eval_fraction=0", "training.export=best"])
    with pytest.raises(
        ConfigError, match=r"training\.task_eval\.n: Input should be greater than or equal to 1"
    ):
        load_config(None, [*base, "training.task_eval.path=t.jsonl", "training.task_eval.n=0"])
    # With the task score to go by, no eval split is needed.
    config = load_config(
        None,
        [
            *base,
            "data.eval_fraction=0",
            "training.export=best",
            "training.task_eval.path=t.jsonl",
            "training.best_metric=task_score",
        ],
    )
    assert config.training.task_eval is not None and config.training.task_eval.n == 32


def _task_test_file(task_data: Path) -> Path:
    return task_data.parent / "test.jsonl"  # written beside train.jsonl by the same generator


def _train_by_task_score(tiny_base: Path, task_data: Path, out: Path, *extra: str) -> dict[str, Any]:
    """40 steps with an eval every 10, choosing by the task score on the 16 held-out prompts; metrics.json."""
    settings = [
        "training.max_steps=40",
        "training.eval_every=10",
        "training.best_metric=task_score",
        f"training.task_eval.path={_task_test_file(task_data)}",
        "training.task_eval.n=16",
        "training.task_eval.max_new_tokens=48",
    ]
    run(load_config(None, overrides(tiny_base, task_data, out, *settings, *extra)))
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_the_exported_adapter_is_the_checkpoint_with_the_best_task_score(
    tiny_base: Path, task_data: Path, tmp_path: Path, tiny_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.prompting import end_of_turn_ids

    out = tmp_path / "by-score"
    metrics = _train_by_task_score(tiny_base, task_data, out, "training.export=best")
    history = metrics["task_score"]
    assert [point["step"] for point in history] == [0, 10, 20, 30, 40]
    assert all(point["n"] == 16 and point["score"] == point["passed"] / 16 for point in history)
    assert [point["step"] for point in metrics["eval_loss"]] == [0, 10, 20, 30, 40]  # measured alongside
    best = max(history, key=lambda point: point["score"])  # max keeps the first of equal scores, as the run
    assert metrics["best_metric"] == "task_score" and metrics["exported"] == "best"
    assert (metrics["best_step"], metrics["best_value"]) == (best["step"], best["score"])
    assert metrics["best_task_score"] == best["score"]
    assert metrics["final_task_score"] == history[-1]["score"]

    # Scored again from the folder, the exported adapter follows as many prompts as its step did.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(model, str(out)).eval()
    prompts = load_task_prompts(_task_test_file(task_data), 16, seed=42)
    flags = follow_flags(
        adapter,
        tiny_tokenizer,
        prompts,
        prompt_ids(tiny_tokenizer, prompts, None),
        end_of_turn_ids(tiny_tokenizer, model.generation_config.eos_token_id),
        max_new_tokens=48,
        batch_size=5,  # other batches than the run's: left padding must not change a greedy reply
        device=torch.device("cpu"),
    )
    assert sum(flags) == best["passed"]


@pytest.mark.slow
def test_early_stopping_goes_by_the_task_score(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    # No score can rise by more than 1 (a share), so patience 1 stops at the first eval after step 0,
    # although the eval loss falls by more than that delta there (a stop by eval loss would not come).
    metrics = _train_by_task_score(
        tiny_base,
        task_data,
        out,
        "training.early_stopping_patience=1",
        "training.early_stopping_min_delta=1.0",
    )
    assert metrics["stopped_early"] is True and metrics["steps"] == 10
    losses = [point["loss"] for point in metrics["eval_loss"]]
    assert losses[0] - losses[1] > 1.0
    assert metrics["exported"] == "best" and metrics["best_step"] == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(not tensor.any() for name, tensor in weights.items() if "lora_B" in name)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
