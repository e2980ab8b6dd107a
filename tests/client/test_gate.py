"""The regression gate: each kind of rule on bench results made to pass and to fail it, Holm within a rule,
and the gate's errors, through `client gate` and `client bench --gate`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from client.__main__ import main
from client.gate import GateError, load_gate, run_gate
from client.report import write_report
from client.suite import SuiteResult
from client.suites import IFEvalSuite, TasksSuite
from client.tasks import TaskItem, generate
from tuneserve.ifeval.evaluation import load_items

TASKS = generate(["uppercase", "lowercase"], 24, "test", seed=0)  # 12 of each, interleaved


def _tasks_result(passes: Callable[[int, TaskItem], bool]) -> SuiteResult:
    """Replies that pass an item's checks (its reference) where `passes(index, item)`, else fail them."""
    responses = {item.id: [item.reference if passes(i, item) else "No."] for i, item in enumerate(TASKS)}
    return TasksSuite(TASKS).score(responses)


def _results(tmp_path: Path, **models: SuiteResult) -> Path:
    return write_report(tmp_path / "run", {"suite": next(iter(models.values())).suite}, models)["results"]


def _gate(tmp_path: Path, *rules: dict[str, object], baseline: str | None = None) -> Path:
    path = tmp_path / "gate.yaml"
    tree: dict[str, object] = {"rules": list(rules)}
    if baseline is not None:
        tree["baseline"] = baseline
    path.write_text(yaml.safe_dump(tree))
    return path


def _judge(tmp_path: Path, results: Path, *rules: dict[str, object]) -> dict[str, object]:
    run_gate(_gate(tmp_path, *rules), results)
    return json.loads(results.with_name("gate.json").read_text())


def test_a_required_gain_in_one_family(tmp_path: Path) -> None:
    base = _tasks_result(lambda i, item: False)
    tuned = _tasks_result(lambda i, item: item.family == "uppercase")  # 12 of 12
    barely = _tasks_result(lambda i, item: item.family == "uppercase" and i < 2)  # 1 of 12: +0.083
    results = _results(tmp_path, base=base, tuned=tuned, barely=barely)
    rule = {"metric": "accuracy", "group": "uppercase", "min_change": 0.10}
    report = _judge(tmp_path, results, rule)
    assert report["passed"] is False
    checks = {check["model"]: check for check in report["rules"][0]["checks"]}  # type: ignore[index]
    assert checks["tuned"]["passed"] and checks["tuned"]["difference"] == pytest.approx(1.0)
    assert not checks["barely"]["passed"] and checks["barely"]["difference"] == pytest.approx(1 / 12)
    assert _judge(tmp_path, results, {**rule, "models": ["tuned"]})["passed"] is True


def test_a_significant_drop_fails_and_a_small_one_does_not(tmp_path: Path) -> None:
    base = _tasks_result(lambda i, item: True)
    broken = _tasks_result(lambda i, item: i % 2 == 0)  # loses 12 of 24: exact McNemar p = 2 * 0.5**12
    wobbly = _tasks_result(lambda i, item: i >= 2)  # loses 2: p = 0.5
    results = _results(tmp_path, base=base, broken=broken, wobbly=wobbly)
    report = _judge(tmp_path, results, {"metric": "accuracy", "max_drop": 0})
    checks = {check["model"]: check for check in report["rules"][0]["checks"]}  # type: ignore[index]
    assert checks["broken"]["test"]["lost"] == 12 and checks["broken"]["test"]["p_value"] == pytest.approx(
        2 * 0.5**12
    )
    assert checks["broken"]["passed"] is False and checks["wobbly"]["passed"] is True
    # A drop within max_drop passes however significant: -0.5 against a tolerance of 0.6.
    assert _judge(tmp_path, results, {"metric": "accuracy", "max_drop": 0.6})["passed"] is True


def test_holm_adjusts_over_the_rules_comparisons(tmp_path: Path) -> None:
    base = _tasks_result(lambda i, item: True)
    # Each loses 6 of 24 items: p = 2 * 0.5**6 = 0.03125 alone, below 0.05; two of them: Holm 0.0625 each.
    first = _tasks_result(lambda i, item: i >= 6)
    second = _tasks_result(lambda i, item: not 6 <= i < 12)
    results = _results(tmp_path, base=base, first=first, second=second)
    rule = {"metric": "accuracy", "max_drop": 0}
    alone = _judge(tmp_path, results, {**rule, "models": ["first"]})
    assert alone["passed"] is False
    both = _judge(tmp_path, results, rule)
    assert both["passed"] is True
    assert all(check["p_holm"] == pytest.approx(0.0625) for check in both["rules"][0]["checks"])  # type: ignore[index]


