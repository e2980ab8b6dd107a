"""Paired statistics for comparing two models on the same items: the exact McNemar test for pass/fail
outcomes, a paired bootstrap confidence interval for continuous scores, and Holm's correction.

Used by the `bench` report (report.md, results.json), the gate and the pipeline's report; `paired_tests` and
`paired_intervals` pair items by id.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PairedTest:
    """Two models' pass/fail on the same `n` items, and the exact McNemar test of the difference.

    gained: items the baseline failed and the model passed; lost: items the baseline passed and the
    model failed; rates are pass rates in [0, 1]; p_value is two-sided (1.0 when nothing changed).
    """

    n: int
    gained: int
    lost: int
    baseline_rate: float
    model_rate: float
    p_value: float

    @property
    def difference(self) -> float:
        return self.model_rate - self.baseline_rate

    def as_dict(self) -> dict[str, Any]:
        """The fields and the difference, as results.json and demo.json hold them."""
        return asdict(self) | {"difference": self.difference}


def mcnemar(baseline: Sequence[bool], model: Sequence[bool]) -> PairedTest:
    """Exact (binomial) two-sided McNemar test of `model` against `baseline`, item by item."""
    if len(baseline) != len(model):
        raise ValueError(
            f"mcnemar needs one outcome per item from each model: baseline has {len(baseline)}, "
            f"model has {len(model)}"
        )
    if not baseline:
        raise ValueError("mcnemar needs at least one item")
    from scipy.stats import binomtest

    pairs = [(bool(b), bool(m)) for b, m in zip(baseline, model, strict=True)]
    gained = sum(1 for b, m in pairs if m and not b)
    lost = sum(1 for b, m in pairs if b and not m)
    discordant = gained + lost
    # scipy's two-sided binomtest at p=0.5 is the doubled exact tail, capped at 1.
    p_value = 1.0 if discordant == 0 else float(binomtest(gained, discordant, 0.5).pvalue)
    return PairedTest(
        n=len(pairs),
        gained=gained,
        lost=lost,
        baseline_rate=sum(b for b, _ in pairs) / len(pairs),
        model_rate=sum(m for _, m in pairs) / len(pairs),
        p_value=min(1.0, p_value),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (step-down, monotone, capped at 1)."""
    for p in p_values:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must be in [0, 1], got {p}")
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def format_p(p: float) -> str:
    """ "p<0.001" below 0.001, else three significant digits: "p=0.0215", "p=1"."""
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def _paired_items(
    baseline_items: Sequence[Mapping[str, Any]], model_items: Sequence[Mapping[str, Any]], key: str
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(baseline item, model item) for ids both have and both score with `key`, in the baseline's order."""
    by_id = {str(item["id"]): item for item in model_items if key in item}
    return [
        (item, by_id[str(item["id"])]) for item in baseline_items if key in item and str(item["id"]) in by_id
    ]


def paired_tests(
    baseline_items: Sequence[Mapping[str, Any]], model_items: Sequence[Mapping[str, Any]], suite: str
) -> dict[str, PairedTest]:
    """Exact McNemar tests per metric, on the items (SuiteResult.items, or results.json's) both models have.

    ifeval: "prompt_strict" (item["prompt_strict"]) and "instruction_strict" (item["follow_strict"],
    flattened in order); tasks: "accuracy" (item["passed"]); reference: "exact_match". Other suites, or no
    shared items: {}.
    """
    tests: dict[str, PairedTest] = {}
    if suite == "ifeval":
        pairs = _paired_items(baseline_items, model_items, "prompt_strict")
        if pairs:
            tests["prompt_strict"] = mcnemar(
                [b["prompt_strict"] for b, _ in pairs], [m["prompt_strict"] for _, m in pairs]
            )
        baseline_follow: list[bool] = []
        model_follow: list[bool] = []
        for b, m in _paired_items(baseline_items, model_items, "follow_strict"):
            if len(b["follow_strict"]) != len(m["follow_strict"]):
                raise ValueError(
                    f"item {b['id']}: baseline has {len(b['follow_strict'])} instruction outcomes, "
                    f"model has {len(m['follow_strict'])}"
                )
            baseline_follow += b["follow_strict"]
            model_follow += m["follow_strict"]
        if baseline_follow:
            tests["instruction_strict"] = mcnemar(baseline_follow, model_follow)
    elif suite == "tasks":
        pairs = _paired_items(baseline_items, model_items, "passed")
        if pairs:
            tests["accuracy"] = mcnemar([b["passed"] for b, _ in pairs], [m["passed"] for _, m in pairs])
    elif suite == "reference":
        pairs = _paired_items(baseline_items, model_items, "exact_match")
        if pairs:
            tests["exact_match"] = mcnemar(
                [bool(b["exact_match"]) for b, _ in pairs], [bool(m["exact_match"]) for _, m in pairs]
            )
    return tests


def per_type_tests(
    baseline_items: Sequence[Mapping[str, Any]], model_items: Sequence[Mapping[str, Any]]
) -> dict[str, PairedTest]:
    """IFEval: an exact McNemar test per instruction type, on every instruction of that type both models
    were scored on (item["instruction_id_list"] beside item["follow_strict"]), types in sorted order."""
    baseline_by_type: dict[str, list[bool]] = {}
    model_by_type: dict[str, list[bool]] = {}
    for b, m in _paired_items(baseline_items, model_items, "follow_strict"):
        for kind, followed, model_followed in zip(
            b["instruction_id_list"], b["follow_strict"], m["follow_strict"], strict=True
        ):
            baseline_by_type.setdefault(kind, []).append(followed)
            model_by_type.setdefault(kind, []).append(model_followed)
    return {kind: mcnemar(baseline_by_type[kind], model_by_type[kind]) for kind in sorted(baseline_by_type)}


# --- continuous scores: the paired bootstrap --------------------------------------------------------

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedInterval:
    """A paired bootstrap confidence interval for the difference of two models' mean scores on the same `n`
    items (model minus baseline): items are resampled with their two scores together, so what the items have
    in common cancels and only the models' difference varies. BCa interval (scipy), seeded."""

    n: int
    baseline_mean: float
    model_mean: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int

    @property
    def difference(self) -> float:
        return self.model_mean - self.baseline_mean

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"difference": self.difference}


