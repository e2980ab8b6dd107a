"""`python -m pipeline demo` (`make demo`): config checks, and reduced runs of the whole pipeline on the tiny
base and on SmolLM2 (whose adapter must then answer through the server exactly as transformers + PEFT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.demo import (
    PACKAGED_SERVE_ARGS,
    REPO_ROOT,
    Demo,
    DemoConfig,
    DemoError,
    _resolve_finetune_config,
    _write_ifeval_subset,
    base_fingerprint,
    check_names,
    read_catalog,
    run_demo,
    run_full_ifeval,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("uppercase", "uppercase")}, "listed more than once"),
        ({"tasks": ()}, "nothing to fine-tune"),
        ({"data": "my.jsonl", "data_adapter": "uppercase"}, "clashes"),
        ({"data": "my.jsonl", "data_adapter": "mix"}, "clashes"),
        ({"suite_per_family": -1}, "suite_per_family must be >= 0"),
        ({"n_test": 0}, "n_test must be >= 1"),
        ({"load_concurrency": (0,)}, "load concurrency levels must be >= 1"),
        ({"finetune_overrides": ("training.epochs",)}, "key=value"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DemoConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_model": "tiny", "tasks": ("format", "nope")}, "unknown task 'nope': give a family"),
        ({"tasks": ("uppercase", "format")}, "unknown task 'format' for a real base"),
        ({"mix_families": ("uppercase", "nope")}, r"unknown mix families \['nope'\]"),
    ],
)
def test_names_the_client_does_not_know_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Task names are checked against `python -m client catalog`, what `client tasks` and `distill` accept."""
    with pytest.raises(ValueError, match=message):
        check_names(DemoConfig(**kwargs), read_catalog())  # type: ignore[arg-type]


def test_catalog_names_the_families_of_both_flows() -> None:
    catalog = read_catalog()
    assert catalog.task_names["format"] == ["json_object", "bullet_list", "uppercase", "wrap_in_quotes"]
    assert catalog.task_names["uppercase"] == ["uppercase"] and len(catalog.task_families) == 9
    assert catalog.distill_families["uppercase"] == "change_case:english_capital"


def test_cli_errors_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pipeline_main(["demo", "--tasks", "uppercase,typo"])
    assert exit_info.value.code == 2
    assert "unknown task 'typo'" in capsys.readouterr().err


def test_each_flow_has_its_defaults() -> None:
    real = DemoConfig()
    assert real.base_model == "smollm2-135m-instruct" and not real.tiny
    assert (real.task_names, real.n_train, real.n_test, real.max_tokens) == (
        ("uppercase", "lowercase", "quotation"),
        40,
        16,
        256,
    )
    assert real.extra_adapters == ("mix",)
    assert DemoConfig(tasks=("json",)).extra_adapters == ()  # a mix of one task is that task
    assert DemoConfig(mix=False).extra_adapters == ()
    tiny = DemoConfig(base_model="tiny")
    assert (tiny.task_names, tiny.n_train, tiny.n_test, tiny.max_tokens) == (
        ("uppercase", "lowercase", "wrap_in_quotes"),
        2000,
        200,
        128,
    )
    assert tiny.extra_adapters == ()
    assert DemoConfig(base_model="tiny", n_train=5).n_train == 5


