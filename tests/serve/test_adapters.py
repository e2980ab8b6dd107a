"""The adapter registry on real PEFT folders: discovery, refusals, base matching, ids, path confinement."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serve import adapters as adapters_module
from serve.adapters import Adapter, AdapterError, AdapterRegistry, parse_lora_option
from tuneserve.manifest import MANIFEST, folder_sha256

MakeAdapter = Callable[..., Path]


def llama_config(*, hidden: int, layers: int):  # type: ignore[no-untyped-def]
    """A small Llama config: heads of 32, one KV head per two query heads, a 128-token vocabulary."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        vocab_size=128,
        head_dim=32,
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-layer Llama saved as the base, and a rank-8 all-linear LoRA of it (base not recorded)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("models")
    model = transformers.LlamaForCausalLM(llama_config(hidden=64, layers=1))
    base = root / "tiny-base"
    model.save_pretrained(base)
    template = root / "adapter-template"
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).save_pretrained(str(template))
    return base, template


@pytest.fixture
def base(tiny_models: tuple[Path, Path]) -> Path:
    return tiny_models[0]


@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    return folder


@pytest.fixture
def make_adapter(tiny_models: tuple[Path, Path], adapters_dir: Path) -> MakeAdapter:
    """Copy the template adapter to adapters_dir/NAME (or to `at`), declaring `base`, with config edits."""
    base, template = tiny_models

    def make(
        name: str = "tuned", *, at: Path | None = None, declared: str | None = None, **edits: Any
    ) -> Path:
        path = at if at is not None else adapters_dir / name
        shutil.copytree(template, path)
        edit_config(path, base_model_name_or_path=str(base) if declared is None else declared, **edits)
        return path

    return make


@pytest.fixture
def registry(base: Path, adapters_dir: Path) -> AdapterRegistry:
    return AdapterRegistry(base_model=str(base), adapters_dir=adapters_dir, max_lora_rank=16)


def edit_config(path: Path, **edits: Any) -> None:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(edits)
    config_path.write_text(json.dumps(config))


def write_manifest(path: Path, base_record: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps({"base_model": base_record, "steps": 1}))


def refusal(call: Callable[[], object], status: int = 400) -> str:
    """The message of the AdapterError `call` raises, after checking its HTTP status."""
    with pytest.raises(AdapterError) as caught:
        call()
    assert caught.value.status == status, caught.value
    return str(caught.value)


# -- discovery -------------------------------------------------------------------------------------------


def test_discover_finds_finished_adapter_folders_not_yet_served(
    registry: AdapterRegistry, adapters_dir: Path, make_adapter: MakeAdapter
) -> None:
    for name in ["b-adapter", "a-adapter", "served", ".hidden", "run.partial", "export.tmp", "old.replaced"]:
        make_adapter(name)
    (adapters_dir / "no-config").mkdir()
    (adapters_dir / "no-config" / "adapter_model.safetensors").write_bytes(b"x")
    (adapters_dir / "notes.txt").write_text("not a folder")
    registry.register(registry.validate("served", adapters_dir / "served"))

    assert registry.discover() == [
        ("a-adapter", adapters_dir / "a-adapter"),
        ("b-adapter", adapters_dir / "b-adapter"),
    ]


def test_discover_without_adapters_dir_finds_nothing(base: Path) -> None:
    registry = AdapterRegistry(base_model=str(base), adapters_dir=None, max_lora_rank=16)
    assert registry.discover() == []


