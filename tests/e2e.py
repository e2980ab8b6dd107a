"""End-to-end fixtures: three adapters made by `finetune`, two bad ones, the real server on a free port.

Registered once in tests/conftest.py, so serve and client tests share one server per session.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetune.cli import main as finetune_main
from pipeline.launch import ServerProcess, free_port
from tests.finetune.conftest import REPO_ROOT, overrides

# Adapter name -> task families it is tuned on (different data, so different outputs).
ADAPTERS = {
    "fmt": ["json_object", "wrap_in_quotes"],
    "caps": ["uppercase", "bullet_list"],
    "words": ["end_with_phrase", "start_with_word"],
}
# Served from adapters/elsewhere: fmt's weights re-saved by plain PEFT, as TRL or Axolotl leave an adapter
# trained on another machine (no finetune manifest, another base's name): served, with a warning.
ELSEWHERE = "elsewhere"
ELSEWHERE_DECLARES = "Qwen/Qwen2.5-7B-Instruct"
API_KEY = "test-key"
ADMIN_KEY = "admin-key"
ENGINE_ARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 512,
    "kv_cache_memory_bytes": 256 << 20,
    "max_lora_rank": 16,
    "max_loras": 2,  # fewer slots than adapters: the engine must swap them
    "seed": 0,
}
QUESTIONS = [
    'Describe the lantern as a JSON object with the keys "name" and "color". Output only the JSON.',
    'Give 3 bullet points about the harbor. Start each line with "- ".',
    'Begin your answer with "Well" and then say something about the meadow.',
]


def engine_flags() -> list[str]:
    """ENGINE_ARGS as the server's command-line flags."""
    flags: list[str] = []
    for key, value in ENGINE_ARGS.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def train_adapter(tiny_base: Path, families: list[str], data_dir: Path, out: Path) -> Path:
    from client.tasks import write_task_data

    data = write_task_data(data_dir, families, n_train=160, n_test=8, seed=0)["train"]
    assert (
        finetune_main(
            ["run", *overrides(tiny_base, data, out, "training.max_steps=25", "training.eval_every=25")]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def adapters_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapters/{fmt,caps,words}: real adapters; adapters/elsewhere: fmt as another trainer saves it (served);
    adapters/{too_big_rank,other_base,nan_weights}: refused."""
    root = tmp_path_factory.mktemp("serve")
    adapters = root / "adapters"
    for name, families in ADAPTERS.items():
        train_adapter(tiny_base, families, root / "data" / name, adapters / name)
    too_big = adapters / "too_big_rank"
    shutil.copytree(adapters / "fmt", too_big)
    config = json.loads((too_big / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    save_with_peft(tiny_base, adapters / "fmt", adapters / ELSEWHERE, ELSEWHERE_DECLARES)
    save_with_peft(tiny_base, None, adapters / "other_base", "org/other-7b", hidden_size=512)
    # A diverged run's adapter: served, it corrupted the answers of other requests batched with it.
    nan_weights = adapters / "nan_weights"
    shutil.copytree(adapters / "fmt", nan_weights)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(nan_weights / "adapter_model.safetensors"))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(nan_weights / "adapter_model.safetensors"))
    # A spare adapter outside the served dir, copied in at runtime by the load/unload tests.
    shutil.copytree(adapters / "caps", root / "spare")
    return adapters


def save_with_peft(
    tiny_base: Path, trained: Path | None, out: Path, declared: str, **base_changes: object
) -> Path:
    """`PeftModel.save_pretrained` (what TRL's SFTTrainer and Axolotl call) of `trained`'s weights, or of
    a fresh rank-8 LoRA, on the tiny base with `base_changes` to its config, declaring `declared`."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    config = transformers.AutoConfig.from_pretrained(tiny_base)
    if base_changes:
        for key, value in base_changes.items():
            setattr(config, key, value)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
    if trained is not None:
        peft_model = PeftModel.from_pretrained(model, trained)
    else:
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = declared
    # save_embedding_layers=False: PEFT would otherwise look the declared base up on the hub (offline here).
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


@dataclass
class Reference:
    """Greedy outputs straight from vLLM's offline engine: prompt ids, then text per model (None = base)."""

    prompts: list[list[int]]
    texts: dict[str | None, list[str]]


@pytest.fixture(scope="session")
def engine_reference(tiny_base: Path, adapters_dir: Path, tiny_tokenizer) -> Reference:  # type: ignore[no-untyped-def]
    import vllm
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from finetune.prompting import encode_prompt

    prompts = [encode_prompt(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    llm = vllm.LLM(model=str(tiny_base), enable_lora=True, **ENGINE_ARGS)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=24)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        texts: dict[str | None, list[str]] = {None: [r.outputs[0].text for r in llm.generate(inputs, params)]}
        for index, name in enumerate(ADAPTERS, start=1):
            request = LoRARequest(name, index, str(adapters_dir / name))
            texts[name] = [r.outputs[0].text for r in llm.generate(inputs, params, lora_request=request)]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return Reference(prompts=prompts, texts=texts)


@dataclass
class Server(ServerProcess):
    """Our server as the tests start it: the launcher, plus what it serves."""

    adapters_dir: Path = field(default_factory=Path)
    base_model: str = ""


def start_server(
    tiny_base: Path, adapters_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> Server:
    """Launch `python -m serve` on a free port (not yet ready: `wait_healthy`) with `env` added."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "serve",
        "--base-model",
        str(tiny_base),
        "--adapters-dir",
        str(adapters_dir),
    ]
    args += ["--host", "127.0.0.1", "--port", str(port), *engine_flags()]
    server = Server(
        name="serve",
        command=[*args, *extra],
        url=f"http://127.0.0.1:{port}",
        log_path=log,
        cwd=REPO_ROOT,
        adapters_dir=adapters_dir,
        base_model=str(tiny_base),
        env=env or {},
    )
    server.launch()
    return server


def wait_healthy(server: Server, timeout: float = 300) -> None:
    server.wait_ready(timeout)


def stop_server(server: Server) -> None:
    server.stop(grace_s=60)


@pytest.fixture(scope="session")
def server(
    tiny_base: Path, adapters_dir: Path, engine_reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # engine_reference runs first so the offline engine is gone before the server's starts.
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    running = start_server(tiny_base, adapters_dir, log, "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY)
    try:
        wait_healthy(running)
        yield running
    finally:
        stop_server(running)
