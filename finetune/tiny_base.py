"""Builds the project's small embedded base model: a tiny pre-trained Llama with a ChatML BPE tokenizer.

It loads like any hub model in transformers, PEFT and vLLM, and is the default base for tests and the demo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

VOCAB_SIZE = 2048
"""The BPE vocabulary's size: 256 byte symbols + 3 special tokens + learned merges (the two tool-call tokens
come on top)."""

BUILD_VERSION = 2
"""Bump whenever the build recipe changes, so cached builds from older code are not reused."""

MARKER_FILE = "tiny_base.json"
REQUIRED_FILES = (
    MARKER_FILE,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Hermes-style tool calling, as Qwen2.5-Instruct has it (vLLM's `--tool-call-parser hermes` reads it): the
# tool-call tags are single tokens, appended to the vocabulary after pre-training (see _add_tool_tokens).
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_TOKENS = (TOOL_CALL_START, TOOL_CALL_END)

DEFAULT_TOOLS_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system turn's text when a chat has tools but no system message (Qwen2.5 puts its own there)."""

# ChatML. The `generation` block marks the assistant tokens the model must learn to produce (its reply
# and the closing <|im_end|>), so `apply_chat_template(..., return_assistant_tokens_mask=True)` works.
# With `tools`, it renders them as Qwen2.5-Instruct's template does (the same bytes): their JSON schemas in
# the system turn, an assistant's `tool_calls` as <tool_call> JSON blocks (arguments a mapping, as
# transformers' tool-use templates expect), and `tool` messages as <tool_response> blocks in a user turn.
# A chat without tools renders exactly as the plain ChatML template of build version 1.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- else -%}{{ '" + DEFAULT_TOOLS_SYSTEM_PROMPT + "' }}{%- endif -%}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('Unsupported role ' + message['role'] + '; use system, user, assistant or tool.') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and loop.first and tools -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- if message['content'] -%}{{ message['content'] + '\\n' }}{%- endif -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if tool_call['function'] is defined -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{{ tool_call['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>' }}{%- endif -%}"
    "{%- endgeneration -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{ '<|im_start|>user' }}"
    "{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyBaseSpec:
    """Every knob of the tiny base build; the build is a pure function of this spec."""

    vocab_size: int = VOCAB_SIZE  # an upper bound: a very small corpus yields fewer BPE merges
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention refuses head_dim 16
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    corpus_documents: int = 4000
    pretrain_steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "corpus_documents",
            "batch_size",
            "seq_len",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TinyBaseSpec.{name} must be positive, got {getattr(self, name)}")
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < min_vocab:
            raise ValueError(f"TinyBaseSpec.vocab_size must be at least {min_vocab} (bytes + special tokens)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "TinyBaseSpec.num_attention_heads must be a multiple of num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )
        if self.seq_len > self.max_position_embeddings:
            raise ValueError("TinyBaseSpec.seq_len must not exceed max_position_embeddings")
        if self.pretrain_steps < 0 or self.warmup_steps < 0:
            raise ValueError(
                "TinyBaseSpec.pretrain_steps and warmup_steps must be >= 0 (0 skips pre-training)"
            )
        if self.learning_rate <= 0 or self.rope_theta <= 0:
            raise ValueError("TinyBaseSpec.learning_rate and rope_theta must be positive")


DEFAULT_SPEC = TinyBaseSpec()


