"""A regression gate over a bench run: rules on the differences from the baseline, with their statistics.

`python -m client bench ... --gate gate.yaml`, or `python -m client gate --results OUT/results.json --gate
gate.yaml` on a saved run, exits 1 when a rule fails and prints which, so a user's CI can stop an adapter that
got worse. A rule names a metric, at the headline or per breakdown group (an IFEval instruction type, a tasks
family; `group: "*"` for each of them), and asks either for a gain (`min_change`) or for no significant drop
(`max_drop`, exact McNemar paired by item, Holm-adjusted over the rule's comparisons, at `alpha`):

    baseline: tiny-base          # optional: the results' first model
    rules:
      - {metric: prompt_strict, max_drop: 0}                        # IFEval must not drop significantly
      - {metric: accuracy, group: uppercase, min_change: 0.10}      # tasks/uppercase: +10 points at least
      - {metric: strict, group: "*", max_drop: 0.05, alpha: 0.05}   # no instruction type loses > 5 points
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from client.cli import Commands, CommandSettings, add_command
from tuneserve.stats import PairedTest, format_p, holm, paired_tests, per_type_tests

ALL_GROUPS = "*"


class GateError(ValueError):
    """A gate file or a results file the gate cannot use; the message says which and why."""


class GateRule(BaseModel):
    """One rule: a metric (headline, or per breakdown group) and what its change from the baseline needs."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="how the rule is printed (default: made from its fields)")
    metric: str = Field(description="a headline metric (prompt_strict, accuracy) or a breakdown one (strict)")
    group: str | None = Field(None, description="a breakdown group (instruction type, family), or * for each")
    models: list[str] | None = Field(
        None, description="the models it applies to (default: all but the baseline)"
    )
    min_change: float | None = Field(
        None, description="the difference must be at least this (0.1 = +10 points)"
    )
    max_drop: float | None = Field(
        None, ge=0, description="fail on a drop larger than this that is significant at alpha (0: any drop)"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of max_drop, after Holm")

    @model_validator(mode="after")
    def _one_requirement(self) -> GateRule:
        if (self.min_change is None) == (self.max_drop is None):
            raise ValueError(
                "give min_change (a gain required) or max_drop (no significant drop), one of them"
            )
        return self

    def title(self) -> str:
        if self.name:
            return self.name
        where = (
            self.metric
            if self.group is None
            else f"{self.metric} of {'each group' if self.group == ALL_GROUPS else self.group}"
        )
        if self.min_change is not None:
            return f"{where} changes by at least {self.min_change:+.3f}"
        return f"{where} drops by no more than {self.max_drop:.3f} significantly (alpha {self.alpha:g})"


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline: str | None = None
    rules: list[GateRule] = Field(min_length=1)


def load_gate(path: Path) -> GateConfig:
    """A gate file, validated; errors name the rule and field."""
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise GateError(f"gate file {path}: {err}") from err
    try:
        return GateConfig.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '<root>'}: "
            + item["msg"].removeprefix("Value error, ")
            for item in err.errors()
        )
        raise GateError(f"gate file {path}: {problems}") from None


@dataclass
class Check:
    """One comparison a rule makes: a model against the baseline, at the headline or in one group."""

    model: str
    group: str | None
    baseline_value: float
    value: float
    test: PairedTest | None
    p_holm: float | None = None
    passed: bool = True
    why: str = ""

    @property
    def difference(self) -> float:
        return self.value - self.baseline_value


@dataclass
class RuleOutcome:
    rule: str
    passed: bool
    checks: list[Check]


def _value(result: Mapping[str, Any], metric: str, group: str | None, where: str) -> float:
    table = result["metrics"] if group is None else result["breakdown"].get(group)
    if table is None or metric not in table:
        known = sorted(result["metrics"] if group is None else (table or {}))
        raise GateError(
            f"{where}: no {metric!r}{'' if group is None else f' in group {group!r}'}; it has {known}"
        )
    return float(table[metric])


def _group_test(
    suite: str, baseline: Sequence[Mapping[str, Any]], model: Sequence[Mapping[str, Any]], group: str
) -> PairedTest | None:
    """The paired test of one breakdown group: IFEval's instruction type (instruction-level, strict), or the
    items of one tasks family."""
    if suite == "ifeval":
        return per_type_tests(baseline, model).get(group)
    if suite == "tasks":
        in_family = [item for item in baseline if item.get("family") == group]
        return paired_tests(in_family, model, suite).get("accuracy")
    return None


# The metrics a paired test stands behind: headline ones (tuneserve.stats.paired_tests) and per group.
_TESTED_HEADLINE = {
    "ifeval": {"prompt_strict", "instruction_strict"},
    "tasks": {"accuracy"},
    "reference": {"exact_match"},
}
_TESTED_GROUP = {"ifeval": {"strict"}, "tasks": {"accuracy"}}


