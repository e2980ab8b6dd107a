"""Configuration reference in Markdown, generated from the typed configs (pydantic models).

The README's reference tables are this module's output; tests/test_readme.py keeps them current. It lives
with the tests, off the import path of the packages it documents.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def type_name(annotation: Any) -> str:
    """A short, readable type: `int`, `str | None`, `"auto" | "bf16"`, `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(
            f'"{value}"' if isinstance(value, str) else str(value) for value in annotation.__args__
        )
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", re.sub(r"\btyping\.", "", str(annotation)))


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return f"`{info.default_factory()!r}`"  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return ""
    return f"`{info.default!r}`"


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted name, field) for every leaf field; nested models are flattened (`training.max_steps`)."""
    rows: list[tuple[str, FieldInfo]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += field_rows(annotation, f"{prefix}{name}.")
            continue
        rows.append((f"{prefix}{name}", info))
        # An optional section (`task_eval: TaskEvalConfig | None`) or a list of them (`sources`): the row
        # above says what it is, then its fields follow (`training.task_eval.path`, `data.sources[].path`).
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                rows += field_rows(arg, f"{prefix}{name}.")
            for inner in typing.get_args(arg):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    rows += field_rows(inner, f"{prefix}{name}[].")
    return rows


def markdown_rows(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(text) for text in row) + " |" for row in rows]
    return "\n".join(lines)


def finetune_reference() -> str:
    """Every field of `finetune run`'s config (YAML key and `key=value` override), with type and default."""
    from finetune.config import FinetuneConfig

    rows = [
        [f"`{name}`", f"`{type_name(info.annotation)}`", default_text(info), info.description or ""]
        for name, info in field_rows(FinetuneConfig)
    ]
    return markdown_rows(["key", "type", "default", "meaning"], rows)


def serve_reference() -> str:
    """Every `python -m serve` flag with its environment variable, type and default, as a Markdown table."""
    from serve.settings import ServeSettings

    prefix = str(ServeSettings.model_config.get("env_prefix", ""))
    rows = [
        [
            f"`--{name.replace('_', '-')}`",
            f"`{prefix}{name.upper()}`",
            f"`{type_name(info.annotation)}`",
            default_text(info),
            info.description or "",
        ]
        for name, info in field_rows(ServeSettings)
    ]
    return markdown_rows(["flag", "environment", "type", "default", "meaning"], rows)