def paired_bootstrap(
    baseline: Sequence[float],
    model: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = 0,
) -> PairedInterval:
    """The paired bootstrap interval of mean(model) - mean(baseline), one score per item from each."""
    if len(baseline) != len(model):
        raise ValueError(
            f"a paired bootstrap needs one score per item from each model: baseline has {len(baseline)}, "
            f"model has {len(model)}"
        )
    if not baseline:
        raise ValueError("a paired bootstrap needs at least one item")
    import numpy as np

    differences = np.asarray(model, dtype=float) - np.asarray(baseline, dtype=float)
    mean = float(differences.mean())
    if len(differences) < 2 or np.ptp(differences) <= 1e-12 * max(1.0, abs(mean)):
        low = high = mean  # every resample has the same mean (to rounding): the interval is that point
    else:
        low, high = _bootstrap_interval(differences, np.mean, True, resamples, confidence, seed)
    return PairedInterval(
        n=len(differences),
        baseline_mean=float(np.mean(baseline)),
        model_mean=float(np.mean(model)),
        low=low,
        high=high,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


def paired_bootstrap_of(
    n: int,
    baseline_score: float,
    model_score: float,
    difference: Callable[[Any], float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = 0,
) -> PairedInterval:
    """The paired bootstrap interval of a score that is not a mean of per-item scores (corpus BLEU):
    `difference(indices)` is the model's score minus the baseline's on the items at `indices` (a numpy
    array, items repeated as drawn), so both are always scored on the same resample."""
    if n < 1:
        raise ValueError("a paired bootstrap needs at least one item")
    import numpy as np

    indices = np.arange(n)
    if n < 2:
        low = high = model_score - baseline_score
    else:
        low, high = _bootstrap_interval(indices, difference, False, resamples, confidence, seed)
    return PairedInterval(
        n=n,
        baseline_mean=baseline_score,
        model_mean=model_score,
        low=low,
        high=high,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


def _bootstrap_interval(
    data: Any, statistic: Callable[..., Any], vectorized: bool, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """scipy's bootstrap interval of `statistic` over `data`, seeded: BCa, which corrects the percentile
    interval's bias and skew, or the percentile interval where BCa's correction cannot be computed (nearly
    every resample alike)."""
    import numpy as np
    from scipy.stats import bootstrap

    low = high = math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = bootstrap(
                (data,),
                statistic,
                n_resamples=resamples,
                confidence_level=confidence,
                method=method,
                vectorized=vectorized,
                rng=np.random.default_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return low, high


def _paired_scores(
    baseline_items: Sequence[Mapping[str, Any]], model_items: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[float], list[float]]:
    """Both models' per-item scores under `key` (a number, or a list of numbers/None per turn), paired by
    item id and turn; a score either side lacks is left out."""
    baseline_scores: list[float] = []
    model_scores: list[float] = []
    for b, m in _paired_items(baseline_items, model_items, key):
        b_values, m_values = b[key], m[key]
        if not isinstance(b_values, list):
            b_values, m_values = [b_values], [m_values]
        for b_value, m_value in zip(b_values, m_values, strict=False):
            if b_value is not None and m_value is not None:
                baseline_scores.append(float(b_value))
                model_scores.append(float(m_value))
    return baseline_scores, model_scores


# Continuous per-item scores a suite's items carry, and the headline metric each stands behind.
_CONTINUOUS = {"reference": {"rouge_l": "rouge_l"}, "mtbench": {"overall": "ratings"}}


def paired_intervals(
    baseline_items: Sequence[Mapping[str, Any]],
    model_items: Sequence[Mapping[str, Any]],
    suite: str,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, PairedInterval]:
    """Paired bootstrap intervals per continuous metric: reference's "rouge_l" (item["rouge_l"]), MT-Bench's
    "overall" (item["ratings"], paired by turn). Other suites, or no shared scores: {}."""
    intervals: dict[str, PairedInterval] = {}
    for metric, key in _CONTINUOUS.get(suite, {}).items():
        baseline_scores, model_scores = _paired_scores(baseline_items, model_items, key)
        if baseline_scores:
            intervals[metric] = paired_bootstrap(
                baseline_scores, model_scores, resamples=resamples, seed=seed
            )
    return intervals
