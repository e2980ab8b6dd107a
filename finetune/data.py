"""Instruction data in, validated normalized records out: alpaca, chat and prompt/completion
records from local .jsonl/.json/.parquet files, `save_to_disk` folders or hub datasets.

Every problem names the file, the line or row and the field, and says what to fix; nothing is dropped
without being counted (bad records, duplicates and records beyond `limit` all appear in the report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import PARENT_DATA, DataConfig, DataSource
from tuneserve.hub import is_hub_id

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
MAX_BAD_EXAMPLES = 5

# A missing path ending like a data file is a typo'd local path, never a hub id.
_FILE_LIKE_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".csv", ".tsv", ".txt", ".arrow")
_SHAPES = (
    "alpaca {instruction, input?, output}, chat {messages: [{role, content}, ...], tools?}, "
    "prompt_completion {prompt, completion}"
)


class DataError(ValueError):
    """Data that cannot be used; the message names the file, line/row and field, and says what to fix."""


class _BadRecord(Exception):
    """One record that fails validation; `load_data` raises it as a DataError or counts it."""


Turn = tuple[str, str] | tuple[str, str, str]
"""One message: (role, content); tool use adds a third item, the assistant's tool calls as JSON text
(("assistant", content or "", calls)) or the call a tool message answers (("tool", content, tool_call_id))."""


@dataclass(frozen=True)
class Record:
    """One normalized training example: a conversation (with the tools it may call), or a raw
    (prompt, completion) pair."""

    messages: tuple[Turn, ...]
    raw: tuple[str, str] | None = None
    origin: str = ""
    tools: str | None = None
    """The OpenAI function tools offered in the conversation, as JSON text (hashable, order kept)."""

    def to_messages(self) -> list[dict[str, Any]]:
        """The conversation as OpenAI chat messages (tool calls with JSON-string arguments); empty for raw
        records. finetune.prompting adapts them to the chat template, as it does the server's."""
        messages: list[dict[str, Any]] = []
        for turn in self.messages:
            role, content = turn[0], turn[1]
            if len(turn) == 2:
                messages.append({"role": role, "content": content})
            elif role == "assistant":
                messages.append({"role": role, "content": content or None, "tool_calls": json.loads(turn[2])})
            else:
                messages.append({"role": role, "tool_call_id": turn[2], "content": content})
        return messages

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools to render with the conversation, or None."""
        return None if self.tools is None else list(json.loads(self.tools))

    def content_key(self) -> tuple[tuple[Turn, ...], tuple[str, str] | None, str | None]:
        """What makes two records duplicates: their content, not where they came from."""
        return (self.messages, self.raw, self.tools)


@dataclass
class DataReport:
    """What `load_data` read and what became of every record (for the run log and metadata)."""

    source: str
    n_read: int
    n_bad_skipped: int
    n_duplicates: int
    n_train: int
    n_eval: int
    formats: dict[str, int]
    bad_examples: list[str]
    data_hash: str
    n_beyond_limit: int = 0
    """Records dropped because `limit` was reached; n_read is the sum of all the counts."""
    sources: list[dict[str, Any]] | None = None
    """With data.sources: each source's counts (read, bad, duplicates, across sources, sampled, eval)."""

    def summary(self) -> str:
        formats = ", ".join(f"{name}={count}" for name, count in sorted(self.formats.items()))
        return (
            f"data {self.source}: read {self.n_read} ({formats}), {self.n_bad_skipped} bad skipped, "
            f"{self.n_duplicates} duplicates, {self.n_beyond_limit} beyond limit -> "
            f"{self.n_train} train / {self.n_eval} eval, hash {self.data_hash[:12]}"
        )


# ---------------------------------------------------------------- validation of one record


def _present(row: dict[str, Any], key: str) -> bool:
    # Columnar sources (parquet, datasets) give every row every column, None where a record lacks it.
    return key in row and row[key] is not None


def _text(row: dict[str, Any], key: str, where: str | None = None) -> str:
    name = where or key
    if not _present(row, key):
        raise _BadRecord(f"field '{name}': is missing (it must be a non-empty string)")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRecord(f"field '{name}': must be a non-empty string, not {type(value).__name__}")
    if not value.strip():
        raise _BadRecord(f"field '{name}': must be a non-empty string")
    return value