def evaluate_gate(gate: GateConfig, document: Mapping[str, Any]) -> list[RuleOutcome]:
    """Every rule against a bench run's results.json document."""
    results: Mapping[str, Any] = document["models"]
    models = list(results)
    baseline = gate.baseline or models[0]
    if baseline not in results:
        raise GateError(f"baseline {baseline!r} is not in the results; they have {models}")
    outcomes = []
    for index, rule in enumerate(gate.rules):
        where = f"rule {index + 1} ({rule.title()})"
        compared = rule.models if rule.models is not None else [m for m in models if m != baseline]
        missing = [m for m in compared if m not in results]
        if missing:
            raise GateError(f"{where}: models {missing} are not in the results; they have {models}")
        base = results[baseline]
        suite = base["suite"]
        groups: list[str | None] = sorted(base["breakdown"]) if rule.group == ALL_GROUPS else [rule.group]
        tested = (_TESTED_HEADLINE if rule.group is None else _TESTED_GROUP).get(suite, set())
        if rule.max_drop is not None and rule.metric not in tested:
            raise GateError(
                f"{where}: max_drop needs a paired test, and {suite}'s {rule.metric!r} has none here "
                f"(tested: {sorted(tested) or 'none'}); use min_change"
            )
        checks = []
        for model in compared:
            for group in groups:
                test = None
                if rule.max_drop is not None:
                    if group is None:
                        test = paired_tests(base["items"], results[model]["items"], suite).get(rule.metric)
                    else:
                        test = _group_test(suite, base["items"], results[model]["items"], group)
                checks.append(
                    Check(
                        model=model,
                        group=group,
                        baseline_value=_value(base, rule.metric, group, f"{where}, {baseline}"),
                        value=_value(results[model], rule.metric, group, f"{where}, {model}"),
                        test=test,
                    )
                )
        tests = [check for check in checks if check.test is not None]
        for check, adjusted in zip(
            tests, holm([check.test.p_value for check in tests if check.test]), strict=True
        ):
            check.p_holm = adjusted
        for check in checks:
            if rule.min_change is not None:
                check.passed = check.difference >= rule.min_change - 1e-12
                check.why = f"{check.difference:+.3f} (needs {rule.min_change:+.3f})"
            else:
                assert rule.max_drop is not None
                p = check.p_holm if check.p_holm is not None else 1.0
                check.passed = not (check.difference < -rule.max_drop and p < rule.alpha)
                check.why = f"{check.difference:+.3f}, {format_p(p)} after Holm"
        outcomes.append(RuleOutcome(rule=rule.title(), passed=all(c.passed for c in checks), checks=checks))
    return outcomes


def gate_report(
    outcomes: Sequence[RuleOutcome], gate_path: Path, results_path: Path, document: Mapping[str, Any]
) -> dict[str, Any]:
    """gate.json: whether the run passed, each rule's checks, the results file it judged (by hash), and the
    version of each model the endpoint listed (what `POST /v1/lora_adapters/promote` checks)."""
    listing = (document.get("meta") or {}).get("models_listing") or []
    return {
        "passed": all(outcome.passed for outcome in outcomes),
        "versions": {
            str(card["id"]): card.get("version")
            for card in listing
            if isinstance(card, Mapping) and card.get("id") in document["models"]
        },
        "gate": str(gate_path),
        "results": str(results_path),
        "results_sha256": hashlib.sha256(Path(results_path).read_bytes()).hexdigest(),
        "rules": [
            {
                "rule": outcome.rule,
                "passed": outcome.passed,
                "checks": [
                    {
                        **{key: value for key, value in asdict(check).items() if key != "test"},
                        "difference": check.difference,
                        "test": check.test.as_dict() if check.test else None,
                    }
                    for check in outcome.checks
                ],
            }
            for outcome in outcomes
        ],
    }


def format_outcomes(outcomes: Sequence[RuleOutcome]) -> str:
    lines = []
    for outcome in outcomes:
        lines.append(f"{'PASS' if outcome.passed else 'FAIL'}  {outcome.rule}")
        for check in outcome.checks:
            if not check.passed:
                where = check.model if check.group is None else f"{check.model}, {check.group}"
                lines.append(f"        {where}: {check.baseline_value:.3f} -> {check.value:.3f}, {check.why}")
    return "\n".join(lines)


def run_gate(gate_path: Path, results_path: Path, out: Path | None = None) -> bool:
    """Judge a results.json with a gate file; prints the rules, writes gate.json beside the results (or to
    `out`), and returns whether every rule passed."""
    gate = load_gate(gate_path)
    try:
        document = json.loads(Path(results_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GateError(f"results {results_path}: {err}") from err
    outcomes = evaluate_gate(gate, document)
    report = gate_report(outcomes, gate_path, results_path, document)
    target = out if out is not None else Path(results_path).with_name("gate.json")
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_outcomes(outcomes))
    print(f"gate: {'passed' if report['passed'] else 'FAILED'} ({target})")
    return bool(report["passed"])


class GateCommand(CommandSettings):
    """`gate`: judge a saved bench run."""

    results: Path = Field(description="a bench run's results.json")
    gate: Path = Field(description="the gate file (YAML: baseline, rules)")
    out: Path | None = Field(None, description="where gate.json goes (default: beside the results)")


def add_gate_command(commands: Commands) -> None:
    add_command(
        commands,
        "gate",
        GateCommand,
        _run_gate_command,
        help="judge a bench run with a regression gate (exit 1 when a rule fails)",
        description="Check a bench run's results.json against the rules of a gate file: gains required, "
        "or no significant drop (exact McNemar paired by item, Holm over each rule). Prints each rule, "
        "writes gate.json, exits 1 when a rule fails and 2 when the gate or the results cannot be used.",
    )


def _run_gate_command(config: GateCommand) -> int:
    try:
        return 0 if run_gate(config.gate, config.results, config.out) else 1
    except GateError as err:
        print(f"gate: error: {err}", file=sys.stderr)
        return 2