def test_adapters_dir_must_be_a_folder(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--adapters-dir"):
        AdapterRegistry(base_model=str(base), adapters_dir=tmp_path / "missing", max_lora_rank=16)


# -- a good adapter --------------------------------------------------------------------------------------


def test_validate_returns_the_adapter_and_its_vllm_request(
    registry: AdapterRegistry, make_adapter: MakeAdapter, base: Path
) -> None:
    path = make_adapter("tuned")
    adapter = registry.validate("tuned", path)

    assert adapter == Adapter(
        name="tuned",
        path=path,
        lora_int_id=1,
        rank=8,
        base_model=str(base),
        base_check="name",
        version="tuned@1",
    )
    assert len(registry) == 0, "validate registers nothing"
    pytest.importorskip("vllm")
    request = adapter.lora_request()
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("tuned", 1, str(path))


# -- refusals from the folder's contents -----------------------------------------------------------------


def test_rank_above_max_lora_rank_is_refused(
    base: Path, adapters_dir: Path, make_adapter: MakeAdapter
) -> None:
    registry = AdapterRegistry(base_model=str(base), adapters_dir=adapters_dir, max_lora_rank=1)
    message = refusal(lambda: registry.validate("tuned", make_adapter("tuned")))
    assert "rank 8" in message and "--max-lora-rank 1" in message


def test_weights_of_higher_rank_than_the_config_says_are_refused(
    base: Path, adapters_dir: Path, make_adapter: MakeAdapter
) -> None:
    # PEFT's rank_pattern gives some modules a rank above `r`; the weights tell the truth.
    registry = AdapterRegistry(base_model=str(base), adapters_dir=adapters_dir, max_lora_rank=1)
    path = make_adapter("tuned", r=1)
    message = refusal(lambda: registry.validate("tuned", path))
    assert "weights have rank 8" in message


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["score"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["model.embed_tokens"]}, "embed_tokens"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": 0}, "field 'r' must be a positive integer, not 0"),
    ],
)
def test_unservable_settings_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, edits: dict[str, Any], expected: str
) -> None:
    path = make_adapter("tuned", **edits)
    assert expected in refusal(lambda: registry.validate("tuned", path))


def test_missing_folder_and_missing_weights_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, adapters_dir: Path
) -> None:
    assert "not a folder" in refusal(lambda: registry.validate("ghost", adapters_dir / "ghost"))
    path = make_adapter("tuned")
    (path / "adapter_model.safetensors").unlink()
    assert "no weights file" in refusal(lambda: registry.validate("tuned", path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"garbage, not a safetensors file at all", "not a readable safetensors file"),
    ],
)
def test_corrupt_weights_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, content: bytes, expected: str
) -> None:
    path = make_adapter("tuned")
    (path / "adapter_model.safetensors").write_bytes(content)
    assert expected in refusal(lambda: registry.validate("tuned", path))


def test_weights_without_lora_pairs_are_refused(registry: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    import torch
    from safetensors.torch import save_file

    path = make_adapter("tuned")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, path / "adapter_model.safetensors")
    assert "no lora_A/lora_B" in refusal(lambda: registry.validate("tuned", path))


def edit_weights(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load the adapter's safetensors weights, let `edit` change the dict, save them back."""
    from safetensors.torch import load_file, save_file

    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, value: float
) -> None:
    # A diverged run's adapter: served, one request to it corrupted other models' answers in the same batch.
    path = make_adapter("tuned")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    edit_weights(path, lambda tensors: tensors[key].__setitem__((0, 0), value))
    message = refusal(lambda: registry.validate("tuned", path))
    assert "NaN or infinite values" in message and key in message and "diverged" in message