def test_finetune_config_follows_the_base() -> None:
    assert (
        _resolve_finetune_config(DemoConfig(base_model="tiny"), "x")
        == REPO_ROOT / "configs" / "tiny-demo.yaml"
    )
    smol = _resolve_finetune_config(DemoConfig(), "ignored")
    assert smol == REPO_ROOT / "configs" / "smollm2-135m-instruct-lora.yaml"
    qwen = DemoConfig(base_model="Qwen/Qwen2.5-7B-Instruct")
    assert _resolve_finetune_config(qwen, "Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b-instruct-lora.yaml"
    with pytest.raises(DemoError, match="--finetune-config"):
        _resolve_finetune_config(DemoConfig(base_model="org/unknown-7b"), "org/unknown-7b")
    explicit = DemoConfig(base_model="org/unknown-7b", finetune_config=Path("configs/tiny-demo.yaml"))
    assert _resolve_finetune_config(explicit, "org/unknown-7b") == (Path.cwd() / "configs/tiny-demo.yaml")


def test_ifeval_subset_stage_runs_the_client_command_on_the_tasks_types(tmp_path: Path) -> None:
    config = DemoConfig(out=tmp_path, tasks=("uppercase", "quotation"), ifeval_per_type=3, ifeval_others=0)
    demo = Demo(config=config, catalog=read_catalog())
    subset = _write_ifeval_subset(demo)
    assert demo.commands == [
        "python -m client ifeval-subset --focus change_case:english_capital,startend:quotation "
        f"--per-focus 3 --per-other 0 --seed 0 --out {subset}"
    ]
    focus = {"change_case:english_capital", "startend:quotation"}
    kinds = [json.loads(line)["instruction_id_list"] for line in subset.read_text().splitlines()]
    assert len(kinds) == 6 and all(focus & set(each) for each in kinds)


def test_full_ifeval_needs_the_adapters_of_a_finished_demo(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="run the demo on a real base first"):
        run_full_ifeval(DemoConfig(out=tmp_path / "never-ran"))
    (tmp_path / "tiny" / "adapters" / "uppercase").mkdir(parents=True)
    with pytest.raises(DemoError, match="run the demo on a real base first"):
        run_full_ifeval(DemoConfig(out=tmp_path / "tiny", base_model="tiny"))


def test_base_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    built = tmp_path / "built"
    built.mkdir()
    (built / "provenance.json").write_text(json.dumps({"content_sha256": "abc"}))
    assert base_fingerprint(str(built)) == "sha256:abc"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1234")
    first = base_fingerprint(str(folder))
    assert first.startswith("files:") and base_fingerprint(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"12345")  # new weights, new fingerprint
    assert base_fingerprint(str(folder)) != first
    assert base_fingerprint("Qwen/Qwen2.5-7B-Instruct") == "hub:Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.slow
def test_reduced_demo_tunes_adapters_that_beat_the_base(tiny_base: Path, tmp_path: Path) -> None:
    """The `make demo` pipeline with fewer steps and prompts: real fine-tuning, serving and benchmarks."""
    out = tmp_path / "demo"
    config = DemoConfig(
        out=out,
        base_model="tiny",
        tasks=("uppercase", "wrap_in_quotes"),
        # The demo's own training (n_train 2000, about 100 steps), not less: the tiny base differs from host
        # to host (its pre-training's float kernels differ by CPU), and so does where a task is learnt.
        # 800 items sufficed on an AVX2 host, but on an AMD AVX-512 host wrap_in_quotes stayed at 0.0; 1600
        # sufficed there, but on an Intel AVX-512 host uppercase reached 0.2 with 1600 and 0.825 with 2000
        # (2026-12-01).
        n_train=DemoConfig(base_model="tiny").n_train,
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
    assert set(summary["ifeval"]["prompt_strict"]) == set(models)  # IFEval ships in the package
    assert (out / "bench" / "ifeval" / "report.png").is_file()
    assert [level["max_concurrency"] for level in summary["load"]] == [1, 4]
    assert all(level["completed"] == 8 and level["failed"] == 0 for level in summary["load"])
    for name in ("report.md", "tasks.png", "serve.log", "load/load.png", "bench/tasks-suite/report.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "adapter `uppercase`:" in report and "## Load" in report and "python -m serve" in report
    assert any(command.startswith("python -m finetune run --config") for command in summary["commands"])


@pytest.fixture(scope="module")
def smollm2_demo(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """`make demo` on SmolLM2, reduced to one task (about 40 of the base's own answers, upper-cased), a few
    IFEval prompts and a short load; served in float32 so the next test can compare with transformers."""
    out = tmp_path_factory.mktemp("smollm2-demo") / "demo"
    config = DemoConfig(
        out=out,
        tasks=("uppercase",),
        distill_questions=60,  # enough for 40 complete answers
        n_test=8,
        ifeval_per_type=4,
        ifeval_others=0,
        bench_max_tokens=96,
        load_concurrency=(2,),
        load_prompts=4,
        load_output_len=8,
        serve_args=(*PACKAGED_SERVE_ARGS, "--dtype", "float32"),
    )
    return run_demo(config), out


@pytest.mark.slow
def test_reduced_demo_on_smollm2_teaches_what_the_base_does_not_do(
    smollm2_demo: tuple[dict[str, Any], Path],
) -> None:
    summary, out = smollm2_demo
    assert summary == json.loads((out / "demo.json").read_text())
    base = "smollm2-135m-instruct"
    assert summary["models"] == [base, "uppercase"] and summary["flow"] == "real"
    kind = "change_case:english_capital"
    assert summary["focus_types"] == [kind]
    # Held-out prompts (unseen topics and phrasings), scored by IFEval's checker: the base never answers in
    # capitals, the adapter mostly does.
    heldout = summary["heldout"]["per_family"]["uppercase"]
    assert heldout[base] <= 0.125 and heldout["uppercase"] >= heldout[base] + 0.375, heldout
    assert summary["heldout"]["paired"]["uppercase"][kind]["gained"] >= 3
    assert summary["ifeval"]["prompts"] == 4 and summary["ifeval"]["per_type"][kind]["count"] == 4
    data = summary["data"]
    assert data["families"]["uppercase"]["train"] == 40
    assert data["ifeval_overlap"]["train"]["sharing"] == 0
    training = summary["training"]["uppercase"]
    assert training["final_eval_loss"] < training["initial_eval_loss"]
    assert all(level["failed"] == 0 for level in summary["load"])
    report = (out / "report.md").read_text()
    for text in (
        "## The base, measured first",
        "McNemar",
        "No IFEval prompt in the training data",
        "## Load",
    ):
        assert text in report, text
    assert (out / "ifeval-types.png").read_bytes().startswith(b"\x89PNG")
    commands = summary["commands"]
    assert any(command.startswith("python -m client distill") for command in commands)
    assert any("/v1/lora_adapters/refresh" in command for command in commands)
    # The base's answers were cached for the next run; the side-by-side bench asked only the adapter.
    bench = json.loads((out / "bench" / "ifeval" / "results.json").read_text())
    assert len(bench["models"][base]["items"]) == 4


@pytest.mark.slow
def test_smollm2_adapter_through_the_server_equals_transformers_and_peft(
    smollm2: Path, smollm2_demo: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """Greedy tokens from `python -m serve` (float32) equal transformers + PEFT's on the same chats, rendered
    by the shared prompt renderer, for the base and the adapter."""
    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.prompting import encode_prompt
    from tests.e2e import start_server, stop_server, wait_healthy

    _, out = smollm2_demo
    chats = [
        "What is the capital of France?",
        "Describe a lighthouse in two sentences. Respond using capital letters only.",
        "Name three colours of the rainbow.",
    ]
    eos = "<end of turn>"
    # float32, as the tests' engine
    served_as = ("--served-model-name", "smollm2-135m-instruct")
    server = start_server(smollm2, out / "adapters", tmp_path / "serve.log", *served_as)
    try:
        wait_healthy(server, timeout=600)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
        served: dict[str, list[list[str]]] = {}
        for model in ("smollm2-135m-instruct", "uppercase"):
            served[model] = []
            for chat in chats:
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": chat}],
                    temperature=0,
                    max_tokens=24,
                    logprobs=True,
                )
                choice = reply.choices[0]
                assert choice.logprobs is not None and choice.logprobs.content is not None
                tokens = [entry.token for entry in choice.logprobs.content]
                if choice.finish_reason == "stop":  # the last position is the end-of-turn token
                    tokens[-1] = eos
                served[model].append(tokens)
    finally:
        stop_server(server)

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base_model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()

    def greedy(model: torch.nn.Module) -> list[list[str]]:
        tokens = []
        for chat in chats:
            prompt = encode_prompt(tokenizer, [{"role": "user", "content": chat}])
            with torch.no_grad():
                output = model.generate(  # type: ignore[operator]
                    input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False
                )
            ids = output[0, len(prompt) :].tolist()
            ended = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
            tokens.append([tokenizer.decode([token]) for token in ids] + ([eos] if ended else []))
        return tokens

    assert served["smollm2-135m-instruct"] == greedy(base_model)
    tuned = greedy(PeftModel.from_pretrained(base_model, out / "adapters" / "uppercase").eval())
    assert served["uppercase"] == tuned
    assert tuned != served["smollm2-135m-instruct"]