def _keys(row: dict[str, Any]) -> str:
    keys = [key for key in row if row[key] is not None]
    return f"it has keys: {', '.join(keys)}" if keys else "it has no fields"


def _detect_format(row: dict[str, Any]) -> str:
    # Checked in order of how distinctive a key is, so a record with a typo in one field is still
    # reported against its intended format ("field 'output': is missing") instead of as unknown.
    if _present(row, "messages"):
        return "chat"
    if _present(row, "instruction") or _present(row, "output"):
        return "alpaca"
    if _present(row, "prompt") or _present(row, "completion"):
        return "prompt_completion"
    raise _BadRecord(f"record matches no known format ({_keys(row)}); expected one of {_SHAPES}")


def _alpaca(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    instruction = _text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _BadRecord(f"field 'input': must be a string (or absent), not {type(extra).__name__}")
    output = _text(row, "output")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return (("user", prompt), ("assistant", output))


def _chat(row: dict[str, Any]) -> tuple[tuple[Turn, ...], str | None]:
    if not _present(row, "messages"):
        raise _BadRecord("field 'messages': is missing (it must be a list of {role, content} objects)")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadRecord("field 'messages': must be a non-empty list of {role, content} objects")
    tools = _tools(row["tools"]) if _present(row, "tools") else None
    tool_names = None if tools is None else {tool["function"]["name"] for tool in tools}
    turns: list[Turn] = []
    unanswered: list[str] = []  # ids of the last assistant's tool calls that no tool message answered yet
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _BadRecord(f"field '{where}': must be an object with 'role' and 'content'")
        role = message.get("role")
        if role is None:
            raise _BadRecord(f"field '{where}.role': is missing (it must be one of {', '.join(ROLES)})")
        if role not in ROLES:
            raise _BadRecord(f"field '{where}.role': {role!r} is not one of {', '.join(ROLES)}")
        if role == "system":
            if index != 0:
                raise _BadRecord(f"field '{where}.role': a system message may only come first")
        elif unanswered:
            if role != "tool":
                raise _BadRecord(
                    f"field '{where}.role': expected 'tool' answering tool call {unanswered[0]!r} of the "
                    f"assistant's tool calls, got '{role}' (every tool call needs its result before the "
                    "conversation goes on)"
                )
        elif role == "tool":
            raise _BadRecord(
                f"field '{where}.role': a 'tool' message must answer a tool call of the assistant message "
                "before it, and none is left unanswered"
            )
        else:
            previous = turns[-1][0] if turns else "system"
            expected = "user" if previous in ("system", "assistant") else "assistant"
            if role != expected:
                raise _BadRecord(
                    f"field '{where}.role': expected '{expected}' after '{previous}', got '{role}' "
                    "(turns must alternate user/assistant, starting with user)"
                )
        if role == "tool":
            content = _tool_content(message, where)
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _BadRecord(
                    f"field '{where}.tool_call_id': must name the tool call this result answers, one of "
                    f"{', '.join(repr(i) for i in unanswered)}"
                )
            if call_id not in unanswered:
                raise _BadRecord(
                    f"field '{where}.tool_call_id': {call_id!r} is not an unanswered tool call of the "
                    f"assistant message before it ({', '.join(repr(i) for i in unanswered)})"
                )
            unanswered.remove(call_id)
            turns.append((role, content, call_id))
        elif role == "assistant" and _present(message, "tool_calls"):
            calls = _tool_calls(message["tool_calls"], f"{where}.tool_calls", tool_names)
            text = message.get("content")
            if text is not None and not isinstance(text, str):
                raise _BadRecord(
                    f"field '{where}.content': must be a string or null beside tool_calls, "
                    f"not {type(text).__name__}"
                )
            unanswered = [call["id"] for call in calls]
            turns.append((role, text or "", json.dumps(calls, ensure_ascii=False)))
        else:
            turns.append((role, _text(message, "content", f"{where}.content")))
    if turns[-1][0] != "assistant":
        last = f"messages[{len(turns) - 1}]"
        raise _BadRecord(
            f"field '{last}.role': the conversation must end with an assistant turn, not '{turns[-1][0]}'"
        )
    return tuple(turns), None if tools is None else json.dumps(tools, ensure_ascii=False)


def _tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI function tools: [{type: "function", function: {name, description?, parameters?}}]."""
    if not isinstance(tools, list) or not tools:
        raise _BadRecord(
            'field \'tools\': must be a non-empty list of {"type": "function", "function": {name, '
            "description, parameters}} objects (leave it out when the conversation offers no tools)"
        )
    names: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise _BadRecord(
                f'field \'{where}\': must be {{"type": "function", "function": {{name, description, '
                "parameters}}}} (OpenAI's function tool)"
            )
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _BadRecord(f"field '{where}.function.name': must be a non-empty string")
        if name in names:
            raise _BadRecord(f"field '{where}.function.name': {name!r} is offered twice")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _BadRecord(
                f"field '{where}.function.parameters': must be a JSON Schema object, "
                f"not {type(parameters).__name__}"
            )
    return tools


def _tool_calls(calls: Any, where: str, tool_names: set[str] | None) -> list[dict[str, Any]]:
    """An assistant's tool calls in OpenAI's shape, arguments kept as given (a JSON string or an object)."""
    if not isinstance(calls, list) or not calls:
        raise _BadRecord(
            f"field '{where}': must be a non-empty list of "
            '{"id", "type": "function", "function": {"name", "arguments"}} objects'
        )
    ids: set[str] = set()
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise _BadRecord(
                f"field '{at}': must be an object {{id, type, function}}, not {type(call).__name__}"
            )
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise _BadRecord(
                f"field '{at}.id': must be a non-empty string (tool messages answer it by this id)"
            )
        if call_id in ids:
            raise _BadRecord(f"field '{at}.id': {call_id!r} is used by an earlier call of the same message")
        ids.add(call_id)
        if call.get("type", "function") != "function":
            raise _BadRecord(f"field '{at}.type': {call.get('type')!r} is not 'function'")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _BadRecord(f"field '{at}.function': must be an object {{name, arguments}}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _BadRecord(f"field '{at}.function.name': must be a non-empty string")
        if tool_names is not None and name not in tool_names:
            raise _BadRecord(
                f"field '{at}.function.name': {name!r} is not one of the record's tools "
                f"({', '.join(sorted(tool_names))})"
            )
        arguments = function.get("arguments")
        parsed = arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise _BadRecord(
                    f"field '{at}.function.arguments': is not valid JSON ({exc.msg} at column {exc.colno}); "
                    'it must be a JSON object, as a string (OpenAI\'s shape: "{\\"city\\": \\"Paris\\"}") or '
                    "an object"
                ) from None
        if not isinstance(parsed, dict):
            raise _BadRecord(
                f"field '{at}.function.arguments': must be a JSON object (as a string or an object), "
                f"not {type(parsed).__name__}"
            )
    return calls


def _tool_content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise _BadRecord(
            f"field '{where}.content': must be the tool's result as a string (JSON text, say), "
            f"not {type(content).__name__}"
        )
    return content


def _record(row: Any, origin: str, cfg: DataConfig) -> tuple[Record, str]:
    """Validate and normalize one raw record; returns the record and its format, or raises _BadRecord."""
    if not isinstance(row, dict):
        raise _BadRecord(f"record must be a JSON object with named fields, not {type(row).__name__}")
    fmt = _detect_format(row) if cfg.format == "auto" else cfg.format
    raw: tuple[str, str] | None = None
    tools: str | None = None
    messages: tuple[Turn, ...]
    if fmt != "chat" and _present(row, "tools"):
        raise _BadRecord(f"field 'tools': only chat records ({{messages, tools}}) can offer tools, not {fmt}")
    if fmt == "alpaca":
        messages = _alpaca(row)
    elif fmt == "chat":
        messages, tools = _chat(row)
    else:
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        if cfg.prompt_completion_style == "raw":
            messages, raw = (), (prompt, completion)
        else:
            messages = (("user", prompt), ("assistant", completion))
    if cfg.system_prompt and messages and messages[0][0] != "system":
        messages = (("system", cfg.system_prompt), *messages)
    return Record(messages=messages, raw=raw, origin=origin, tools=tools), fmt


# ---------------------------------------------------------------- sources


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            origin = f"{name}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield origin, _BadRecord(f"line is not UTF-8 text ({exc.reason}); re-save the file as UTF-8")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield origin, json.loads(text)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
                yield origin, _BadRecord(problem)


def _json_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); a .json file "
            "must hold one list of objects (for one object per line, name the file .jsonl)"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{name}: a .json file must hold a list of objects, not a {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{name} record {number}", row


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{name}: not a readable parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{name} row {number}", row


def _dataset_rows(dataset: Any, label: str) -> Iterator[tuple[str, Any]]:
    number = 0
    for batch in dataset.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns), strict=True):
            number += 1
            yield f"{label} row {number}", dict(zip(columns, values, strict=True))


def _saved_dataset_rows(path: Path, name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{name}: has no split {split!r} (it has {', '.join(loaded)}); "
                    "set data.split to one of them"
                )
            return _dataset_rows(loaded[split], f"{name}[{split}]")
        return _dataset_rows(loaded, name)
    # A plain folder of data files: let `datasets` pick the builder from the file types.
    return _hub_rows(str(path), split, name)


def _hub_rows(path: str, split: str, name: str | None = None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets raises many types (not found, no access, offline, bad split)
        raise DataError(
            f"{name or path}: could not load dataset split {split!r} ({type(exc).__name__}: {exc}); "
            "check the id, data.split, your network and `hf auth login` for gated datasets"
        ) from exc
    return _dataset_rows(dataset, f"{name or path}[{split}]")


def _rows(path: str, split: str) -> Iterator[tuple[str, Any]]:
    """(origin, raw record) pairs from any supported source; a raw record may be a _BadRecord."""
    local = Path(path).expanduser()
    if local.is_dir():
        return _saved_dataset_rows(local, path, split)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_rows(local, path)
        if suffix == ".json":
            return _json_rows(local, path)
        if suffix == ".parquet":
            return _parquet_rows(local, path)
        raise DataError(
            f"{path}: unsupported file type {local.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, a folder saved with datasets' save_to_disk, "
            "or a hub dataset id"
        )
    if path.lower().endswith(_FILE_LIKE_SUFFIXES) or not is_hub_id(path, owner_required=True):
        raise DataError(
            f"{path}: not found; give an existing .jsonl/.json/.parquet file or folder, or a hub dataset id "
            "such as owner/name"
        )
    return _hub_rows(path, split)


def read_records(path: str, cfg: DataConfig) -> tuple[list[Record], int, list[str], dict[str, int]]:
    """Read and validate one source: (records, bad records skipped, first bad messages, records per format).

    With `cfg.on_bad_record == "error"` the first bad record raises DataError. Line, record and row
    numbers in origins are 1-based.
    """
    records: list[Record] = []
    n_bad = 0
    bad_messages: list[str] = []
    formats: dict[str, int] = {}
    for origin, row in _rows(path, cfg.split):
        try:
            if isinstance(row, _BadRecord):
                raise row
            record, fmt = _record(row, origin, cfg)
        except _BadRecord as exc:
            message = f"{origin}: {exc}"
            if cfg.on_bad_record == "error":
                raise DataError(f"{message} (or set data.on_bad_record=skip to skip bad records)") from None
            n_bad += 1
            if len(bad_messages) < MAX_BAD_EXAMPLES:
                bad_messages.append(message)
            continue
        records.append(record)
        formats[fmt] = formats.get(fmt, 0) + 1
    if not records and not n_bad:
        raise DataError(f"{path}: holds no records; check that it is the right file and not empty")
    if n_bad:
        logger.warning("%s: skipped %d bad record(s); first: %s", path, n_bad, bad_messages[0])
    return records, n_bad, bad_messages, formats


# ---------------------------------------------------------------- the whole data set


def _dedupe(records: list[Record]) -> tuple[list[Record], int]:
    seen: set[Any] = set()
    kept: list[Record] = []
    for record in records:
        key = record.content_key()
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def _split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    n = len(records)
    # round() first so that e.g. 0.1 * 30 = 3.0000000000000004 holds out 3, not 4.
    n_eval = math.ceil(round(fraction * n, 9)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    # Both parts keep file order; the trainer shuffles per epoch.
    train = [record for index, record in enumerate(records) if index not in held_out]
    evaluation = [record for index, record in enumerate(records) if index in held_out]
    return train, evaluation


def _content(record: Record) -> dict[str, Any]:
    if record.raw is not None:
        return {"raw": list(record.raw)}
    content: dict[str, Any] = {"messages": [list(turn) for turn in record.messages]}
    if record.tools is not None:  # only then, so the hash of data without tools stays what it was
        content["tools"] = record.tools
    return content


def data_hash(train: list[Record], evaluation: list[Record]) -> str:
    """sha256 of the canonical JSON of the records' content (not their origins), train then eval."""
    canonical = json.dumps(
        {"train": [_content(r) for r in train], "eval": [_content(r) for r in evaluation]},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_data(
    cfg: DataConfig, seed: int, parent_paths: list[str] | None = None
) -> tuple[list[Record], list[Record], DataReport]:
    """Read, validate, de-duplicate, limit and split the data: (train, eval, report).

    `limit` applies to the training source after de-duplication (and, with `eval_path`, after removing
    records that also appear in eval). The same input and seed always give the same split and hash.
    With `cfg.sources`, the mix (see `_load_mix`); `parent_paths` are the data sets @parent stands for.
    """
    if cfg.sources is not None:
        return _load_mix(cfg, cfg.sources, seed, parent_paths or [])
    assert cfg.path is not None
    records, n_bad, bad_messages, formats = read_records(cfg.path, cfg)
    n_read = len(records) + n_bad
    if not records:
        raise DataError(
            f"{cfg.path}: no valid records ({n_bad} bad record(s) skipped); first problem: {bad_messages[0]}"
        )
    n_duplicates = 0
    if cfg.dedupe:
        records, n_duplicates = _dedupe(records)

    n_beyond_limit = 0
    if cfg.eval_path is None:
        if cfg.limit is not None and len(records) > cfg.limit:
            n_beyond_limit = len(records) - cfg.limit
            records = records[: cfg.limit]
        train, evaluation = _split(records, cfg.eval_fraction, seed)
        source = cfg.path
    else:
        evaluation, eval_bad, eval_messages, eval_formats = read_records(cfg.eval_path, cfg)
        n_read += len(evaluation) + eval_bad
        n_bad += eval_bad
        bad_messages = (bad_messages + eval_messages)[:MAX_BAD_EXAMPLES]
        for fmt, count in eval_formats.items():
            formats[fmt] = formats.get(fmt, 0) + count
        if not evaluation:
            raise DataError(
                f"{cfg.eval_path}: no valid eval records ({eval_bad} bad record(s) skipped); "
                f"first problem: {eval_messages[0]}"
            )
        if cfg.dedupe:
            evaluation, eval_duplicates = _dedupe(evaluation)
            n_duplicates += eval_duplicates
        # Train never sees an eval example, whatever `dedupe` says, or the eval loss means nothing.
        eval_keys = {record.content_key() for record in evaluation}
        train = [record for record in records if record.content_key() not in eval_keys]
        n_duplicates += len(records) - len(train)
        if cfg.limit is not None and len(train) > cfg.limit:
            n_beyond_limit = len(train) - cfg.limit
            train = train[: cfg.limit]
        source = f"{cfg.path} + eval {cfg.eval_path}"
    if not train:
        raise DataError(f"{cfg.path}: no training records left (every one also appears in {cfg.eval_path})")

    report = DataReport(
        source=source,
        n_read=n_read,
        n_bad_skipped=n_bad,
        n_duplicates=n_duplicates,
        n_train=len(train),
        n_eval=len(evaluation),
        formats=formats,
        bad_examples=bad_messages,
        data_hash=data_hash(train, evaluation),
        n_beyond_limit=n_beyond_limit,
    )
    logger.info(report.summary())
    return train, evaluation, report


def _load_mix(
    cfg: DataConfig, sources: list[DataSource], seed: int, parent_paths: list[str]
) -> tuple[list[Record], list[Record], DataReport]:
    """Each source is read, validated and de-duplicated on its own, loses the records an earlier source
    already has (counted), and is split into train and eval with its own seed; then its training part is
    sampled to its count or weight (whole passes, then a seeded sample without replacement). Eval is every
    source's held-out part, or `eval_path` (whose records no source then trains on)."""
    seen: set[Any] = set()
    train: list[Record] = []
    evaluation: list[Record] = []
    formats: dict[str, int] = {}
    bad_messages: list[str] = []
    per_source: list[dict[str, Any]] = []
    held_out: list[Record] = []
    eval_keys: set[Any] = set()
    if cfg.eval_path is not None:
        held_out, eval_bad, eval_messages, eval_formats = read_records(cfg.eval_path, cfg)
        held_out = _dedupe(held_out)[0] if cfg.dedupe else held_out
        eval_keys = {record.content_key() for record in held_out}
        bad_messages += eval_messages
        _add_counts(formats, eval_formats)
        per_source.append({"path": cfg.eval_path, "role": "eval", "n_read": len(held_out) + eval_bad})
    for index, source in enumerate(sources):
        paths = parent_paths if source.path == PARENT_DATA else [source.path]
        if not paths:
            raise DataError(
                f"data.sources[{index}]: {PARENT_DATA}: init_from's manifest records no data paths"
            )
        records: list[Record] = []
        n_bad = 0
        source_cfg = cfg.model_copy(update={"split": source.split})
        for path in paths:
            read, bad, messages, found = read_records(path, source_cfg)
            records += read
            n_bad += bad
            bad_messages += messages
            _add_counts(formats, found)
        n_read = len(records) + n_bad
        n_duplicates = 0
        if cfg.dedupe:
            records, n_duplicates = _dedupe(records)
        kept = [r for r in records if r.content_key() not in seen and r.content_key() not in eval_keys]
        n_across = len(records) - len(kept)
        seen.update(record.content_key() for record in kept)
        if cfg.eval_path is None:
            part_train, part_eval = _split(kept, cfg.eval_fraction, seed + index)
        else:
            part_train, part_eval = kept, []
        if not part_train:
            raise DataError(
                f"data.sources[{index}] ({source.path}): no training records left after de-duplication "
                f"({n_read} read, {n_bad} bad, {n_duplicates} duplicates, {n_across} already in another "
                "source)"
            )
        target = source.count if source.count is not None else round((source.weight or 1.0) * len(part_train))
        sampled = _sample(part_train, max(target, 1), random.Random(seed * 1_000_003 + index))
        train += sampled
        evaluation += part_eval
        per_source.append(
            {
                "path": source.path,
                "read_from": paths,
                "weight": source.weight,
                "count": source.count,
                "n_read": n_read,
                "n_bad_skipped": n_bad,
                "n_duplicates": n_duplicates,
                "n_duplicates_across_sources": n_across,
                "n_available": len(part_train),
                "n_sampled": len(sampled),
                "n_eval": len(part_eval),
            }
        )
    evaluation = held_out if cfg.eval_path is not None else evaluation
    # Sources follow one another in the file order of each; the trainer shuffles per epoch.
    report = DataReport(
        source=" + ".join(source.path for source in sources)
        + (f" + eval {cfg.eval_path}" if cfg.eval_path else ""),
        n_read=sum(item["n_read"] for item in per_source),
        n_bad_skipped=sum(item.get("n_bad_skipped", 0) for item in per_source),
        n_duplicates=sum(
            item.get("n_duplicates", 0) + item.get("n_duplicates_across_sources", 0) for item in per_source
        ),
        n_train=len(train),
        n_eval=len(evaluation),
        formats=formats,
        bad_examples=bad_messages[:MAX_BAD_EXAMPLES],
        data_hash=data_hash(train, evaluation),
        sources=per_source,
    )
    logger.info(report.summary())
    for item in per_source:
        if "n_sampled" in item:
            logger.info(
                "  %s: %d available -> %d sampled, %d eval",
                item["path"],
                item["n_available"],
                item["n_sampled"],
                item["n_eval"],
            )
    return train, evaluation, report


def recorded_paths(cfg: DataConfig, parent_paths: list[str]) -> list[str]:
    """The data sets a run reads, as a manifest records them: local files absolute, @parent resolved."""
    paths: list[str] = []
    for path in cfg.source_paths():
        for one in parent_paths if path == PARENT_DATA else [path]:
            paths.append(str(Path(one).resolve()) if Path(one).exists() else one)
    return paths


def _sample(records: list[Record], n: int, rng: random.Random) -> list[Record]:
    """n records: whole passes over `records`, then a sample without replacement, in file order."""
    passes, rest = divmod(n, len(records))
    chosen = sorted(rng.sample(range(len(records)), rest))
    return records * passes + [records[i] for i in chosen]


def _add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    for key, count in more.items():
        total[key] = total.get(key, 0) + count