def build_tiny_base(out_dir: Path, spec: TinyBaseSpec = DEFAULT_SPEC, *, force: bool = False) -> Path:
    """Build the tiny base model into `out_dir` and return it; reuse a complete build of the same spec.

    The build happens in a temporary sibling folder that replaces `out_dir` only once it is complete.
    A stale tiny base (another spec or build version: a cache from older code) is rebuilt; a folder
    holding anything else is replaced only with `force=True`.
    """
    out_dir = Path(os.path.abspath(out_dir))  # normalised, so that `.` and `..` have a real name and parent
    if out_dir.exists() and not force:
        if _is_complete_build(out_dir, spec):
            logger.info("Tiny base model already built at %s", out_dir)
            return out_dir
        if _is_tiny_base(out_dir):
            logger.info("Rebuilding %s: it holds %s", out_dir, _describe_existing(out_dir, spec))
            force = True
        elif not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ValueError(
                f"{out_dir} already holds {_describe_existing(out_dir, spec)}; "
                "pass --force (force=True) to replace it, or choose another output folder"
            )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _build_into(tmp_dir, spec)
        # mkdtemp made the folder private; a model folder is ordinarily readable by all.
        for path in tmp_dir.iterdir():
            path.chmod(0o644)
        tmp_dir.chmod(0o755)
        _move_into_place(tmp_dir, out_dir, spec, force=force)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    logger.info("Built tiny base model at %s in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir


def _is_complete_build(out_dir: Path, spec: TinyBaseSpec) -> bool:
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker == _marker(spec)


def _is_tiny_base(out_dir: Path) -> bool:
    """Whether out_dir holds a tiny base build of any spec or version (ours to replace)."""
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and {"version", "spec"} <= marker.keys()


def _describe_existing(out_dir: Path, spec: TinyBaseSpec) -> str:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
        built_spec, version = dict(marker["spec"]), marker["version"]
    except (OSError, ValueError, TypeError, KeyError):
        return "files that are not a tiny base build"
    if version != BUILD_VERSION:
        return f"a tiny base from build version {version} (this code builds version {BUILD_VERSION})"
    wanted = asdict(spec)
    changes = [
        f"{key}={built_spec.get(key)!r} (wanted {wanted[key]!r})"
        for key in wanted
        if built_spec.get(key) != wanted[key]
    ]
    if changes:
        return "a tiny base built with a different spec: " + ", ".join(changes)
    return "an incomplete tiny base build"


def _marker(spec: TinyBaseSpec) -> dict[str, Any]:
    return {"version": BUILD_VERSION, "spec": asdict(spec)}


def _move_into_place(tmp_dir: Path, out_dir: Path, spec: TinyBaseSpec, *, force: bool) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
    elif not force:
        # Another process finished the same build while this one ran (e.g. parallel test workers).
        if not _is_complete_build(out_dir, spec):
            raise ValueError(
                f"{out_dir} was created by someone else during the build; pass --force to replace it"
            )
        logger.info("%s was built concurrently by another process; keeping that build", out_dir)
    else:
        # Swap the old content out first, so out_dir never holds a half-written model.
        logger.warning("Replacing existing %s", out_dir)
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir / out_dir.name)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old_dir)


def _build_into(build_dir: Path, spec: TinyBaseSpec) -> None:
    rng = random.Random(spec.seed)
    documents = [_synthetic_document(rng) for _ in range(spec.corpus_documents)]
    logger.info("Generated a synthetic corpus of %d documents", len(documents))

    tokenizer = _train_tokenizer(documents, spec)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    assert isinstance(pad_id, int) and isinstance(eos_id, int)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    logger.info("Initialised LlamaForCausalLM with %.2fM parameters", model.num_parameters() / 1e6)

    if spec.pretrain_steps:
        # Documents are joined with <|endoftext|>, as in ordinary LM pre-training.
        stream: list[int] = []
        for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(pad_id)
        _pretrain(model, torch.tensor(stream, dtype=torch.long), spec, rng)
    _add_tool_tokens(tokenizer, model, spec)

    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(build_dir)
    tokenizer.save_pretrained(build_dir)
    # Written last: its presence marks a complete build.
    (build_dir / MARKER_FILE).write_text(json.dumps(_marker(spec), indent=2) + "\n")


def _train_tokenizer(documents: list[str], spec: TinyBaseSpec) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any Unicode string encodes and no unknown token is needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    logger.info("Trained a byte-level BPE tokenizer with %d tokens", backend.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _add_tool_tokens(tokenizer: PreTrainedTokenizerFast, model: LlamaForCausalLM, spec: TinyBaseSpec) -> None:
    """Append <tool_call> and </tool_call> to the vocabulary, as Qwen2.5 has them: single, non-special tokens.

    They come after pre-training, so every other token's weights are those of a build without them (the
    base answers a chat without tools as before). Their embedding rows are drawn per dimension from the
    trained rows' mean and spread, so they look like any other token: transformers' mean resizing would put
    them at the mean, whose logit is the average logit and can never be the largest, so no adapter could
    learn to start a tool call.
    """
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in TOOL_TOKENS])
    embeddings = model.model.embed_tokens.weight.detach()  # (V, C), tied to the output layer
    mean, std = embeddings.mean(dim=0), embeddings.std(dim=0)
    generator = torch.Generator().manual_seed(spec.seed)
    new_rows = mean + std * torch.randn(len(TOOL_TOKENS), embeddings.shape[1], generator=generator)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[-len(TOOL_TOKENS) :] = new_rows
    logger.info("Added the tool-call tokens %s", ", ".join(TOOL_TOKENS))


