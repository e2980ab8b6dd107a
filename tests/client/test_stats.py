"""tuneserve.stats (exact McNemar, Holm, p formatting) against hand-derived values, and the bench report's
paired comparison with the baseline (report.md section and results.json's "paired" entry)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats

from client.report import paired_comparison, render_markdown, write_report
from client.suite import SuiteResult
from tuneserve.stats import (
    PairedTest,
    format_p,
    holm,
    mcnemar,
    paired_bootstrap,
    paired_intervals,
    paired_tests,
)


def _outcomes(gained: int, lost: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """Baseline and model pass/fail with the given counts of each kind of pair."""
    pairs = [(False, True)] * gained + [(True, False)] * lost + [(True, True)] * both
    pairs += [(False, False)] * neither
    return [b for b, _ in pairs], [m for _, m in pairs]


def _exact_mcnemar(b: int, c: int) -> float:
    """Textbook exact McNemar: twice the smaller binomial(b + c, 1/2) tail, capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


# --- mcnemar -------------------------------------------------------------------------------------


def test_mcnemar_one_gained_nine_lost() -> None:
    test = mcnemar(*_outcomes(gained=1, lost=9, both=3, neither=7))
    assert (test.n, test.gained, test.lost) == (20, 1, 9)
    assert test.p_value == pytest.approx(2 * (1 + 10) / 2**10, rel=1e-12)  # 0.021484375
    assert test.baseline_rate == pytest.approx(12 / 20)
    assert test.model_rate == pytest.approx(4 / 20)
    assert test.difference == pytest.approx(-8 / 20)


def test_mcnemar_textbook_two_versus_eight() -> None:
    test = mcnemar(*_outcomes(gained=2, lost=8))
    assert test.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024, rel=1e-12)  # 0.109375
    assert (test.n, test.baseline_rate, test.model_rate) == (10, 0.8, 0.2)


def test_mcnemar_no_change_or_balanced_change_gives_one() -> None:
    same = mcnemar(*_outcomes(gained=0, lost=0, both=4, neither=2))
    assert (same.gained, same.lost, same.p_value, same.difference) == (0, 0, 1.0, 0.0)
    assert mcnemar(*_outcomes(gained=5, lost=5)).p_value == 1.0
    assert mcnemar([True], [True]).p_value == 1.0


def test_mcnemar_is_symmetric_in_the_two_models() -> None:
    baseline, model = _outcomes(gained=3, lost=11, both=6, neither=4)
    forward, backward = mcnemar(baseline, model), mcnemar(model, baseline)
    assert (backward.gained, backward.lost) == (forward.lost, forward.gained)
    assert backward.p_value == forward.p_value
    assert (backward.baseline_rate, backward.model_rate) == (forward.model_rate, forward.baseline_rate)


@pytest.mark.parametrize("gained", range(13))
def test_mcnemar_matches_the_doubled_binomial_tail(gained: int) -> None:
    for lost in range(13):
        p = mcnemar(*_outcomes(gained, lost, both=2, neither=1)).p_value
        assert p == pytest.approx(_exact_mcnemar(gained, lost), rel=1e-10), (gained, lost)
        assert 0.0 < p <= 1.0


def test_mcnemar_rejects_mismatched_or_empty_sequences() -> None:
    with pytest.raises(ValueError, match="baseline has 3, model has 2"):
        mcnemar([True, False, True], [True, False])
    with pytest.raises(ValueError, match="at least one item"):
        mcnemar([], [])


def test_paired_test_is_frozen() -> None:
    test = PairedTest(n=4, gained=1, lost=0, baseline_rate=0.25, model_rate=0.5, p_value=1.0)
    assert test.difference == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        test.n = 5  # type: ignore[misc]


# --- holm and format_p ---------------------------------------------------------------------------


