"""Fixtures for recipe tests: task data from the project's generator, and one trained adapter per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def random_lora(base: Path, out: Path, targets: list[str], *, seed: int, scale: float) -> Path:
    """A rank-8 PEFT LoRA on `targets`, random weights of `scale`: large enough to change greedy answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out))
    return out


def overrides(tiny_base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A small, fast CPU run on the tiny base."""
    return [
        f"base_model={tiny_base}",
        f"data.path={data}",
        f"output_dir={out}",
        "data.max_seq_len=128",
        "data.eval_fraction=0.1",
        "training.micro_batch_size=8",
        "training.learning_rate=3e-3",
        "training.warmup_ratio=0.1",
        "training.precision=fp32",
        *extra,
    ]


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chat-format training data from the project's task generator (the demo's data source)."""
    from client.tasks import write_task_data

    out = tmp_path_factory.mktemp("tasks")
    return write_task_data(out, ["json_object", "wrap_in_quotes"], n_train=240, n_test=16, seed=0)["train"]


@pytest.fixture(scope="session")
def trained_adapter(tiny_base: Path, task_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "adapter"
    code = main(
        [
            "run",
            "--config",
            str(REPO_ROOT / "configs" / "tiny-demo.yaml"),
            *overrides(tiny_base, task_data, out, "training.max_steps=40", "training.eval_every=20"),
        ]
    )
    assert code == 0
    return out