def _pretrain(model: LlamaForCausalLM, stream: torch.Tensor, spec: TinyBaseSpec, rng: random.Random) -> None:
    window = spec.seq_len + 1
    if len(stream) < window:
        raise ValueError(
            f"The synthetic corpus has {len(stream)} tokens, fewer than seq_len + 1; raise corpus_documents"
        )
    logger.info(
        "Pre-training for %d steps of %d x %d tokens on %d corpus tokens",
        spec.pretrain_steps,
        spec.batch_size,
        spec.seq_len,
        len(stream),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, spec.warmup_steps, spec.pretrain_steps)
    )
    # One intra-op thread: on an idle 2-core machine two threads ran a step ~1.8x faster, but with the other
    # core busy (a test or engine running beside the build) OpenMP's spin-waiting made each step ~10x slower.
    # One thread keeps the build time predictable; the weights came out identical with one or two threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        progress = tqdm(_batches(stream, spec, rng), total=spec.pretrain_steps, desc="pre-training tiny base")
        for step, batch in enumerate(progress):
            loss = model(input_ids=batch, labels=batch).loss  # batch: (B, T+1); labels are shifted inside
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == spec.pretrain_steps - 1:
                progress.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
    finally:
        torch.set_num_threads(threads)
    logger.info("Pre-training finished with loss %.3f", loss.item())


def _batches(stream: torch.Tensor, spec: TinyBaseSpec, rng: random.Random) -> Iterator[torch.Tensor]:
    window = spec.seq_len + 1
    for _ in range(spec.pretrain_steps):
        starts = [rng.randrange(len(stream) - window + 1) for _ in range(spec.batch_size)]
        yield torch.stack([stream[start : start + window] for start in starts])  # (B, T+1)


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- synthetic corpus -------------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "time year people way day man woman child world life hand part place case week company system program "
    "question work number night point home water room mother area money story fact month lot right study "
    "book eye job word business issue side kind head house service friend father power hour game line end "
    "member law car city community name president team minute idea kid body information back parent face "
    "others level office door health person art war history party result change morning reason research "
    "girl guy moment air teacher force education food tree river dog cat bird apple orange table chair "
    "window computer phone letter list answer model data file code test user message color music garden"
)
_VERBS = _words(
    "is was has makes takes sees knows gets gives finds thinks tells becomes shows leaves feels brings "
    "begins keeps holds writes stands hears lets means sets meets runs pays sits speaks reads grows opens "
    "walks wins offers remembers loves considers appears buys waits serves sends expects builds stays "
    "falls reaches kills raises passes sells requires reports decides pulls explains helps answers "
    "lists counts sorts checks returns"
)
_ADJECTIVES = _words(
    "good new first last long great little own other old right big high different small large next early "
    "young important few public bad same able simple short clear happy green red blue black white bright "
    "quiet quick slow warm cold hard easy free full open true real best sure low late strong useful"
)
_ADVERBS = _words("quickly slowly often never always today here there again also still very really only soon")
_PREPOSITIONS = _words("in on at with from into over under near after before about for by through")
_DETERMINERS = _words("the a this that every one my your our their some each")
_NAMES = _words("Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Liam Mia Noah Olivia Paul")
_CONJUNCTIONS = ("and", "but", "so", "because", "while", "when", "if")
_INSTRUCTIONS = (
    "Write a short sentence about {noun}.",
    "List three {noun}s.",
    "Explain what a {noun} is.",
    "Give me a {adj} name for a {noun}.",
    "Summarize the following text: {sentence}",
    "Translate to uppercase: {sentence}",
    "Answer in JSON with the keys name and count.",
    "How many {noun}s are there in {number} boxes?",
    "What color is the {noun}?",
    "Rewrite this sentence: {sentence}",
    "Return the list sorted: {items}",
    "Is the {noun} {adj}? Answer yes or no.",
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You answer questions about {noun}s.",
    "Reply in JSON only.",
)


