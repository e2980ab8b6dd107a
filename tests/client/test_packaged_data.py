"""The benchmark data shipped inside `client`: complete, unmodified (NOTICE.md's hashes) and the default."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import client
from client.suites import default_data, packaged_data_dir

DATA = packaged_data_dir()
# A row of NOTICE.md's tables: | `ifeval/input_data.jsonl` | `<sha256>` |
NOTICE_ROW = re.compile(r"^\|\s*`(?P<path>[\w./-]+)`\s*\|\s*`(?P<sha256>[0-9a-f]{64})`\s*\|$", re.MULTILINE)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_packaged_ifeval_has_the_541_prompts() -> None:
    records = _records(DATA / "ifeval" / "input_data.jsonl")
    assert len(records) == 541
    assert all(set(record) == {"key", "prompt", "instruction_id_list", "kwargs"} for record in records)


def test_packaged_mtbench_has_80_questions_judge_prompts_and_references() -> None:
    questions = _records(DATA / "mtbench" / "question.jsonl")
    assert len(questions) == 80
    assert all(len(question["turns"]) == 2 for question in questions)
    judge_prompts = {record["name"] for record in _records(DATA / "mtbench" / "judge_prompts.jsonl")}
    needed = {"single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"}
    assert needed <= judge_prompts
    assert _records(DATA / "mtbench" / "reference_answer_gpt-4.jsonl")


def test_notice_lists_the_sha256_of_every_packaged_data_file() -> None:
    listed = {
        match["path"]: match["sha256"] for match in NOTICE_ROW.finditer((DATA / "NOTICE.md").read_text())
    }
    shipped = sorted(path.relative_to(DATA).as_posix() for path in DATA.rglob("*.jsonl"))
    assert sorted(listed) == shipped
    for name, sha256 in listed.items():
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert digest == sha256, f"{name} is not the upstream file NOTICE.md describes"


def test_the_apache_licence_ships_with_the_data() -> None:
    text = (DATA / "LICENSE-APACHE-2.0.txt").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_default_data_points_inside_the_installed_client_package() -> None:
    package = Path(client.__file__).resolve().parent
    ifeval = Path(default_data("ifeval")).resolve()
    mtbench = Path(default_data("mtbench")).resolve()
    assert ifeval == package / "data" / "ifeval" / "input_data.jsonl" and ifeval.is_file()
    assert mtbench == package / "data" / "mtbench" and (mtbench / "question.jsonl").is_file()