def test_holm_hand_computed() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_handles_edge_cases() -> None:
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.2, 0.001, 0.9]) == pytest.approx([0.4, 0.003, 0.9])
    assert holm([0.04]) == [0.04]
    assert holm([]) == []
    assert holm([0.01, 0.01]) == [0.02, 0.02]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm([0.5, 1.5])


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.0, "p<0.001"),
        (0.000999, "p<0.001"),
        (0.001, "p=0.001"),
        (0.001953125, "p=0.00195"),
        (0.021484375, "p=0.0215"),
        (0.109375, "p=0.109"),
        (0.5, "p=0.5"),
        (1.0, "p=1"),
    ],
)
def test_format_p(p: float, text: str) -> None:
    assert format_p(p) == text


# --- pairing items ---------------------------------------------------------------------------------


def _task_items(passed: list[bool], ids: list[str] | None = None) -> list[dict[str, Any]]:
    ids = ids or [f"t{i}" for i in range(len(passed))]
    return [
        {"id": id_, "family": "uppercase", "responses": ["x"], "passed": ok}
        for id_, ok in zip(ids, passed, strict=True)
    ]


def _ifeval_items(prompt: list[bool], follow: list[list[bool]]) -> list[dict[str, Any]]:
    return [
        {"id": str(1000 + i), "responses": ["x"], "prompt_strict": p, "follow_strict": f}
        for i, (p, f) in enumerate(zip(prompt, follow, strict=True))
    ]


def test_paired_tests_pair_items_by_id_only() -> None:
    baseline = _task_items([True, True, False, False], ["a", "b", "c", "d"])
    # Another order, "d" missing, "z" only in the model: compared on a, b, c.
    model = _task_items([True, False, True, True], ["c", "b", "a", "z"])
    test = paired_tests(baseline, model, "tasks")["accuracy"]
    assert (test.n, test.gained, test.lost) == (3, 1, 1)
    assert (test.baseline_rate, test.model_rate) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_paired_tests_ifeval_flattens_instructions() -> None:
    baseline = _ifeval_items([True, False, False], [[True, True], [False, True], [False]])
    model = _ifeval_items([False, True, True], [[True, False], [True, True], [True]])
    tests = paired_tests(baseline, model, "ifeval")
    assert list(tests) == ["prompt_strict", "instruction_strict"]
    prompt, instruction = tests["prompt_strict"], tests["instruction_strict"]
    assert (prompt.n, prompt.gained, prompt.lost, prompt.p_value) == (3, 2, 1, 1.0)
    assert (instruction.n, instruction.gained, instruction.lost) == (5, 2, 1)
    assert (instruction.baseline_rate, instruction.model_rate) == (0.6, 0.8)

    with pytest.raises(ValueError, match="item 1000"):
        paired_tests(baseline, _ifeval_items([True], [[True]]), "ifeval")


def test_paired_tests_need_per_item_outcomes() -> None:
    assert paired_tests([], [], "tasks") == {}
    assert paired_tests(_task_items([True]), _task_items([False], ["other"]), "tasks") == {}
    reference = [{"id": "a", "responses": ["x"], "exact_match": True}]
    assert set(paired_tests(reference, reference, "reference")) == {"exact_match"}
    judged = [{"id": "a", "responses": ["x"], "ratings": [5.0, 6.0]}]
    assert paired_tests(judged, judged, "mtbench") == {}  # ratings: the bootstrap interval instead
    assert paired_tests([{"id": "a", "responses": ["x"]}], [{"id": "a", "responses": ["y"]}], "tasks") == {}


# --- the bench report -----------------------------------------------------------------------------


def _tasks_result(passed: list[bool]) -> SuiteResult:
    items = _task_items(passed)
    accuracy = sum(passed) / len(passed)
    return SuiteResult(
        "tasks", {"accuracy": accuracy}, {"uppercase": {"accuracy": accuracy, "count": 12}}, items
    )


