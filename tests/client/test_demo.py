"""`python -m client demo` (`make demo`): config checks, and a reduced run of the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.__main__ import main as client_main
from client.demo import REPO_ROOT, DemoConfig, DemoError, _resolve_finetune_config, run_demo
from client.suites import shared_data_dir


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("format", "nope")}, "unknown task 'nope': give a family"),
        ({"tasks": ("uppercase", "uppercase")}, "listed more than once"),
        ({"tasks": ()}, "nothing to fine-tune"),
        ({"data": "my.jsonl", "data_adapter": "uppercase"}, "clashes"),
        ({"suite_per_family": -1}, "suite_per_family must be >= 0"),
        ({"n_test": 0}, "n_test must be >= 1"),
        ({"load_concurrency": (0,)}, "load concurrency levels must be >= 1"),
        ({"finetune_overrides": ("training.epochs",)}, "key=value"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DemoConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_errors_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        client_main(["demo", "--tasks", "uppercase,typo"])
    assert exit_info.value.code == 2
    assert "unknown task 'typo'" in capsys.readouterr().err


def test_finetune_config_follows_the_base() -> None:
    assert _resolve_finetune_config(DemoConfig(), "ignored") == REPO_ROOT / "configs" / "tiny-demo.yaml"
    qwen = DemoConfig(base_model="Qwen/Qwen2.5-7B-Instruct")
    assert _resolve_finetune_config(qwen, "Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b-instruct-lora.yaml"
    with pytest.raises(DemoError, match="--finetune-config"):
        _resolve_finetune_config(DemoConfig(base_model="org/unknown-7b"), "org/unknown-7b")
    explicit = DemoConfig(base_model="org/unknown-7b", finetune_config=Path("configs/tiny-demo.yaml"))
    assert _resolve_finetune_config(explicit, "org/unknown-7b") == (Path.cwd() / "configs/tiny-demo.yaml")


@pytest.mark.slow
def test_reduced_demo_tunes_adapters_that_beat_the_base(tiny_base: Path, tmp_path: Path) -> None:
    """The `make demo` pipeline with fewer steps and prompts: real fine-tuning, serving and benchmarks."""
    out = tmp_path / "demo"
    config = DemoConfig(
        out=out,
        tasks=("uppercase", "wrap_in_quotes"),
        # The demo's own training (n_train 2000, about 100 steps), not less: the tiny base differs from host
        # to host (its pre-training's float kernels differ by CPU), and so does where a task is learnt.
        # 800 items sufficed on an AVX2 host, but on an AMD AVX-512 host wrap_in_quotes stayed at 0.0; 1600
        # sufficed there, but on an Intel AVX-512 host uppercase reached 0.2 with 1600 and 0.825 with 2000
        # (2026-12-01).
        n_train=DemoConfig().n_train,
        n_test=40,
        suite_per_family=4,
        finetune_overrides=("training.eval_every=1000", "training.save_every=1000"),
        ifeval_limit=4,
        bench_max_tokens=64,
        load_concurrency=(1, 4),
        load_prompts=8,
        load_output_len=8,
    )
    summary = run_demo(config)

    assert summary == json.loads((out / "demo.json").read_text())
    models = ["tiny-base", "uppercase", "wrap_in_quotes"]
    assert summary["models"] == models
    for task in ("uppercase", "wrap_in_quotes"):
        scores = summary["tasks"][task]
        # Held-out prompts (topic words never seen in training): the adapter follows, the base does not.
        assert scores[task] >= scores["tiny-base"] + 0.3, (task, scores)
        assert (out / "adapters" / task / "adapter_model.safetensors").is_file()
        training = summary["training"][task]
        assert training["final_eval_loss"] < training["initial_eval_loss"]
    assert set(summary["tasks"]["suite"]) == set(models)
    assert len(summary["tasks_per_family"]["suite"]) == 9
    if summary["ifeval"] is None:  # no ../shared copy of IFEval and the hub unreachable: skipped, said why
        assert not (shared_data_dir() / "ifeval" / "input_data.jsonl").exists()
        assert "could not be loaded" in summary["skipped"]["ifeval"]
    else:
        assert set(summary["ifeval"]["prompt_strict"]) == set(models)
        assert (out / "bench" / "ifeval" / "report.png").is_file()
    assert [level["max_concurrency"] for level in summary["load"]] == [1, 4]
    assert all(level["completed"] == 8 and level["failed"] == 0 for level in summary["load"])
    for name in ("report.md", "tasks.png", "serve.log", "load/load.png", "bench/tasks-suite/report.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "adapter `uppercase`:" in report and "## Load" in report and "python -m serve" in report
    assert any(command.startswith("python -m finetune run --config") for command in summary["commands"])
