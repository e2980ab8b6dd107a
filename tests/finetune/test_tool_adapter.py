"""An adapter trained on tool-use chats by the real CLI calls the tool: its greedy reply, in PEFT, is a Hermes
tool call that vLLM's own parser (what `--tool-call-parser hermes` runs) turns into tool_calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.prompting import encode_prompt
from tests.toolcalls import TOOLS, WEATHER_QUESTION, tool_chats

pytestmark = pytest.mark.slow


def _greedy_reply(model: Any, tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    prompt = encode_prompt(tokenizer, messages, tools=TOOLS)
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=48, do_sample=False)
    # As the server decodes it: special tokens (<|im_end|>) dropped; the tool-call tags are not special.
    return str(tokenizer.decode(generated[0, len(prompt) :], skip_special_tokens=True))


def test_greedy_reply_is_a_tool_call_vllm_parses(tiny_base: Path, tool_adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tool_adapter)).eval()
    parser_class = ToolParserManager.get_tool_parser("hermes")

    messages = [{"role": "user", "content": WEATHER_QUESTION}]
    reply = _greedy_reply(model, tokenizer, messages)
    request = ChatCompletionRequest(model="tools", messages=messages, tools=TOOLS)
    parsed = parser_class(tokenizer, request.tools).extract_tool_calls(reply, request)
    assert parsed.tools_called, reply
    assert parsed.content is None, reply  # nothing but the call
    (call,) = parsed.tool_calls
    arguments = json.loads(call.function.arguments)
    # The function and its argument's name and type are learned; the tiny base cannot learn in a test's
    # time to copy the question's city (see tests/toolcalls.py), so its value is not asserted.
    assert (call.function.name, list(arguments)) == ("get_weather", ["city"]), reply
    assert isinstance(arguments["city"], str) and arguments["city"], reply

    # Without the adapter the base never calls a tool: the calls above were learned.
    with model.disable_adapter():
        reply = _greedy_reply(model, tokenizer, [{"role": "user", "content": WEATHER_QUESTION}])
    assert "<tool_call>" not in reply


def test_reply_after_the_tool_result_is_text(tiny_base: Path, tool_adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base), str(tool_adapter)
    ).eval()
    # A conversation the generator makes with the tool's result: the adapter answers it in words.
    (chat,) = [record for record in tool_chats(240) if len(record["messages"]) == 4][:1]
    reply = _greedy_reply(model, tokenizer, chat["messages"][:3])
    assert "<tool_call>" not in reply and reply.startswith("It is "), reply