def _tasks_results() -> dict[str, SuiteResult]:
    # Baseline passes t0..t9 and fails t10, t11.
    # fmt: passes t9, t10 -> gained 1 (t10), lost 9 (t0..t8); caps: passes t8..t11 -> gained 2, lost 8.
    return {
        "base": _tasks_result([True] * 10 + [False] * 2),
        "fmt": _tasks_result([False] * 9 + [True, True, False]),
        "caps": _tasks_result([False] * 8 + [True] * 4),
    }


META = {"suite": "tasks", "base_url": "http://x/v1", "sampling": {"temperature": 0.0}}


def test_report_tasks_paired_section(tmp_path: Path) -> None:
    results = _tasks_results()
    markdown = render_markdown(META, results)
    assert "## Paired comparison with the baseline" in markdown
    assert (
        markdown.index("## Headline metrics")
        < markdown.index("## Paired comparison with the baseline")
        < markdown.index("## Per family: accuracy")
    )
    assert (
        "exact McNemar test on the same prompts; p adjusted for the number of comparisons with Holm's method"
    ) in markdown
    header = "| model | metric | n | baseline rate | model rate | gained | lost | p | p (Holm) |"
    assert header in markdown
    # Holm over both rows: 0.021484375 * 2 = 0.04296875; 0.109375 * 1 stays.
    assert "| `fmt` | accuracy | 12 | 0.833 | 0.167 (-0.667) | 1 | 9 | p=0.0215 | p=0.043 |" in markdown
    assert "| `caps` | accuracy | 12 | 0.833 | 0.333 (-0.500) | 2 | 8 | p=0.109 | p=0.109 |" in markdown
    assert "| `base` | accuracy | 12 |" not in markdown

    paths = write_report(tmp_path, META, results)
    document = json.loads(paths["results"].read_text())
    assert list(document) == ["meta", "models", "paired", "intervals"]
    assert document["intervals"] == {}  # pass/fail items: the McNemar test, no interval
    assert list(document["paired"]) == ["fmt", "caps"]
    fmt = document["paired"]["fmt"]["accuracy"]
    assert fmt == {
        "n": 12,
        "gained": 1,
        "lost": 9,
        "baseline_rate": pytest.approx(10 / 12),
        "model_rate": pytest.approx(2 / 12),
        "p_value": pytest.approx(0.021484375, rel=1e-12),
        "difference": pytest.approx(-8 / 12),
    }
    assert document["paired"]["caps"]["accuracy"]["p_value"] == pytest.approx(0.109375, rel=1e-12)
    assert paths["report"].read_text() == markdown + "\n"

    comparison = paired_comparison(results)
    assert comparison["fmt"]["accuracy"] == mcnemar(
        [True] * 10 + [False] * 2, [False] * 9 + [True, True, False]
    )


def test_report_ifeval_paired_section(tmp_path: Path) -> None:
    # Baseline fails every prompt and the second instruction of each; the model follows everything.
    base_items = _ifeval_items([False] * 10, [[True, False]] * 10)
    model_items = _ifeval_items([True] * 10, [[True, True]] * 10)
    metrics = {"prompt_strict": 0.0, "instruction_strict": 0.5}
    results = {
        "base": SuiteResult("ifeval", metrics, {}, base_items),
        "tuned": SuiteResult("ifeval", {"prompt_strict": 1.0, "instruction_strict": 1.0}, {}, model_items),
    }
    markdown = render_markdown({**META, "suite": "ifeval"}, results)
    # p = 2 / 2**10 = 0.001953125 for both rows; Holm: 2 * 0.001953125 for both.
    assert (
        "| `tuned` | prompt_strict | 10 | 0.000 | 1.000 (+1.000) | 10 | 0 | p=0.00195 | p=0.00391 |"
        in markdown
    )
    assert (
        "| `tuned` | instruction_strict | 20 | 0.500 | 1.000 (+0.500) | 10 | 0 | p=0.00195 | p=0.00391 |"
    ) in markdown

    document = json.loads(write_report(tmp_path, {**META, "suite": "ifeval"}, results)["results"].read_text())
    assert set(document["paired"]["tuned"]) == {"prompt_strict", "instruction_strict"}
    assert document["paired"]["tuned"]["instruction_strict"]["n"] == 20
    assert document["paired"]["tuned"]["prompt_strict"]["difference"] == 1.0


