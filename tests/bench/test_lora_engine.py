"""bench.lora_engine, bench.lora_scaling's engine-only side, on the real offline engine with the tiny base."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.lora_engine import lora_names, random_prompts, serve_settings
from bench.lora_scaling import engine_table, measure_engine_only
from bench.servers import EngineSpec


def spec_for(tiny_base: Path, adapters_dir: Path) -> EngineSpec:
    serve_args = ["--base-model", str(tiny_base), "--host", "127.0.0.1", "--port", "1"]
    for name in ("fmt", "caps"):
        serve_args += ["--lora", f"{name}={adapters_dir / name}"]
    serve_args += [
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
    ]
    serve_args += ["--kv-cache-memory-bytes", str(128 << 20), "--enforce-eager"]
    return EngineSpec(
        serve_args=serve_args, mixes=[0, 2], rounds=2, num_prompts=4, concurrency=2, input_len=8, output_len=5
    )


def test_spec_round_trip_prompts_and_lora_flags(tiny_base: Path, adapters_dir: Path) -> None:
    spec = spec_for(tiny_base, adapters_dir)
    assert EngineSpec.from_json(spec.to_json()) == spec
    assert lora_names(serve_settings(spec.serve_args)) == [
        ("fmt", str(adapters_dir / "fmt")),
        ("caps", str(adapters_dir / "caps")),
    ]
    prompts = random_prompts(3, 8, 512, seed=0)
    assert prompts == random_prompts(3, 8, 512, seed=0) != random_prompts(3, 8, 512, seed=1)
    assert all(len(p) == 8 and all(10 <= t < 512 for t in p) for p in prompts)


def test_engine_only_measures_every_mix_in_every_round(
    tiny_base: Path, adapters_dir: Path, tmp_path: Path
) -> None:
    spec = spec_for(tiny_base, adapters_dir)
    result = measure_engine_only(spec, tmp_path / "ok")
    assert set(result["rows"]) == {"0", "2"}
    for row in result["rows"].values():
        # every prompt ran to exactly output_len tokens (ignore_eos), in each of the two rounds
        assert row["output_tokens"] == [spec.num_prompts * spec.output_len] * spec.rounds
        assert row["peak_in_flight"] == spec.concurrency  # a closed loop: never all 4 prompts at once
        assert len(row["rounds"]) == 2 and all(value > 0 for value in row["rounds"])
        assert row["output_throughput"] == pytest.approx(sum(row["rounds"]) / 2)
    assert result["relative"]["0"]["output_throughput"] == 1.0
    assert result["relative"]["2"]["output_throughput"] == pytest.approx(
        result["rows"]["2"]["output_throughput"] / result["rows"]["0"]["output_throughput"]
    )
    run = {
        "label": "rank 16",
        "relative": {"0": {"output_throughput": 1.0}, "2": {"output_throughput": 0.9}},
        "engine_only": result,
    }
    lines = engine_table([run])
    assert (
        len(lines) == 4
        and lines[-1].startswith("| `rank 16` | 2 adapters |")
        and lines[-1].endswith("| 0.90 |")
    )


def test_a_mix_larger_than_the_adapters_served_is_refused(
    tiny_base: Path, adapters_dir: Path, tmp_path: Path
) -> None:
    spec = replace(spec_for(tiny_base, adapters_dir), mixes=[0, 3])
    with pytest.raises(RuntimeError, match="a mix of 3 adapters, but the server flags name only 2"):
        measure_engine_only(spec, tmp_path)
