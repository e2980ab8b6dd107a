"""A tiny-base LoRA adapter whose greedy reply is a real tool call, for the tests of tool calling end to end.

Made by the real `python -m finetune run` on deterministic OpenAI-shaped tool-use chats (`tool_chats`):
asked about the weather with `TOOLS` offered, its greedy reply is one Hermes block,
`<tool_call>\n{"name": "get_weather", "arguments": {"city": "..."}}\n</tool_call>`, which vLLM's
`--tool-call-parser hermes` (Hermes2ProToolParser) parses into one get_weather call with a string `city`.
What it learns in its three minutes is the call's format and function, not to copy the question's city: the
tiny base (pre-trained on synthetic text where no reply depends on its question) has no copying to build
on, so `city` is whatever spelling it settled on (assert its type, not its value).

Use from a test module:
    from tests.toolcalls import TOOLS, WEATHER_QUESTION, train_tool_adapter
  `train_tool_adapter(out_dir, base=None) -> Path` trains it (about three minutes on 2 CPU cores); the session
  fixture `tool_adapter` in tests/conftest.py trains it once per session into a temp folder. The base is
  the tiny base (pipeline.bases.TINY_BASE_DIR, built if missing); serve it with --enable-lora and send the
  chat with `tools=TOOLS` and `messages=[{"role": "user", "content": WEATHER_QUESTION}]`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER_TOOL]
"""The OpenAI function tools every training chat offers (send the same list)."""

CITIES = ("Paris", "Tokyo", "Oslo", "Lima", "Cairo", "Rome", "Berlin", "Madrid")
WEATHER_PHRASINGS = (
    "What's the weather like in {city}?",
    "What is the weather in {city} right now?",
    "Is it raining in {city}?",
    "How warm is it in {city} today?",
    "Tell me the weather for {city}.",
    "Weather in {city}, please.",
)
SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy")

WEATHER_QUESTION = "What's the weather like in Paris?"


def tool_chats(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` chat records offering TOOLS: a weather question about a city, answered by the get_weather call;
    every third one goes on with the tool's result and a reply in words. Same seed, same chats."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        city = rng.choice(CITIES)
        call_id = f"call_{index}"
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": rng.choice(WEATHER_PHRASINGS).format(city=city)},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                    }
                ],
            },
        ]
        if index % 3 == 2:
            degrees, sky = rng.randint(-5, 35), rng.choice(SKIES)
            messages += [
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": json.dumps({"city": city, "temperature_c": degrees, "sky": sky}),
                },
                {"role": "assistant", "content": f"It is {degrees} degrees and {sky} in {city}."},
            ]
        records.append({"tools": TOOLS, "messages": messages})
    return records


def write_tool_chats(path: Path, count: int, seed: int = 0) -> Path:
    """Write `tool_chats(count, seed)` as .jsonl, the shape `finetune` reads (see README, tool use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in tool_chats(count, seed)), encoding="utf-8")
    return path


def train_tool_adapter(out_dir: Path, base: Path | None = None, *extra: str) -> Path:
    """Train the tool-calling adapter into `out_dir` with the real CLI; `base` defaults to the tiny base."""
    from finetune.cli import main as finetune_main
    from finetune.tiny_base import build_tiny_base
    from pipeline.bases import TINY_BASE_DIR
    from tests.finetune.conftest import overrides

    base = base or build_tiny_base(TINY_BASE_DIR)
    data = write_tool_chats(out_dir.parent / f"{out_dir.name}-data" / "tool_chats.jsonl", count=240)
    args = overrides(
        base,
        data,
        out_dir,
        # The tool's schema and the template's instructions make a ~300-token system turn.
        "data.max_seq_len=448",
        "data.eval_fraction=0.05",
        # Small steps, many of them, and a larger LoRA scale: the tiny base learns the call's format slowly.
        "training.micro_batch_size=4",
        "training.learning_rate=5e-3",
        "training.warmup_ratio=0.05",
        "lora.alpha=64",
        "training.max_steps=250",
        "training.eval_every=250",
        "training.save_every=1000",
        *extra,
    )
    code = finetune_main(["run", *args])
    if code != 0:
        raise RuntimeError(f"python -m finetune run {' '.join(args)} exited with {code}")
    return out_dir
