"""The logic of bench.batch_invariance that needs no server: where answers diverge, the margins, the table."""

from __future__ import annotations

from typing import Any

from bench.batch_invariance import (
    Plan,
    answer_of,
    first_divergence,
    logprob_drift,
    probes,
    section_markdown,
    summarize,
)


def _answer(tokens: list[str], logprobs: list[float], margins: list[float]) -> dict[str, Any]:
    return {
        "text": "".join(tokens),
        "finish_reason": "stop",
        "tokens": tokens,
        "logprobs": logprobs,
        "top2": [[lp, lp - m] for lp, m in zip(logprobs, margins, strict=True)],
    }


REFERENCE = _answer(["IT", " IS", " SAY"], [-0.1, -0.2, -0.69], [2.0, 1.5, 0.01])


def test_answer_of_reads_tokens_logprobs_and_the_top_two() -> None:
    entry = {"token": "A", "logprob": -0.5, "top_logprobs": [{"logprob": -2.0}, {"logprob": -0.5}]}
    reply = {
        "choices": [
            {"message": {"content": "A"}, "finish_reason": "length", "logprobs": {"content": [entry]}}
        ]
    }
    assert answer_of(reply) == {
        "text": "A",
        "finish_reason": "length",
        "tokens": ["A"],
        "logprobs": [-0.5],
        "top2": [[-0.5, -2.0]],
    }


def test_first_divergence_gives_the_index_tokens_and_both_margins() -> None:
    assert first_divergence(REFERENCE, REFERENCE) is None
    flipped = _answer(["IT", " IS", " say"], [-0.1, -0.2, -0.68], [2.0, 1.5, 0.02])
    found = first_divergence(REFERENCE, flipped)
    assert found is not None
    assert (found["index"], found["reference_token"], found["token"]) == (2, " SAY", " say")
    assert abs(found["reference_margin"] - 0.01) < 1e-9 and abs(found["margin"] - 0.02) < 1e-9
    shorter = _answer(["IT", " IS"], [-0.1, -0.2], [2.0, 1.5])
    found = first_divergence(REFERENCE, shorter)
    assert found is not None and found["index"] == 2 and found["token"] is None


def test_drift_is_measured_before_the_first_divergence_only() -> None:
    drifted = _answer(["IT", " IS", " say"], [-0.1, -0.25, -9.0], [2.0, 1.5, 0.02])
    assert abs(logprob_drift(REFERENCE, drifted) - 0.05) < 1e-9
    assert logprob_drift(REFERENCE, REFERENCE) == 0.0


def test_summarize_counts_per_model_and_takes_margins_from_the_reference() -> None:
    flipped = _answer(["IT", " IS", " say"], [-0.1, -0.2, -0.68], [2.0, 1.5, 0.02])
    references = {"caps/0": REFERENCE, "base/0": REFERENCE}
    summary = summarize(references, [("caps/0", flipped), ("caps/0", REFERENCE), ("base/0", REFERENCE)])
    assert summary["requests"] == 3 and summary["divergent"] == 1
    assert summary["per_model"] == {
        "caps": {"requests": 2, "divergent": 1},
        "base": {"requests": 1, "divergent": 0},
    }
    assert summary["bit_identical_logprobs"] == 3  # the flipped answer's logprobs agree up to its divergence
    assert summary["min_margin"] == summary["median_margin"]
    assert abs(summary["min_margin"] - 0.01) < 1e-9


def test_probes_are_fixed() -> None:
    plan = Plan(adapter_probes=3, base_probes=2)
    first, second = probes(plan), probes(plan)
    assert first == second
    assert [p.key for p in first] == ["caps/0", "caps/1", "caps/2", "base/0", "base/1"]


def test_section_has_a_row_per_condition_and_says_when_a_server_did_not_start() -> None:
    summary = summarize({"caps/0": REFERENCE}, [("caps/0", REFERENCE)])
    document = {
        "plan": {**Plan().__dict__, "concurrency": [8, 32]},
        "adapters": {"caps": "x", "fmt": "y", "words": "z"},
        "kernels": {
            "float32": {
                "linear_rows_differing": {"768x256": 0},
                "lora_max_abs_diff_vs_alone": {"plugin": {"decode, 4 adapters": 0.0}},
            }
        },
        "servers": {
            "ours/float32": {"conditions": {"solo (reference)": summary}},
            "vllm-batch-invariant/float32": {
                "error": "Traceback\nTypeError: 'function' object is not subscriptable"
            },
        },
    }
    header = {
        "command": "python -m bench.batch_invariance",
        "date": "2026-12-02",
        "machine": {
            "cpus": 2,
            "processor": "x86_64",
            "gpu": None,
            "platform": "Linux",
            "torch": "t",
            "vllm": "v",
            "tuneserve": "0",
        },
    }
    text = section_markdown(header, document)
    assert "| float32 | ours (plugin) | solo (reference) | 1 | 0 (0 / 0) | 1 | 0 | – / – |" in text
    assert "did not run: `TypeError: 'function' object is not subscriptable`" in text
    assert "No probe answer diverged" in text


def test_merge_keeps_every_runs_servers_the_later_winning() -> None:
    from bench.batch_invariance import merge

    run = {"caps/0": REFERENCE}
    first = {
        "header": {"command": "a", "date": "1"},
        "plan": {"repeats": 6},
        "kernels": {"k": 1},
        "servers": {"ours/bfloat16": {"references": run, "conditions": {}}, "vllm/bfloat16": {"error": "x"}},
    }
    second = {
        "header": {"command": "b", "date": "2"},
        "plan": {"repeats": 6},
        "kernels": {"k": 2},
        "servers": {"vllm/bfloat16": {"references": run, "conditions": {}}},
    }
    merged = merge([first, second])
    assert list(merged["servers"]) == ["ours/bfloat16", "vllm/bfloat16"]
    assert "error" not in merged["servers"]["vllm/bfloat16"] and merged["kernels"] == {"k": 2}
    assert [r["header"]["command"] for r in merged["runs"]] == ["a", "b"]
    assert merged["cross_server"]["ours/bfloat16"]["divergent"] == 0
