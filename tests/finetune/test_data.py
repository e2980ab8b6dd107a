"""Tests for finetune.data: every source, every format, every bad case, dedupe, limit and the split."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from finetune.config import DataConfig
from finetune.data import DataError, Record, load_data, read_records

ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
ALPACA_INPUT = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?", "name": "bob"},
        {"role": "assistant", "content": "Rome."},
    ]
}
PROMPT_COMPLETION = {"prompt": "The sky is", "completion": " blue."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, arguments: Any, name: str = "get_weather") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# OpenAI's shape: two calls answered by two tool messages, then a final answer; then a turn ending in a call.
TOOL_CHAT = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("c1", '{"city": "Paris"}'), call("c2", {"city": "Oslo"})],
        },
        {"role": "tool", "tool_call_id": "c2", "content": '{"temperature": 3}'},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21 degrees in Paris, 3 in Oslo."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c3", '{"city": "Rome"}')]},
    ],
}


def tool_chat(*replace: tuple[int, dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """TOOL_CHAT with some messages replaced (index, message) and top-level fields set."""
    messages = [dict(message) for message in TOOL_CHAT["messages"]]
    for index, message in replace:
        messages[index] = message
    return {**TOOL_CHAT, "messages": messages, **fields}


USER, CALLS = TOOL_CHAT["messages"][0], TOOL_CHAT["messages"][1]
TOOL_BAD_CASES = [
    (
        "arguments not JSON",
        tool_chat((1, {**CALLS, "tool_calls": [call("c1", '{"city": "Par'), call("c2", "{}")]})),
        "field 'messages[1].tool_calls[0].function.arguments': is not valid JSON",
    ),
    (
        "arguments not an object",
        tool_chat((1, {**CALLS, "tool_calls": [call("c1", "{}"), call("c2", '["Oslo"]')]})),
        "field 'messages[1].tool_calls[1].function.arguments': must be a JSON object (as a string or an "
        "object), not list",
    ),
    (
        "tool message without tool_call_id",
        tool_chat((2, {"role": "tool", "content": "3"})),
        "field 'messages[2].tool_call_id': must name the tool call this result answers, one of 'c1', 'c2'",
    ),
    (
        "tool message answering an unknown call",
        tool_chat((3, {"role": "tool", "tool_call_id": "c2", "content": "21"})),
        "field 'messages[3].tool_call_id': 'c2' is not an unanswered tool call of the assistant message "
        "before it ('c1')",
    ),
    (
        "a call left unanswered",
        tool_chat((3, {"role": "assistant", "content": "Done."})),
        "field 'messages[3].role': expected 'tool' answering tool call 'c1'",
    ),
    (
        "tool message without a call",
        {"messages": [USER, {"role": "tool", "tool_call_id": "c1", "content": "x"}, CALLS]},
        "field 'messages[1].role': a 'tool' message must answer a tool call",
    ),
    (
        "tool result not a string",
        tool_chat((2, {"role": "tool", "tool_call_id": "c2", "content": {"temperature": 3}})),
        "field 'messages[2].content': must be the tool's result as a string",
    ),
    (
        "call without id",
        tool_chat((1, {**CALLS, "tool_calls": [{"type": "function", "function": {"name": "get_weather"}}]})),
        "field 'messages[1].tool_calls[0].id': must be a non-empty string",
    ),
    (
        "call of a tool not offered",
        tool_chat((1, {**CALLS, "tool_calls": [call("c1", "{}", "get_wether"), call("c2", "{}")]})),
        "field 'messages[1].tool_calls[0].function.name': 'get_wether' is not one of the record's tools "
        "(get_weather)",
    ),
    (
        "empty tool_calls",
        tool_chat((1, {**CALLS, "tool_calls": []})),
        "field 'messages[1].tool_calls': must be a non-empty list",
    ),
    ("tools not a list", tool_chat(tools={"get_weather": {}}), "field 'tools': must be a non-empty list"),
    (
        "tool not a function tool",
        tool_chat(tools=[{"name": "get_weather"}]),
        'field \'tools[0]\': must be {"type": "function"',
    ),
    (
        "tool offered twice",
        tool_chat(tools=[WEATHER_TOOL, WEATHER_TOOL]),
        "field 'tools[1].function.name': 'get_weather' is offered twice",
    ),
]


def numbered(count: int) -> list[dict[str, Any]]:
    return [{"instruction": f"Say {i}.", "output": str(i)} for i in range(count)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Columnar: every row gets every column (None where a record lacks it), as in real mixed files.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}


def cfg(path: Path | str, **fields: Any) -> DataConfig:
    fields.setdefault("eval_fraction", 0.0)
    return DataConfig(path=str(path), **fields)


# ---------------------------------------------------------------- formats and sources


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "auto"])
def test_alpaca_from_every_file_type(tmp_path: Path, ext: str, fmt: str) -> None:
    path = WRITERS[ext](tmp_path / f"train.{ext}", [ALPACA, ALPACA_INPUT])
    records, n_bad, _, formats = read_records(str(path), cfg(path, format=fmt))
    assert n_bad == 0
    assert formats == {"alpaca": 2}
    assert records[0].to_messages() == [
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "4"},
    ]
    assert records[1].messages == (("user", "Translate to French.\n\ncat"), ("assistant", "chat"))
    assert records[0].raw is None


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_chat_from_every_file_type(tmp_path: Path, ext: str) -> None:
    path = WRITERS[ext](tmp_path / f"train.{ext}", [CHAT, MULTI_TURN])
    records, _, _, formats = read_records(str(path), cfg(path, format="chat"))
    assert formats == {"chat": 2}
    assert records[0].messages == (("user", "Hi"), ("assistant", "Hello!"))
    # Multi-turn kept whole, system first, extra keys such as "name" ignored.
    assert records[1].messages == (
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    )


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_prompt_completion_from_every_file_type(tmp_path: Path, ext: str) -> None:
    path = WRITERS[ext](tmp_path / f"train.{ext}", [PROMPT_COMPLETION])
    records, _, _, formats = read_records(str(path), cfg(path, format="prompt_completion"))
    assert formats == {"prompt_completion": 1}
    assert records[0].messages == (("user", "The sky is"), ("assistant", " blue."))
    assert records[0].raw is None


def test_origins_name_file_and_position(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    records, *_ = read_records(str(jsonl), cfg(jsonl))
    assert [r.origin for r in records] == [f"{jsonl}:1", f"{jsonl}:3"]  # blank line 2 skipped, still counted
    json_path = write_json(tmp_path / "b.json", [ALPACA, CHAT])
    assert read_records(str(json_path), cfg(json_path))[0][1].origin == f"{json_path} record 2"
    parquet = write_parquet(tmp_path / "c.parquet", [ALPACA, ALPACA_INPUT])
    assert read_records(str(parquet), cfg(parquet))[0][1].origin == f"{parquet} row 2"


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_auto_detects_each_record_in_a_mixed_file(tmp_path: Path, ext: str) -> None:
    # In parquet every row has every column (None where absent); detection must still work.
    path = WRITERS[ext](tmp_path / f"mixed.{ext}", [ALPACA, CHAT, PROMPT_COMPLETION, MULTI_TURN])
    records, n_bad, _, formats = read_records(str(path), cfg(path))
    assert n_bad == 0
    assert formats == {"alpaca": 1, "chat": 2, "prompt_completion": 1}
    assert [len(r.messages) for r in records] == [2, 2, 2, 5]


def test_system_prompt_added_only_where_missing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, CHAT, MULTI_TURN, PROMPT_COMPLETION])
    records, *_ = read_records(str(path), cfg(path, system_prompt="You help."))
    assert [r.messages[0] for r in records] == [
        ("system", "You help."),
        ("system", "You help."),
        ("system", "Be brief."),
        ("system", "You help."),
    ]
    assert records[0].messages[1:] == (("user", "Add 2 and 2."), ("assistant", "4"))


def test_raw_prompt_completion_style(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [PROMPT_COMPLETION, ALPACA])
    records, *_ = read_records(str(path), cfg(path, prompt_completion_style="raw", system_prompt="S"))
    assert records[0].raw == ("The sky is", " blue.")
    assert records[0].messages == ()
    assert records[0].to_messages() == []
    # raw style changes only prompt/completion records, and a system prompt is never put on raw text.
    assert records[1].raw is None
    assert records[1].messages[0] == ("system", "S")


def test_save_to_disk_folder_loads_through_datasets(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([ALPACA, ALPACA_INPUT]).save_to_disk(str(folder))
    train, evaluation, report = load_data(cfg(folder), seed=0)
    assert [r.messages for r in train] == [
        (("user", "Add 2 and 2."), ("assistant", "4")),
        (("user", "Translate to French.\n\ncat"), ("assistant", "chat")),
    ]
    assert evaluation == []
    assert train[1].origin == f"{folder} row 2"
    assert report.formats == {"alpaca": 2}


def test_save_to_disk_dataset_dict_uses_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([CHAT]), "test": datasets.Dataset.from_list([MULTI_TURN])}
    ).save_to_disk(str(folder))
    records, *_ = read_records(str(folder), cfg(folder, split="test"))
    assert records[0].origin == f"{folder}[test] row 1"
    assert len(records[0].messages) == 5
    with pytest.raises(DataError, match=r"no split 'validation'.*data\.split"):
        read_records(str(folder), cfg(folder, split="validation"))


def test_hub_id_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, str]] = []

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        calls.append((path, split))
        return datasets.Dataset.from_list([ALPACA, ALPACA, ALPACA_INPUT])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, _, report = load_data(cfg("tatsu-lab/alpaca", split="train"), seed=0)
    assert calls == [("tatsu-lab/alpaca", "train")]
    assert [r.origin for r in train] == ["tatsu-lab/alpaca[train] row 1", "tatsu-lab/alpaca[train] row 3"]
    assert report.n_duplicates == 1


def test_hub_load_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing_load_dataset(path: str, split: str) -> None:
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(
        DataError, match=r"nobody/nothing: could not load dataset split 'train'.*check the id"
    ):
        load_data(cfg("nobody/nothing"), seed=0)


# ---------------------------------------------------------------- bad records


BAD_CASES: list[tuple[str, str, Any, str]] = [
    # (id, format, record, expected text besides file and line)
    ("missing output", "alpaca", {"instruction": "x"}, "field 'output': is missing"),
    ("missing instruction, auto", "auto", {"output": "x"}, "field 'instruction': is missing"),
    (
        "wrong type",
        "alpaca",
        {"instruction": "x", "output": 4},
        "field 'output': must be a non-empty string, not int",
    ),
    (
        "empty string",
        "auto",
        {"instruction": "  ", "output": "y"},
        "field 'instruction': must be a non-empty string",
    ),
    (
        "input not a string",
        "alpaca",
        {"instruction": "x", "input": ["a"], "output": "y"},
        "field 'input': must be",
    ),
    ("explicit format, other shape", "alpaca", CHAT, "field 'instruction': is missing"),
    ("missing prompt", "prompt_completion", {"completion": "x"}, "field 'prompt': is missing"),
    (
        "empty completion",
        "auto",
        {"prompt": "x", "completion": ""},
        "field 'completion': must be a non-empty",
    ),
    ("messages not a list", "chat", {"messages": "hi"}, "field 'messages': must be a non-empty list"),
    ("messages empty", "auto", {"messages": []}, "field 'messages': must be a non-empty list"),
    ("message not object", "chat", {"messages": ["hi"]}, "field 'messages[0]': must be an object"),
    (
        "bad role",
        "chat",
        {"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "b"}]},
        "field 'messages[1].role': 'function' is not one of system, user, assistant, tool",
    ),
    ("missing role", "chat", {"messages": [{"content": "a"}]}, "field 'messages[0].role': is missing"),
    (
        "empty content",
        "chat",
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]},
        "field 'messages[0].content': must be a non-empty string",
    ),
    (
        "non-alternating",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        "field 'messages[1].role': expected 'assistant' after 'user', got 'user'",
    ),
    (
        "starts with assistant",
        "chat",
        {"messages": [{"role": "assistant", "content": "a"}]},
        "field 'messages[0].role': expected 'user'",
    ),
    (
        "late system message",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "system", "content": "c"},
            ]
        },
        "field 'messages[2].role': a system message may only come first",
    ),
    (
        "ends with user",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                CHAT["messages"][0],
            ]
        },
        "field 'messages[2].role': the conversation must end with an assistant turn, not 'user'",
    ),
    (
        "only a system message",
        "chat",
        {"messages": [{"role": "system", "content": "a"}]},
        "field 'messages[0].role': the conversation must end with an assistant turn, not 'system'",
    ),
    (
        "unknown shape in auto",
        "auto",
        {"question": "q", "answer": "a"},
        "matches no known format (it has keys: question, answer); expected one of alpaca",
    ),
    ("not an object", "auto", ["a", "b"], "must be a JSON object"),
    *[(f"tools: {name}", "chat", row, expected) for name, row, expected in TOOL_BAD_CASES],
]


@pytest.mark.parametrize(
    ("fmt", "row", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_record_names_file_line_and_field(tmp_path: Path, fmt: str, row: Any, expected: str) -> None:
    good = {"chat": CHAT, "prompt_completion": PROMPT_COMPLETION}.get(fmt, ALPACA)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as caught:
        load_data(cfg(path, format=fmt), seed=0)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ")
    assert expected in message
    assert "on_bad_record=skip" in message


def test_bad_record_in_json_and_parquet_names_record_and_row(tmp_path: Path) -> None:
    bad = {"instruction": "x", "output": ""}
    json_path = write_json(tmp_path / "bad.json", [ALPACA, ALPACA_INPUT, bad])
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(json_path))} record 3: field 'output': must be a non-empty string"
    ):
        load_data(cfg(json_path), seed=0)
    parquet = write_parquet(tmp_path / "bad.parquet", [ALPACA, bad])
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(parquet))} row 2: field 'output': must be a non-empty string"
    ):
        load_data(cfg(parquet), seed=0)


def test_invalid_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        load_data(cfg(path), seed=0)


def test_invalid_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: invalid JSON at line 2 .*name the file \.jsonl"
    ):
        load_data(cfg(path), seed=0)
    write_json(path, {"data": [ALPACA]})  # type: ignore[arg-type]
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: a \.json file must hold a list of objects, not a dict"
    ):
        load_data(cfg(path), seed=0)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: holds no records"):
        load_data(cfg(path), seed=0)
    json_path = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match=rf"^{re.escape(str(json_path))}: holds no records"):
        load_data(cfg(json_path), seed=0)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\nx,y\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))}: unsupported file type '\.csv'; use one of "
        r"\.jsonl, \.json, \.parquet, a folder saved with datasets' save_to_disk, or a hub dataset id$",
    ):
        load_data(cfg(path), seed=0)


@pytest.mark.parametrize("name", ["missing.jsonl", "data/missing.jsonl", "missing"])
def test_missing_file_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import datasets

    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a local-looking path must not reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(name))}: not found"):
        load_data(cfg(name), seed=0)
    absolute = tmp_path / name
    with pytest.raises(DataError, match=rf"^{re.escape(str(absolute))}: not found"):
        load_data(cfg(absolute), seed=0)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable parquet file"):
        load_data(cfg(path), seed=0)


def test_skip_mode_counts_every_bad_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(row) for row in numbered(3)]
    bad = [json.dumps({"question": "q"}) for _ in range(6)] + ["{not json"]
    lines = [line.encode() for line in (good[0], *bad)] + [
        b'{"output": "\xff"}',
        *(g.encode() for g in good[1:]),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        train, evaluation, report = load_data(cfg(path, on_bad_record="skip"), seed=0)
    assert len(train) == 3 and evaluation == []
    assert report.n_bad_skipped == 8
    assert report.n_read == 11
    assert len(report.bad_examples) == 5
    assert report.bad_examples[0].startswith(f"{path}:2: record matches no known format")
    assert any("skipped 8 bad record(s)" in r.getMessage() for r in caplog.records)


def test_skip_mode_with_nothing_valid_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"question": "q"}, {"output": ""}])
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: no valid records \(2 bad record\(s\) skipped\)"
    ):
        load_data(cfg(path, on_bad_record="skip"), seed=0)


# ---------------------------------------------------------------- dedupe, limit, split, hash


def test_dedupe_keeps_first_and_counts_the_rest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dup.jsonl", [ALPACA, CHAT, ALPACA, ALPACA, CHAT, PROMPT_COMPLETION])
    train, _, report = load_data(cfg(path), seed=0)
    assert [r.origin for r in train] == [f"{path}:1", f"{path}:2", f"{path}:6"]
    assert report.n_duplicates == 3
    assert report.n_read == 6
    train, _, report = load_data(cfg(path, dedupe=False), seed=0)
    assert len(train) == 6 and report.n_duplicates == 0


def test_dedupe_compares_normalized_content(tmp_path: Path) -> None:
    # An alpaca record and a chat record with the same conversation are the same training example.
    same_as_alpaca = {
        "messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]
    }
    path = write_jsonl(tmp_path / "dup.jsonl", [ALPACA, same_as_alpaca])
    _, _, report = load_data(cfg(path), seed=0)
    assert report.n_duplicates == 1 and report.n_train == 1


def test_limit_applies_after_dedupe(tmp_path: Path) -> None:
    rows = numbered(10)
    path = write_jsonl(tmp_path / "many.jsonl", [rows[0], rows[0], *rows[1:]])
    train, _, report = load_data(cfg(path, limit=4), seed=0)
    assert [r.messages[0][1] for r in train] == ["Say 0.", "Say 1.", "Say 2.", "Say 3."]
    assert report.n_duplicates == 1
    assert report.n_beyond_limit == 6
    assert report.n_read == report.n_train + report.n_eval + report.n_duplicates + report.n_beyond_limit


@pytest.mark.parametrize(
    ("n", "fraction", "n_eval"),
    [(100, 0.05, 5), (30, 0.1, 3), (10, 0.05, 1), (2, 0.5, 1), (2, 0.9, 1), (1, 0.5, 0), (5, 0.0, 0)],
)
def test_split_sizes(tmp_path: Path, n: int, fraction: float, n_eval: int) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", numbered(n))
    train, evaluation, report = load_data(cfg(path, eval_fraction=fraction), seed=1)
    assert (len(train), len(evaluation)) == (n - n_eval, n_eval)
    assert (report.n_train, report.n_eval) == (n - n_eval, n_eval)


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", numbered(50))
    config = cfg(path, eval_fraction=0.2)
    train_a, eval_a, report_a = load_data(config, seed=7)
    train_b, eval_b, report_b = load_data(config, seed=7)
    assert (train_a, eval_a, report_a.data_hash) == (train_b, eval_b, report_b.data_hash)
    assert len(eval_a) == 10
    train_keys = {r.messages for r in train_a}
    assert train_keys.isdisjoint(r.messages for r in eval_a)
    assert len(train_keys | {r.messages for r in eval_a}) == 50
    _, eval_c, report_c = load_data(config, seed=8)
    assert eval_c != eval_a and report_c.data_hash != report_a.data_hash


def test_eval_path_removes_overlap_from_train(tmp_path: Path) -> None:
    rows = numbered(6)
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_path = write_json(tmp_path / "eval.json", [rows[1], rows[4], rows[4], CHAT])
    train, evaluation, report = load_data(
        cfg(train_path, eval_path=str(eval_path), eval_fraction=0.5), seed=0
    )
    assert [r.messages[0][1] for r in train] == ["Say 0.", "Say 2.", "Say 3.", "Say 5."]
    assert [r.origin for r in evaluation] == [f"{eval_path} record {i}" for i in (1, 2, 4)]
    assert report.n_duplicates == 3  # one inside eval, two train records also in eval
    assert report.n_read == 10
    assert report.formats == {"alpaca": 9, "chat": 1}
    assert report.source == f"{train_path} + eval {eval_path}"
    assert {r.messages for r in train}.isdisjoint(r.messages for r in evaluation)


def test_eval_path_all_overlapping_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "same.jsonl", [ALPACA])
    with pytest.raises(DataError, match="no training records left"):
        load_data(cfg(path, eval_path=str(path)), seed=0)


def test_data_hash_stable_and_sensitive_to_content_not_origin(tmp_path: Path) -> None:
    rows = numbered(8)
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_json(tmp_path / "b.json", rows)  # same content, other file and origins
    hash_a = load_data(cfg(first, eval_fraction=0.25), seed=3)[2].data_hash
    assert hash_a == load_data(cfg(second, eval_fraction=0.25), seed=3)[2].data_hash
    assert len(hash_a) == 64 and int(hash_a, 16) >= 0
    changed = write_jsonl(tmp_path / "c.jsonl", [*rows[:-1], {"instruction": "Say 7.", "output": "seven"}])
    assert load_data(cfg(changed, eval_fraction=0.25), seed=3)[2].data_hash != hash_a
    raw = write_jsonl(tmp_path / "raw.jsonl", [PROMPT_COMPLETION])
    assert (
        load_data(cfg(raw, prompt_completion_style="raw"), seed=0)[2].data_hash
        != load_data(cfg(raw), seed=0)[2].data_hash
    )


def test_summary_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", numbered(4))
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        load_data(cfg(path, eval_fraction=0.25), seed=0)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "finetune.data"]
    assert f"data {path}: read 4 (alpaca=4)" in line and "3 train / 1 eval" in line


def test_record_is_hashable_and_frozen() -> None:
    record = Record(messages=(("user", "a"), ("assistant", "b")), origin="x:1")
    assert {record: 1}[record] == 1
    with pytest.raises(AttributeError):
        record.origin = "y"  # type: ignore[misc]
    assert record.to_messages()[1] == {"role": "assistant", "content": "b"}


def test_tool_use_chats_keep_tools_calls_and_results(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "plain.jsonl", [CHAT])
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT, CHAT])
    records, n_bad, _, formats = read_records(str(path), cfg(path))
    assert (n_bad, formats) == (0, {"chat": 2})
    assert records[0].tool_list() == [WEATHER_TOOL]
    assert records[1].tool_list() is None and records[1].tools is None
    messages = records[0].to_messages()
    # OpenAI's shape back, each call as given (finetune.prompting parses the JSON-string arguments).
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": TOOL_CHAT["messages"][1]["tool_calls"],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "c2", "content": '{"temperature": 3}'}
    assert messages[6]["content"] == "Checking."
    assert messages == [{**message, "content": message.get("content")} for message in TOOL_CHAT["messages"]]
    # A chat without tools hashes as it did before records could carry tools.
    (record,) = read_records(str(plain), cfg(plain))[0]
    canonical = json.dumps(
        {"train": [{"messages": [list(turn) for turn in record.messages]}], "eval": []},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert load_data(cfg(plain), seed=0)[2].data_hash == hashlib.sha256(canonical.encode()).hexdigest()
    # The tools are content: the same chat offering other tools is another record.
    other_tools = tool_chat(tools=[WEATHER_TOOL, {"type": "function", "function": {"name": "get_time"}}])
    both = write_jsonl(tmp_path / "both.jsonl", [TOOL_CHAT, other_tools, TOOL_CHAT])
    train, _, report = load_data(cfg(both), seed=0)
    assert (len(train), report.n_duplicates) == (2, 1)


def test_tool_use_chats_from_parquet(tmp_path: Path) -> None:
    """Columnar files give every message every key (None where it lacks one); those are absent, not bad."""
    # Arrow needs one type per column: the calls' arguments are all strings here, as OpenAI sends them.
    calls = [call("c1", '{"city": "Paris"}'), call("c2", "{}")]
    path = write_parquet(tmp_path / "tools.parquet", [tool_chat((1, {**CALLS, "tool_calls": calls})), CHAT])
    records, n_bad, _, _ = read_records(str(path), cfg(path))
    assert n_bad == 0
    assert [call["id"] for call in records[0].to_messages()[1]["tool_calls"]] == ["c1", "c2"]
    assert records[0].tool_list() == [WEATHER_TOOL]
    assert records[1].to_messages() == CHAT["messages"] and records[1].tools is None


def test_tools_only_in_chat_records(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{**ALPACA, "tools": [WEATHER_TOOL]}])
    with pytest.raises(DataError, match="field 'tools': only chat records"):
        load_data(cfg(path), seed=0)