def test_non_finite_pytorch_weights_are_refused(registry: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    import torch
    from safetensors.torch import load_file

    path = make_adapter("tuned")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    assert registry.validate("tuned", path).rank == 8  # the same weights as a .bin are checked and served
    next(iter(tensors.values()))[0, 0] = float("nan")
    torch.save(tensors, path / "adapter_model.bin")
    assert "NaN or infinite" in refusal(lambda: registry.validate("tuned", path))


def test_adapter_of_another_architecture_is_refused_even_claiming_our_base(
    registry: AdapterRegistry, adapters_dir: Path
) -> None:
    # A real PEFT adapter of a wider, deeper Llama, declaring the served base: its shapes give it away.
    import transformers
    from peft import LoraConfig, get_peft_model

    path = adapters_dir / "foreign"
    lora = LoraConfig(r=8, target_modules="all-linear")
    model = get_peft_model(transformers.LlamaForCausalLM(llama_config(hidden=128, layers=2)), lora)
    model.save_pretrained(str(path))
    edit_config(path, base_model_name_or_path=registry.base_model)
    message = refusal(lambda: registry.validate("foreign", path))
    assert "features, but the base model's layer maps" in message and "made for another model" in message


def test_weights_for_a_layer_the_base_lacks_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter
) -> None:
    # vLLM would drop them silently and serve a different adapter from the one trained.
    path = make_adapter("tuned")
    prefix = "base_model.model.model.layers."

    def add_layer_5(tensors: dict[str, Any]) -> None:
        for key in [k for k in tensors if k.startswith(prefix + "0.self_attn.q_proj")]:
            tensors[key.replace(prefix + "0.", prefix + "5.")] = tensors[key].clone()

    edit_weights(path, add_layer_5)
    message = refusal(lambda: registry.validate("tuned", path))
    assert "'model.layers.5.self_attn.q_proj', which the base model has no linear layer" in message