def test_report_without_items_or_second_model_has_no_paired_section(tmp_path: Path) -> None:
    no_items = {
        "base": SuiteResult("tasks", {"accuracy": 0.5}, {}, items=[]),
        "fmt": SuiteResult("tasks", {"accuracy": 0.75}, {}, items=[]),
    }
    assert "Paired comparison" not in render_markdown(META, no_items)
    document = json.loads(write_report(tmp_path, META, no_items)["results"].read_text())
    assert document["paired"] == {}

    only_baseline = {"base": _tasks_results()["base"]}
    assert "Paired comparison" not in render_markdown(META, only_baseline)


# --- paired bootstrap ------------------------------------------------------------------------------


def test_the_bootstrap_interval_is_paired_so_what_items_share_cancels() -> None:
    # Items as different from each other as scores get (0.05 .. 0.95), the model 0.1 above on each, with
    # a little noise: an unpaired interval would be about +-0.07 wide, the paired one a few thousandths.
    rng = np.random.default_rng(1)
    baseline = list(np.linspace(0.05, 0.85, 200))
    model = [b + 0.1 + noise for b, noise in zip(baseline, rng.normal(0, 0.01, 200), strict=True)]
    ci = paired_bootstrap(baseline, model)
    assert ci.low < 0.1 < ci.high and ci.high - ci.low < 0.005
    assert ci.difference == pytest.approx(0.1, abs=0.002)
    assert (ci.n, ci.resamples, ci.confidence, ci.seed) == (200, 10_000, 0.95, 0)


