"""The fine-tuning recipe end to end on the tiny base: learning, outputs, resume, early stopping, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.config import ConfigError, load_config
from finetune.recipe import LoraRecipe, TrainingError, encode_records, partial_dir, run
from tests.finetune.conftest import REPO_ROOT, overrides


@pytest.mark.slow
def test_eval_loss_falls_and_every_output_is_written(trained_adapter: Path) -> None:
    names = {path.name for path in trained_adapter.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.json"}
    assert expected | {"loss.png", "manifest.json"} <= names
    assert not partial_dir(trained_adapter).exists()

    metrics = json.loads((trained_adapter / "metrics.json").read_text())
    assert metrics["steps"] == 40
    assert [point["step"] for point in metrics["eval_loss"]] == [0, 20, 40]
    assert metrics["final_eval_loss"] < 0.6 * metrics["initial_eval_loss"]
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["packing"] is True
    assert len(metrics["train_loss"]) == 40

    manifest = json.loads((trained_adapter / "manifest.json").read_text())
    assert manifest["base_model"]["source"] == "local"
    assert len(manifest["base_model"]["content_sha256"]) == 64
    assert len(manifest["data"]["sha256"]) == 64
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert (trained_adapter / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The resolved config reloads as the same run.
    assert load_config(trained_adapter / "config.yaml").training.max_steps == 40


@pytest.mark.slow
def test_adapter_loads_in_peft_and_changes_greedy_output(
    trained_adapter: Path, tiny_base: Path, tiny_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.prompting import encode_prompt

    prompt = encode_prompt(
        tiny_tokenizer,
        [{"role": "user", "content": 'Describe the lantern as a JSON object with the key "name".'}],
    )
    ids = torch.tensor([prompt])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base_out = base.generate(ids, max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    tuned = PeftModel.from_pretrained(base, trained_adapter)
    tuned_out = tuned.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    assert tuned_out != base_out
    assert tiny_tokenizer.decode(tuned_out).lstrip().startswith(("{", '"'))


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_reaches_the_uninterrupted_state(
    tiny_base: Path, task_data: Path, tmp_path: Path
) -> None:
    common = ("training.max_steps=10", "training.save_every=2", "training.eval_every=5", "lora.dropout=0.1")
    straight = tmp_path / "straight"
    run(load_config(None, overrides(tiny_base, task_data, straight, *common)))

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "finetune", "run", *overrides(tiny_base, task_data, killed, *common)]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = partial_dir(killed) / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not killed.exists(), "a killed run must not leave an adapter at output_dir"

    with pytest.raises(TrainingError, match="pass --resume to continue it"):
        run(load_config(None, overrides(tiny_base, task_data, killed, *common)))
    with pytest.raises(TrainingError, match="the config differs"):
        run(load_config(None, overrides(tiny_base, task_data, killed, *common, "seed=7")), resume=True)

    assert main(["run", "--resume", *overrides(tiny_base, task_data, killed, *common)]) == 0
    expected, resumed = _adapter_weights(straight), _adapter_weights(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    assert [p["loss"] for p in resumed_metrics["eval_loss"]] == pytest.approx(
        [p["loss"] for p in straight_metrics["eval_loss"]], rel=1e-5
    )
    assert len(resumed_metrics["train_loss"]) == 10


@pytest.mark.slow
def test_early_stopping_exports_the_best_adapter(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "early"
    # No eval can beat the step-0 loss by 100 nats, so patience 2 stops the run at step 2.
    run(
        load_config(
            None,
            overrides(
                tiny_base,
                task_data,
                out,
                "training.max_steps=20",
                "training.eval_every=1",
                "training.early_stopping_patience=2",
                "training.early_stopping_min_delta=100",
            ),
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] is True
    assert metrics["steps"] == 2
    assert metrics["exported"] == "best" and metrics["best_step"] == 0
    # The best adapter is the untrained one: LoRA B starts at zero.
    assert all(not tensor.any() for name, tensor in _adapter_weights(out).items() if "lora_B" in name)


@pytest.mark.slow
def test_padded_batches_train_too(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "padded"
    run(
        load_config(
            None, overrides(tiny_base, task_data, out, "training.max_steps=6", "training.packing=false")
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packing"] is False
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]


def test_existing_output_dir_is_refused(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="already exists; use another output_dir or set overwrite=true"):
        run(load_config(None, overrides(tiny_base, task_data, out)))
    assert (out / "keep.txt").read_text() == "precious"


def test_resume_without_checkpoint_is_refused(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"no checkpoint in .* to resume from"):
        run(load_config(None, overrides(tiny_base, task_data, tmp_path / "fresh")), resume=True)


def diverging_config(tiny_base: Path, task_data: Path, out: Path, steps: int):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        overrides(
            tiny_base,
            task_data,
            out,
            f"training.max_steps={steps}",
            "training.learning_rate=1e36",  # Adam moves every weight by about this much per step
            "training.warmup_ratio=0",
            "training.max_grad_norm=null",
        ),
    )


def test_diverged_run_stops_and_publishes_nothing(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    # Served, an adapter with non-finite weights corrupts the answers of every request batched with it.
    out = tmp_path / "adapter"
    with pytest.raises(TrainingError, match=r"run diverged: at step [23] the training loss is nan") as err:
        run(diverging_config(tiny_base, task_data, out, steps=4))
    assert "training.learning_rate (now 1e+36)" in str(err.value)
    assert not out.exists()


def test_non_finite_weights_are_never_published(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    recipe = LoraRecipe(diverging_config(tiny_base, task_data, out, steps=1))
    recipe.setup()
    lora_b = next(p for name, p in recipe.model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="the run diverged: the adapter's weights are not finite"):
        recipe.save()
    assert not out.exists()


def test_overlong_samples_are_truncated_or_dropped_and_counted(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from finetune.data import Record
    from finetune.prompting import end_of_turn_ids

    records = [
        Record(messages=(("user", "hi"), ("assistant", "short answer"))),
        Record(messages=(("user", "hi"), ("assistant", "a long answer " * 40))),
        Record(messages=(("user", "a very long question " * 40), ("assistant", "lost"))),
    ]
    stop = end_of_turn_ids(tiny_tokenizer)
    base = ["base_model=x", "output_dir=o", "data.path=d.jsonl", "data.max_seq_len=32"]
    samples, report = encode_records(records, tiny_tokenizer, stop, load_config(None, base))
    assert (report.n_samples, report.n_truncated, report.n_dropped_no_labels) == (2, 2, 1)
    assert all(len(sample.input_ids) <= 32 for sample in samples)
    samples, report = encode_records(
        records, tiny_tokenizer, stop, load_config(None, [*base, "data.overlong=drop"])
    )
    assert (report.n_samples, report.n_dropped_overlong) == (1, 2)


def test_cli_reports_bad_config_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("base_model: x\noutput_dir: o\ndata: {path: d.jsonl}\nlora: {use_dora: true}\n")
    assert main(["run", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "lora: use_dora=true: vLLM cannot serve DoRA adapters; set lora.use_dora=false" in error
    assert "Traceback" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("training.quantization=4bit", "QLoRA. needs a CUDA GPU; set it to none on CPU"),
        ("training.attn_implementation=flex_attention", "flex_attention trains on a CUDA GPU only"),
    ],
)
def test_cuda_only_settings_are_refused_without_cuda(
    tiny_base: Path, task_data: Path, tmp_path: Path, setting: str, message: str
) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=message):
        run(load_config(None, overrides(tiny_base, task_data, out, setting)))
    assert not out.exists() and not partial_dir(out).exists()


def test_flex_attention_on_cuda_needs_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from finetune.recipe import refuse_cuda_only_settings

    config = load_config(
        None,
        ["base_model=x", "output_dir=o", "data.path=d.jsonl", "training.attn_implementation=flex_attention"],
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="compiles its kernels with Triton, which is not installed"):
        refuse_cuda_only_settings(config, torch.device("cuda"))
    refuse_cuda_only_settings(
        config.model_copy(
            update={"training": config.training.model_copy(update={"attn_implementation": "sdpa"})}
        ),
        torch.device("cuda"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("training.quantization=4bit", "training.gradient_checkpointing=true"),
        ("training.attn_implementation=flex_attention",),
    ],
)
def test_gpu_bf16_and_qlora_train(
    tiny_base: Path, task_data: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    out = tmp_path / "gpu"
    settings = overrides(
        tiny_base, task_data, out, "training.max_steps=20", "training.precision=auto", *extra
    )
    run(load_config(None, settings))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bfloat16"
    assert metrics["peak_memory_kind"] == "cuda_max_memory_allocated"
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["packing"] is True  # the packing probe passed: packed samples kept apart


def test_eval_pass_covers_every_eval_sample(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    # A small token budget splits the eval set over several micro-batches.
    settings = overrides(
        tiny_base, task_data, tmp_path / "o", "data.eval_fraction=0.3", "training.micro_batch_size=1"
    )
    recipe = LoraRecipe(load_config(None, settings))
    recipe.setup()
    assert len(recipe.eval_plan) > 1
    assert sorted(i for batch in recipe.eval_plan for i in batch) == list(range(len(recipe.eval_samples)))
    assert sorted({i for batch in recipe.plan for i in batch}) == list(range(len(recipe.train_samples)))


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    import torch

    from finetune.recipe import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    config = load_config(None, ["base_model=b", "data.path=d.jsonl", "output_dir=o"])
    assert resolve_precision(config) == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    fp32 = load_config(None, ["base_model=b", "data.path=d.jsonl", "output_dir=o", "training.precision=fp32"])
    assert resolve_precision(fp32) == torch.float32