def _synthetic_document(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.40:
        return _paragraph(rng, rng.randint(2, 8))
    if kind < 0.55:
        return _bullet_list(rng)
    if kind < 0.70:
        return json.dumps(_json_object(rng), indent=rng.choice([None, 2]))
    if kind < 0.78:
        return "\n".join(
            f"{rng.choice(_INSTRUCTIONS).format(**_slots(rng))}\n{_sentence(rng)}" for _ in range(2)
        )
    return _chatml_dialogue(rng)


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "noun": rng.choice(_NOUNS),
        "adj": rng.choice(_ADJECTIVES),
        "number": str(rng.randint(0, 100)),
        "sentence": _sentence(rng),
        "items": ", ".join(rng.sample(_NOUNS, rng.randint(2, 5))),
    }


def _noun_phrase(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(_NAMES)
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    if rng.random() < 0.15:
        words.append(str(rng.randint(2, 2025)))
    words.append(rng.choice(_NOUNS) + ("s" if rng.random() < 0.2 else ""))
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    words = [_noun_phrase(rng), rng.choice(_VERBS), _noun_phrase(rng)]
    if rng.random() < 0.4:
        words += [rng.choice(_PREPOSITIONS), _noun_phrase(rng)]
    if rng.random() < 0.3:
        words.append(rng.choice(_ADVERBS))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.3:
        text += f"{rng.choice(['', ','])} {rng.choice(_CONJUNCTIONS)} {_clause(rng)}"
    text = text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?", ";", ":"])
    style = rng.random()
    if style < 0.05:
        return text.upper()
    if style < 0.10:
        return text.title()
    if style < 0.15:
        return f'"{text}"'
    if style < 0.20:
        return f"({text})"
    return text


def _paragraph(rng: random.Random, sentences: int) -> str:
    lines = [
        " ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(max(1, sentences // 2))
    ]
    return "\n".join(lines) if rng.random() < 0.5 else "\n\n".join(lines)


def _bullet_list(rng: random.Random) -> str:
    count = rng.randint(2, 6)
    style = rng.choice(["-", "*", "1.", "1)", "a."])
    items = [
        rng.choice([_noun_phrase(rng), _sentence(rng), rng.choice(_NOUNS).capitalize()]) for _ in range(count)
    ]
    if style == "1.":
        lines = [f"{i}. {item}" for i, item in enumerate(items, 1)]
    elif style == "1)":
        lines = [f"{i}) {item}" for i, item in enumerate(items, 1)]
    elif style == "a.":
        lines = [f"{chr(ord('a') + i)}. {item}" for i, item in enumerate(items)]
    else:
        lines = [f"{style} {item}" for item in items]
    title = f"{rng.choice(_ADJECTIVES).capitalize()} {rng.choice(_NOUNS)}s:"
    return title + "\n" + "\n".join(lines)


def _json_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(
            ["name", "count", "tags", "id", "value", "ok", "items", "score", "text", rng.choice(_NOUNS)]
        )
        kind = rng.random()
        if kind < 0.25:
            result[key] = rng.choice(_NOUNS)
        elif kind < 0.45:
            result[key] = rng.randint(-10, 1000)
        elif kind < 0.55:
            result[key] = round(rng.uniform(0, 100), rng.randint(1, 3))
        elif kind < 0.65:
            result[key] = rng.choice([True, False, None])
        elif kind < 0.85 or depth:
            result[key] = rng.sample(_NOUNS, rng.randint(1, 4))
        else:
            result[key] = _json_object(rng, depth + 1)
    return result


def _chatml_dialogue(rng: random.Random) -> str:
    turns = []
    if rng.random() < 0.5:
        turns.append(("system", rng.choice(_SYSTEM_PROMPTS).format(**_slots(rng))))
    for _ in range(rng.randint(1, 3)):
        turns.append(("user", rng.choice(_INSTRUCTIONS).format(**_slots(rng))))
        reply = rng.random()
        if reply < 0.5:
            answer = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        elif reply < 0.75:
            answer = _bullet_list(rng)
        else:
            answer = json.dumps(_json_object(rng))
        turns.append(("assistant", answer))
    # Same rendering as CHAT_TEMPLATE, so the model has seen the exact chat format.
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