def test_the_bootstrap_interval_agrees_with_normal_theory_on_a_large_sample() -> None:
    # For the mean of 400 normal differences the BCa interval and the t interval coincide closely.
    rng = np.random.default_rng(7)
    baseline = list(rng.normal(5, 1, 400))
    model = [b + d for b, d in zip(baseline, rng.normal(0.3, 1.0, 400), strict=True)]
    differences = np.asarray(model) - np.asarray(baseline)
    half = scipy_stats.t.ppf(0.975, 399) * differences.std(ddof=1) / math.sqrt(400)
    ci = paired_bootstrap(baseline, model)
    assert ci.low == pytest.approx(differences.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(differences.mean() + half, abs=0.1 * half)


def test_the_bootstrap_is_seeded_and_handles_degenerate_samples() -> None:
    rng = np.random.default_rng(3)
    baseline, model = list(rng.random(50)), list(rng.random(50))
    assert paired_bootstrap(baseline, model) == paired_bootstrap(baseline, model)
    assert paired_bootstrap(baseline, model, seed=1) != paired_bootstrap(baseline, model)
    shifted = paired_bootstrap([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])  # every difference 0.5
    assert (shifted.low, shifted.high) == (0.5, 0.5)
    assert paired_bootstrap([2.0], [3.0]).low == 1.0
    with pytest.raises(ValueError, match="one score per item"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one item"):
        paired_bootstrap([], [])


def test_paired_intervals_pair_by_item_and_by_turn() -> None:
    baseline = [{"id": "a", "rouge_l": 0.2}, {"id": "b", "rouge_l": 0.4}, {"id": "c", "rouge_l": 0.9}]
    model = [{"id": "b", "rouge_l": 0.5}, {"id": "a", "rouge_l": 0.3}, {"id": "z", "rouge_l": 0.0}]
    ci = paired_intervals(baseline, model, "reference")["rouge_l"]
    assert ci.n == 2 and ci.difference == pytest.approx(0.1)
    judged = [{"id": "1", "ratings": [5.0, None]}, {"id": "2", "ratings": [7.0, 6.0]}]
    other = [{"id": "1", "ratings": [6.0, 9.0]}, {"id": "2", "ratings": [None, 8.0]}]
    overall = paired_intervals(judged, other, "mtbench")["overall"]
    assert (overall.n, overall.baseline_mean, overall.model_mean) == (2, 5.5, 7.0)  # turns both rated
    assert paired_intervals(baseline, model, "tasks") == {}


def test_report_reference_suite_has_intervals(tmp_path: Path) -> None:
    def result(scores: list[float]) -> SuiteResult:
        items = [{"id": str(i), "responses": ["x"], "rouge_l": s} for i, s in enumerate(scores)]
        return SuiteResult("reference", {"rouge_l": sum(scores) / len(scores)}, {}, items)

    scores = [0.125 * (i % 8) for i in range(40)]  # exact in binary: every difference is exactly 0.25
    results = {"base": result(scores), "tuned": result([s + 0.25 for s in scores])}
    paths = write_report(tmp_path, {**META, "suite": "reference"}, results)
    document = json.loads(paths["results"].read_text())
    interval = document["intervals"]["tuned"]["rouge_l"]
    assert interval["difference"] == interval["low"] == interval["high"] == 0.25
    markdown = paths["report"].read_text()
    assert "## Paired bootstrap intervals" in markdown
    assert "| `tuned` | rouge_l | 40 | 0.438 | 0.688 (+0.250) | [+0.250, +0.250] |" in markdown
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_the_bleu_interval_resamples_sacrebleus_sufficient_statistics() -> None:
    from client.suites import corpus_bleu, paired_bleu

    references = [
        f"the {noun} sat on the mat near the door" for noun in ("cat", "dog", "fox", "owl", "hen")
    ] * 4
    weak = ["a cat is here", "the dog", "near the door", "on the mat", "the owl sat"] * 4
    strong = [reference.replace("door", "window") for reference in references]

    def items(replies: list[str]) -> list[dict[str, Any]]:
        return [
            {"id": str(i), "reference": ref, "responses": [reply]}
            for i, (ref, reply) in enumerate(zip(references, replies, strict=True))
        ]

    interval = paired_bleu(items(weak), items(strong))
    assert interval is not None and interval.n == 20
    # On all the items, the scores are sacrebleu's corpus BLEU of the same replies, exactly.
    assert interval.baseline_mean == corpus_bleu(weak, references)
    assert interval.model_mean == corpus_bleu(strong, references)
    assert 0 < interval.low < interval.difference < interval.high
    same = paired_bleu(items(weak), items(weak))
    assert same is not None and (same.low, same.high) == (0.0, 0.0)
    assert paired_bleu(items(weak), [{"id": "other", "reference": "x", "responses": ["y"]}]) is None


def test_report_reference_suite_gives_bleu_an_interval(tmp_path: Path) -> None:
    def result(replies: list[str]) -> SuiteResult:
        items = [
            {"id": str(i), "reference": "one two three four five", "responses": [reply], "rouge_l": 0.5}
            for i, reply in enumerate(replies)
        ]
        return SuiteResult("reference", {"rouge_l": 0.5, "bleu": 0.0}, {}, items)

    results = {"base": result(["one two"] * 10), "tuned": result(["one two three four five"] * 10)}
    document = json.loads(
        write_report(tmp_path, {**META, "suite": "reference"}, results)["results"].read_text()
    )
    assert set(document["intervals"]["tuned"]) == {"rouge_l", "bleu"}
    assert document["intervals"]["tuned"]["bleu"]["model_mean"] == pytest.approx(1.0)


def test_paired_tests_reference_exact_match() -> None:
    baseline = [{"id": str(i), "exact_match": i < 2} for i in range(12)]
    model = [{"id": str(i), "exact_match": i >= 1} for i in range(12)]  # gains 10, loses 1
    test = paired_tests(baseline, model, "reference")["exact_match"]
    assert (test.n, test.gained, test.lost) == (12, 10, 1)
    assert test.p_value == pytest.approx(_exact_mcnemar(10, 1))
