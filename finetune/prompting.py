"""Prompt rendering through the base tokenizer's chat template: one code path for training and serving.

Training calls `encode_conversation` (ids + labels on assistant turns); the server calls `encode_prompt`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

IGNORE_INDEX = -100

Message = dict[str, str]


class ChatTokenizer(Protocol):
    """The slice of a transformers fast tokenizer this module relies on."""

    eos_token_id: int | None
    chat_template: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class PromptError(ValueError):
    """A conversation that the base model's chat template cannot render for training."""


@dataclass(frozen=True)
class EncodedSample:
    """One training sample: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_prompt(
    tokenizer: ChatTokenizer, messages: Sequence[Message], *, add_generation_prompt: bool
) -> str:
    """Render messages with the tokenizer's own chat template, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "the base model's tokenizer has no chat_template; use an instruction-tuned base "
            "(e.g. Qwen/Qwen2.5-7B-Instruct) or one whose tokenizer_config.json defines chat_template"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(text, str)
    return text


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Token ids of already rendered text: the template carries every special token, so none is added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: ChatTokenizer, messages: Sequence[Message]) -> list[int]:
    """Prompt ids for generation: the conversation so far plus the assistant header."""
    return encode_text(tokenizer, render_prompt(tokenizer, messages, add_generation_prompt=True))


def end_of_turn_ids(tokenizer: ChatTokenizer, generation_eos: int | Iterable[int] | None = None) -> set[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the generation config's EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(int(i) for i in generation_eos)
    if not ids:
        raise PromptError("the tokenizer defines no eos_token; the model could not learn to stop")
    return ids


def encode_conversation(
    tokenizer: ChatTokenizer, messages: Sequence[Message], stop_ids: set[int]
) -> EncodedSample:
    """Ids of the whole rendered conversation, with labels on every assistant turn and its end-of-turn token.

    Each assistant turn's span is found by rendering the conversation up to the turn with the generation
    prompt (where the reply starts) and through the turn (where it ends), so it works for any chat template
    whose renderings extend each other. Labels cover the reply and the first end-of-turn token after it, so
    the model learns to stop; whatever the template puts after that token (a newline, say) is not trained.
    """
    full = render_prompt(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:turn], add_generation_prompt=True)
        through = render_prompt(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise PromptError(
                f"the chat template renders assistant turn {turn} differently depending on what follows it; "
                "per-turn label masking needs a template whose renderings are prefixes of each other"
            )
        spans.append((len(before), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        stopped = False
        for index, (token_start, _) in enumerate(offsets):
            if token_start < start or token_start >= end:
                continue
            labels[index] = input_ids[index]
            if input_ids[index] in stop_ids:
                stopped = True
                break
        if not stopped:
            raise PromptError(
                "the chat template does not end assistant turns with an end-of-turn token "
                f"(looked for ids {sorted(stop_ids)}); the model would never learn to stop"
            )
    return EncodedSample(input_ids=input_ids, labels=labels)


def encode_raw(tokenizer: ChatTokenizer, prompt: str, completion: str, eos_id: int) -> EncodedSample:
    """Plain prompt/completion without a chat template: loss on the completion and a final EOS."""
    prompt_ids = encode_text(tokenizer, prompt)
    completion_ids = [*encode_text(tokenizer, completion), eos_id]
    return EncodedSample(
        input_ids=prompt_ids + completion_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids
    )
