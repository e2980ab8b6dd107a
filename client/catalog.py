"""`python -m client catalog`: the names `tasks` and `distill` accept, as JSON, for programs that drive them.

The pipeline checks its task names with it and learns each distill family's IFEval instruction type.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def catalog() -> dict[str, Any]:
    """task_names: every name a task may be given (a family or a group of `tasks`) -> its families;
    task_families: the families of `tasks`; distill_families: each family of `distill` -> its IFEval type."""
    from client.distill import CONSTRAINTS
    from client.tasks import FAMILIES, GROUPS, families_of

    return {
        "task_names": {name: list(families_of(name)) for name in (*FAMILIES, *GROUPS)},
        "task_families": list(FAMILIES),
        "distill_families": {name: constraint.instruction_id for name, constraint in CONSTRAINTS.items()},
    }


def add_catalog_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "catalog",
        help="print the families and groups of `tasks` and the families of `distill`, as JSON",
        description=catalog.__doc__,
    )
    parser.set_defaults(run=_run_catalog)


def _run_catalog(args: argparse.Namespace) -> int:
    print(json.dumps(catalog(), indent=2))
    return 0