def test_no_instruction_type_may_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = [
        item
        for item in load_items(Path(__file__).parents[2] / "client" / "data" / "ifeval" / "input_data.jsonl")
        if item.instruction_id_list in (("change_case:english_lowercase",), ("punctuation:no_comma",))
    ][:24]
    kinds = {item.instruction_id_list[0] for item in items}
    assert len(kinds) == 2
    suite = IFEvalSuite(items)
    base = suite.score({str(item.key): ["a short reply in lowercase"] for item in items})
    shouting = suite.score({str(item.key): ["A SHORT REPLY IN CAPITALS"] for item in items})
    results = _results(tmp_path, base=base, shouting=shouting)
    code = main(
        [
            "gate",
            "--results",
            str(results),
            "--gate",
            str(_gate(tmp_path, {"metric": "strict", "group": "*", "max_drop": 0.05})),
        ]
    )
    assert code == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "shouting, change_case:english_lowercase: 1.000 -> 0.000" in printed
    assert "punctuation:no_comma" not in printed  # that type held
    report = json.loads(results.with_name("gate.json").read_text())
    assert report["results_sha256"] and report["passed"] is False
    # The headline must not drop either; the same answers with lowercase everywhere pass.
    rule = {"metric": "prompt_strict", "max_drop": 0}
    assert (
        main(
            [
                "gate",
                "--results",
                str(results),
                "--gate",
                str(_gate(tmp_path, rule)),
                "--out",
                str(tmp_path / "g.json"),
            ]
        )
        == 1
    )
    steady = _results(tmp_path, base=base, steady=base)
    assert main(["gate", "--results", str(steady), "--gate", str(_gate(tmp_path, rule))]) == 0


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"metric": "accuracy"}], "give min_change .* or max_drop"),
        ([{"metric": "accuracy", "min_change": 0.1, "max_drop": 0}], "give min_change .* or max_drop"),
        ([{"metric": "accuracy", "min_change": 0.1, "typo": 1}], "rules.0.typo: Extra inputs"),
        ([], "rules: List should have at least 1 item"),
    ],
)
def test_a_bad_gate_file_names_the_rule_and_field(
    tmp_path: Path, rules: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(GateError, match=message):
        load_gate(_gate(tmp_path, *rules))


def test_rules_the_results_cannot_answer_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _results(
        tmp_path, base=_tasks_result(lambda i, item: True), other=_tasks_result(lambda i, item: False)
    )
    cases = [
        ({"metric": "prompt_strict", "min_change": 0}, r"no 'prompt_strict'; it has \['accuracy'\]"),
        (
            {"metric": "accuracy", "group": "json_object", "min_change": 0},
            "no 'accuracy' in group 'json_object'",
        ),
        (
            {"metric": "accuracy", "models": ["nobody"], "min_change": 0},
            r"models \['nobody'\] are not in the results",
        ),
    ]
    for rule, message in cases:
        with pytest.raises(GateError, match=message):
            run_gate(_gate(tmp_path, rule), results)
    with pytest.raises(GateError, match="baseline 'gone' is not in the results"):
        run_gate(_gate(tmp_path, {"metric": "accuracy", "min_change": 0}, baseline="gone"), results)
    assert main(["gate", "--results", str(results), "--gate", str(_gate(tmp_path, cases[0][0]))]) == 2
    assert "gate: error:" in capsys.readouterr().err


def test_bench_refuses_a_bad_gate_before_asking_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _gate(tmp_path, {"metric": "accuracy"})
    # Port 1 answers nothing: a run that got as far as the endpoint would say it cannot reach it.
    args = [
        "bench",
        "--base-url",
        "http://127.0.0.1:1/v1",
        "--models",
        "m",
        "--suite",
        "tasks",
        "--gate",
        str(bad),
    ]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "give min_change" in error and "cannot reach" not in error


def test_bench_with_a_gate_exits_by_its_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.client.test_bench import FakeOpenAI, running

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(vars(item)) + "\n" for item in TASKS))
    with running(FakeOpenAI(models=["base", "upper"])) as endpoint:  # upper answers in capitals, base not
        args = ["bench", "--base-url", endpoint.url, "--models", "base,upper", "--suite", "tasks"]
        args += ["--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
        gain = _gate(tmp_path, {"metric": "accuracy", "group": "uppercase", "min_change": 0.5})
        assert main([*args, "--gate", str(gain)]) == 0
        assert "PASS  accuracy of uppercase changes by at least +0.500" in capsys.readouterr().out
        kept = _gate(tmp_path, {"metric": "accuracy", "group": "*", "max_drop": 0})
        assert main([*args, "--gate", str(kept)]) == 1  # answered from the cache, judged again
        printed = capsys.readouterr().out
        assert "upper, lowercase: 1.000 -> 0.000" in printed and "gate: FAILED" in printed
    assert json.loads((tmp_path / "out" / "gate.json").read_text())["passed"] is False