def test_unpaired_or_mismatched_lora_matrices_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter
) -> None:
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    path = make_adapter("unpaired")
    edit_weights(path, lambda tensors: tensors.pop(key))
    assert "has lora_A but not its partner" in refusal(lambda: registry.validate("unpaired", path))

    import torch

    path = make_adapter("mismatched")
    edit_weights(path, lambda tensors: tensors.__setitem__(key, torch.zeros(tensors[key].shape[0], 4)))
    assert "they must be (r, in) and (out, r)" in refusal(lambda: registry.validate("mismatched", path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "cannot read adapter_config.json"),
        ("[]", "must hold a JSON object"),
        ('{"peft_type": "LORA", "r": null}', "field 'r' must be a positive integer, not None"),
    ],
)
def test_corrupt_config_is_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, content: str, expected: str
) -> None:
    path = make_adapter("tuned")
    (path / "adapter_config.json").write_text(content)
    assert expected in refusal(lambda: registry.validate("tuned", path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize(
    ("filename", "expected"),
    [("adapter_config.json", "cannot read"), ("adapter_model.safetensors", "cannot read")],
)
def test_unreadable_files_are_refused(
    registry: AdapterRegistry, make_adapter: MakeAdapter, filename: str, expected: str
) -> None:
    path = make_adapter("tuned")
    (path / filename).chmod(0)
    try:
        assert expected in refusal(lambda: registry.validate("tuned", path))
    finally:
        (path / filename).chmod(0o644)


# -- base model match ------------------------------------------------------------------------------------


def peft_save_elsewhere(base: Path, out: Path, declared: str, **lora: Any) -> Path:
    """An adapter as TRL's SFTTrainer or Axolotl leave it on another machine: the base loaded from its own
    path, `get_peft_model`, then `PeftModel.save_pretrained` (README.md, adapter_config.json naming that
    path, adapter_model.safetensors), with no finetune manifest. lora_B is made non-zero, as training does."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.name_or_path = declared  # what PEFT records as base_model_name_or_path
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    # save_embedding_layers=False: PEFT would otherwise look the declared base up on the hub (offline here);
    # the files are the same for an adapter of no embedding layer.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


@pytest.mark.parametrize(
    "declared", ["Qwen/Qwen2.5-7B-Instruct", "/home/someone/else/model", "meta-llama/Llama-3.2-1B-Instruct"]
)
def test_adapter_trained_elsewhere_that_fits_is_served_with_a_warning(
    registry: AdapterRegistry,
    adapters_dir: Path,
    base: Path,
    declared: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = peft_save_elsewhere(base, adapters_dir / "elsewhere", declared)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == declared
    assert not (path / MANIFEST).exists()
    with caplog.at_level(logging.WARNING, logger="serve.adapters"):
        adapter = registry.validate("elsewhere", path)
    assert (adapter.base_model, adapter.base_check, adapter.rank) == (declared, "shapes", 8)
    warning = caplog.text
    assert f"declares base model {declared!r}, not the served {str(base)!r}" in warning
    assert "fits a linear layer of that base by name and shape" in warning


def test_adapter_trained_elsewhere_whose_shapes_do_not_fit_is_refused_naming_the_module(
    registry: AdapterRegistry, adapters_dir: Path, tmp_path: Path
) -> None:
    # The same PEFT save made on a wider Llama: its first matrix (by module name) gives it away.
    import transformers

    other = tmp_path / "other-base"
    transformers.LlamaForCausalLM(llama_config(hidden=128, layers=1)).save_pretrained(other)
    path = peft_save_elsewhere(other, adapters_dir / "wider", "Qwen/Qwen2.5-7B-Instruct")
    message = refusal(lambda: registry.validate("wider", path))
    assert "model.layers.0.self_attn.k_proj maps 128 -> 64 features" in message
    assert "the base model's layer maps 64 -> 32" in message and "made for another model" in message
    declared = (
        f"it declares base model 'Qwen/Qwen2.5-7B-Instruct'; this server serves {registry.base_model!r}"
    )
    assert declared in message


def test_adapter_declaring_another_base_is_refused_when_the_bases_layers_are_unknown(
    adapters_dir: Path, make_adapter: MakeAdapter
) -> None:
    # An architecture transformers cannot build: the weights cannot be checked, so the name is all there is.
    import transformers

    registry = AdapterRegistry(
        base_model="org/custom-arch",
        adapters_dir=adapters_dir,
        max_lora_rank=16,
        base_config=transformers.PretrainedConfig(model_type="custom-arch"),
    )
    message = refusal(lambda: registry.validate("tuned", make_adapter("tuned", declared="other/model")))
    assert "trained on base model 'other/model', but this server serves 'org/custom-arch'" in message
    assert "whose linear layers cannot be listed" in message
    assert "set base_model_name_or_path in its adapter_config.json to 'org/custom-arch'" in message
    # The override it names: the same folder declaring the served base is served (weights unchecked).
    same = make_adapter("same", declared="org/custom-arch")
    assert registry.validate("same", same).base_check == "name"


def test_manifest_hash_of_another_base_is_refused_even_when_the_names_agree(
    registry: AdapterRegistry, make_adapter: MakeAdapter, base: Path
) -> None:
    path = make_adapter("tuned")
    write_manifest(path, {"source": "local", "name": str(base), "content_sha256": "0" * 64})
    message = refusal(lambda: registry.validate("tuned", path))
    assert "different models" in message and str(base) in message


def test_manifest_hash_of_the_served_base_is_accepted_under_another_name(
    registry: AdapterRegistry, make_adapter: MakeAdapter, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counting_sha256(folder: Path) -> str:
        calls.append(folder)
        return folder_sha256(folder)

    monkeypatch.setattr(adapters_module, "folder_sha256", counting_sha256)
    record = {"source": "local", "name": "/old-box/models/llama", "content_sha256": folder_sha256(base)}
    for name in ["first", "second"]:
        path = make_adapter(name, declared="/old-box/models/llama")
        write_manifest(path, record)
        adapter = registry.validate(name, path)
        assert (adapter.base_model, adapter.base_check) == ("/old-box/models/llama", "content_sha256")
    assert calls == [base], "the served base is hashed once per registry"


def test_hub_manifest_falls_back_to_the_weights(registry: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    # A manifest of a hub base records no content hash to compare with a local folder.
    path = make_adapter("tuned", declared="org/other-model")
    write_manifest(path, {"source": "hub", "name": "org/other-model", "commit": "abc"})
    assert registry.validate("tuned", path).base_check == "shapes"


def test_unreadable_manifest_falls_back_to_the_declared_name(
    registry: AdapterRegistry, make_adapter: MakeAdapter
) -> None:
    path = make_adapter("tuned")
    (path / MANIFEST).write_text("{truncated")
    assert registry.validate("tuned", path).rank == 8


@pytest.mark.parametrize(
    ("served", "declared", "matches"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", True),
        ("/models/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", True),
        ("/models/qwen2.5-7b-instruct/", "Qwen/Qwen2.5-7B-Instruct", True),
        ("Qwen/Qwen2.5-7B-Instruct", "/data/hf/Qwen2.5-7B-Instruct", True),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B", False),
        ("/models/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", False),
        ("Qwen/Qwen2.5-7B-Instruct", "other-org/Qwen2.5-7B-Instruct", False),
        ("/models/Qwen2.5-7B-Instruct", "/elsewhere/Qwen2.5-7B-Instruct", False),
    ],
)
def test_base_names_match_by_string_or_hub_id_last_part_else_the_shapes_decide(
    adapters_dir: Path, make_adapter: MakeAdapter, served: str, declared: str, matches: bool
) -> None:
    # The server gives the registry its engine's config of the base; without it, a hub id's config would be
    # fetched from the hub (retried for 23 s offline) to check the weights' shapes. A name that does not
    # match is served all the same (the weights fit), only the check it passed differs.
    registry = AdapterRegistry(
        base_model=served,
        adapters_dir=adapters_dir,
        max_lora_rank=16,
        base_config=llama_config(hidden=64, layers=1),
    )
    path = make_adapter("tuned", declared=declared)
    adapter = registry.validate("tuned", path)
    assert (adapter.base_model, adapter.base_check) == (declared, "name" if matches else "shapes")


def test_base_named_by_another_path_to_the_same_folder_matches(
    registry: AdapterRegistry, make_adapter: MakeAdapter, base: Path, tmp_path: Path
) -> None:
    link = tmp_path / "base-link"
    link.symlink_to(base)
    assert registry.validate("tuned", make_adapter("tuned", declared=str(link))).base_model == str(link)


def test_adapter_declaring_no_base_is_served_with_a_warning(
    registry: AdapterRegistry, make_adapter: MakeAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_adapter("tuned", declared="")
    with caplog.at_level(logging.WARNING, logger="serve.adapters"):
        assert registry.validate("tuned", path).base_check == "undeclared"
    assert (
        "does not say which base model" in caplog.text and "its weights fit the base's layers" in caplog.text
    )


# -- names and ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, ".", "..", "naïve", "a:b"])
def test_bad_names_are_refused(registry: AdapterRegistry, make_adapter: MakeAdapter, name: str) -> None:
    path = make_adapter("tuned")
    assert "is not allowed" in refusal(lambda: registry.validate(name, path))


@pytest.mark.parametrize("name", ["x" * 64, "sql-v1.2_final", "A"])
def test_good_names_are_accepted(registry: AdapterRegistry, make_adapter: MakeAdapter, name: str) -> None:
    assert registry.validate(name, make_adapter("tuned")).name == name


def test_name_of_the_served_base_is_refused(adapters_dir: Path, make_adapter: MakeAdapter) -> None:
    registry = AdapterRegistry(
        base_model="tiny-base", adapters_dir=adapters_dir, max_lora_rank=16, served_name="tiny"
    )
    path = make_adapter("tuned", declared="tiny-base")
    for name in ("tiny", "tiny-base"):  # the API id (--served-model-name) and the base's own name
        assert "served base model's name" in refusal(lambda n=name: registry.validate(n, path), status=409)


def test_duplicate_name_is_a_conflict(registry: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    first = registry.validate("tuned", make_adapter("tuned"))
    second = registry.validate("tuned", make_adapter("other"))
    registry.register(first)

    assert "already loaded" in refusal(lambda: registry.register(second), status=409)
    assert "already loaded" in refusal(lambda: registry.validate("tuned", make_adapter("third")), status=409)
    assert registry.get("tuned") == first


def test_remove_unknown_name_is_not_found(registry: AdapterRegistry) -> None:
    assert "no adapter named 'ghost'" in refusal(lambda: registry.remove("ghost"), status=404)


def test_ids_increase_and_are_never_reused(registry: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    a = registry.validate("a", make_adapter("a"))
    registry.register(a)
    b = registry.validate("b", make_adapter("b"))
    registry.register(b)
    assert (a.lora_int_id, b.lora_int_id) == (1, 2)
    assert registry.names() == ["a", "b"] and list(registry) == [a, b] and len(registry) == 2

    assert registry.remove("a") == a
    assert registry.get("a") is None and registry.names() == ["b"]
    again = registry.validate("a", a.path)
    assert again.lora_int_id == 3
    with pytest.raises(ValueError, match="was used before"):
        registry.register(a)
    registry.register(again)
    assert registry.names() == ["a", "b"] and registry.get("a") == again


# -- runtime paths ---------------------------------------------------------------------------------------


def test_runtime_path_defaults_to_the_name_inside_adapters_dir(
    registry: AdapterRegistry, adapters_dir: Path
) -> None:
    (adapters_dir / "tuned").mkdir()
    assert registry.resolve_runtime_path(None, "tuned") == adapters_dir.resolve() / "tuned"
    assert registry.resolve_runtime_path("", "tuned") == adapters_dir.resolve() / "tuned"
    assert "is not allowed" in refusal(lambda: registry.resolve_runtime_path(None, ".."))


def test_runtime_path_that_does_not_exist_is_a_404(registry: AdapterRegistry) -> None:
    # Not there is not found, as for a model name; a folder that is there but broken stays a 400.
    with pytest.raises(AdapterError) as refused:
        registry.resolve_runtime_path("ghost", "ghost")
    assert refused.value.status == 404 and "no adapter 'ghost'" in str(refused.value)


def test_runtime_path_relative_and_absolute_inside_are_allowed(
    registry: AdapterRegistry, adapters_dir: Path
) -> None:
    inside = adapters_dir.resolve() / "team" / "sql"
    inside.mkdir(parents=True)
    assert registry.resolve_runtime_path("team/sql", "sql") == inside
    assert registry.resolve_runtime_path(str(adapters_dir / "team" / "sql"), "sql") == inside


@pytest.mark.parametrize("raw", ["../outside", "team/../../outside", "team/../sql"])
def test_runtime_path_with_dotdot_is_refused(registry: AdapterRegistry, raw: str) -> None:
    assert "'..'" in refusal(lambda: registry.resolve_runtime_path(raw, "sql"), 403)


@pytest.mark.parametrize("where", ["sibling", "root", "adapters_dir itself", "dot"])
def test_runtime_path_outside_adapters_dir_is_refused(
    registry: AdapterRegistry, adapters_dir: Path, tmp_path: Path, where: str
) -> None:
    raw = {"sibling": str(tmp_path / "elsewhere"), "root": "/etc", "adapters_dir itself": str(adapters_dir)}
    message = refusal(lambda: registry.resolve_runtime_path(raw.get(where, "."), "sql"), 403)
    assert "must be inside the adapters dir" in message


def test_runtime_path_symlink_escaping_is_refused_and_inside_is_followed(
    registry: AdapterRegistry, adapters_dir: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    outside = make_adapter(at=tmp_path / "outside-adapter")
    (adapters_dir / "escape").symlink_to(outside)
    message = refusal(lambda: registry.resolve_runtime_path("escape", "escape"), 403)
    assert "must be inside the adapters dir" in message
    assert "must be inside" in refusal(lambda: registry.resolve_runtime_path(None, "escape"), 403)

    real = make_adapter("real")
    (adapters_dir / "alias").symlink_to(real)
    resolved = registry.resolve_runtime_path("alias", "alias")
    assert resolved == real.resolve()
    assert registry.validate("alias", resolved).path == resolved


def test_runtime_path_through_a_symlinked_adapters_dir(
    base: Path, adapters_dir: Path, tmp_path: Path
) -> None:
    link = tmp_path / "adapters-link"
    link.symlink_to(adapters_dir)
    registry = AdapterRegistry(base_model=str(base), adapters_dir=link, max_lora_rank=16)
    (adapters_dir / "sql").mkdir()
    assert registry.resolve_runtime_path(str(adapters_dir / "sql"), "sql") == adapters_dir.resolve() / "sql"
    assert registry.resolve_runtime_path(str(link / "sql"), "sql") == adapters_dir.resolve() / "sql"


def test_runtime_path_with_a_null_byte_is_refused(registry: AdapterRegistry) -> None:
    assert "not a usable path" in refusal(lambda: registry.resolve_runtime_path("bad\0name", "sql"))


def test_runtime_loading_needs_an_adapters_dir(base: Path) -> None:
    registry = AdapterRegistry(base_model=str(base), adapters_dir=None, max_lora_rank=16)
    assert "--adapters-dir" in refusal(lambda: registry.resolve_runtime_path("sql", "sql"))
    assert "--adapters-dir" in refusal(lambda: registry.resolve_runtime_path(None, "sql"))


# -- --lora NAME=PATH ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sql=/adapters/sql", ("sql", Path("/adapters/sql"))),
        ("sql=relative/dir", ("sql", Path("relative/dir"))),
        ("odd=path=with=equals", ("odd", Path("path=with=equals"))),
        ("home=~/adapters/x", ("home", Path("~/adapters/x").expanduser())),
    ],
)
def test_parse_lora_option(value: str, expected: tuple[str, Path]) -> None:
    assert parse_lora_option(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/adapters/sql", "NAME=PATH"),
        ("=/adapters/sql", "NAME=PATH"),
        ("sql=", "NAME=PATH"),
        ("bad name=/adapters/x", "is not allowed"),
    ],
)
def test_parse_lora_option_refuses_malformed_values(value: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_lora_option(value)


# -- unloading while requests run ------------------------------------------------------------------------


class RecordingEngine:
    """Only what an unload touches: the ids vLLM was asked to remove."""

    errored = False

    def __init__(self) -> None:
        self.removed: list[int] = []

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


def test_unload_waits_for_running_requests_and_routes_no_new_ones(
    registry: AdapterRegistry, make_adapter: MakeAdapter
) -> None:
    # vLLM removes an adapter its running requests still use, and its worker then dies on their next step
    # (KeyError in convert_mapping: the engine is gone for good), so the engine may only hear of the unload
    # once those requests have ended.
    from serve.models import ServedModels
    from serve.protocol import OpenAIError

    engine = RecordingEngine()
    models = ServedModels(
        engine=engine,  # type: ignore[arg-type]
        registry=registry,
        model_id="base",
        max_model_len=64,
        unload_timeout_s=0.5,
    )
    a, b = (registry.validate(name, make_adapter(name)) for name in ("a", "b"))
    registry.register(a)
    registry.register(b)

    async def scenario() -> None:
        models.request_started(a.lora_request(), "a")
        models.request_started(a.lora_request(), "a")
        unload = asyncio.create_task(models.remove_adapter("a"))
        await asyncio.sleep(0.05)
        assert not unload.done() and engine.removed == []
        assert registry.get("a") is None  # new requests get 404 ...
        with pytest.raises(OpenAIError, match="was unloaded"):  # ... as does one resolved just before
            models.request_started(a.lora_request(), "a")
        assert "being unloaded" in refusal(lambda: registry.validate("a", a.path), status=409)
        assert "already being unloaded" in refusal(lambda: registry.begin_removal("a"), status=409)
        models.request_finished(a.lora_request())
        await asyncio.sleep(0.05)
        assert not unload.done()
        models.request_finished(a.lora_request())
        assert await unload == a
        assert engine.removed == [a.lora_int_id]

        # Requests that outlast the timeout: the unload fails and the adapter stays served.
        models.request_started(b.lora_request(), "b")
        with pytest.raises(AdapterError, match="still has 1 requests running after 0 s; it stays") as late:
            await models.remove_adapter("b")
        assert late.value.status == 409
        assert registry.get("b") == b and engine.removed == [a.lora_int_id]
        models.request_finished(b.lora_request())
        assert await models.remove_adapter("b") == b  # nothing running: at once
        assert engine.removed == [a.lora_int_id, b.lora_int_id]

    asyncio.run(scenario())
    assert registry.names() == [] and registry.validate("a", a.path).lora_int_id > b.lora_int_id
