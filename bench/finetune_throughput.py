"""Our LoRA fine-tuning (`python -m finetune run`) against TRL's SFTTrainer + PEFT, same base, data, settings.

`python -m bench.finetune_throughput [--base tiny|smollm2] [--steps N] [--quick] [--gpu [--smoke-cpu]]`; the
sides (`SIDES`) run one after the other, each in its own process. BENCHMARKS.md says how it measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, results_dir, start_run, write_json
from bench.fixtures import BASES, DEFAULT_BASE, BenchBase, add_base_option, base_for_document
from bench.report import header_markdown, publish_section
from tuneserve.tables import markdown_table

log = logging.getLogger("bench.finetune_throughput")

NAME = "finetune_throughput"
TINY_BASE_DIR = BASES[DEFAULT_BASE].folder
DEMO_CONFIG = BASES[DEFAULT_BASE].finetune_config
SIDES = ("ours", "trl", "trl_packed", "ours_rows", "ours_flex")
SIDE_LABELS = {
    "ours": "ours (`finetune run`, padding-free packing)",
    "ours_rows": "ours, one packed row of max_seq_len per micro-batch (config variant, see below)",
    "ours_flex": "ours, `flex_attention`: one packed row per micro-batch (config variant, see below)",
    "trl": "TRL SFTTrainer, default (padded batches)",
    "trl_packed": "TRL SFTTrainer, `packing=True` (BFD, padding-free)",
}
SHORT_LABELS = {
    "ours": "ours",
    "trl": "TRL default",
    "trl_packed": "TRL packed",
    "ours_rows": "ours, rows",
    "ours_flex": "ours, flex",
}
TRL_SIDES = ("trl", "trl_packed")
OUR_VARIANTS = ("ours_rows", "ours_flex")  # our recipe again, one config setting changed
CUDA_ONLY_SIDES = ("ours_flex",)  # FlexAttention has no backward pass on CPU
# Steps left out of the throughput figure (the first ones pay one-off costs: allocator growth, kernel
# selection, compilation); at most this many, and at most a fifth of the steps.
WARMUP_STEPS_EXCLUDED = 3
FLEX_BLOCK = 128  # FlexAttention's default sparse block size
IGNORE_INDEX = -100
H100_SXM_BF16_DENSE_TFLOPS = 989.0
TARGET_RATIO = 1.5

# Qwen2.5-7B (Qwen/Qwen2.5-7B-Instruct config.json), built in code: no download.
QWEN25_7B: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# The same architecture, small enough to run on a CPU in seconds (--gpu --smoke-cpu).
QWEN2_SMOKE: dict[str, Any] = {
    **QWEN25_7B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}


# ----- what both sides train with ----------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The shared training settings; a worker gets these plus its side's batch shape."""

    base_model: str
    data_path: str
    steps: int
    max_seq_len: int
    micro_batch_size: int  # ours: rows per micro-batch; TRL packed: bins per batch
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_ratio: float
    warmup_steps: int  # ceil(warmup_ratio * steps), as the recipe computes it
    lr_scheduler: str
    max_grad_norm: float | None
    adam_betas: tuple[float, float]
    weight_decay: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str | list[str]
    precision: str  # fp32 | bf16
    gradient_checkpointing: bool
    seed: int
    attn_implementation: str = "sdpa"  # ours only: TRL's sides use sdpa
    config: str = str(DEMO_CONFIG)  # the demo config these settings come from (the recipe's starting point)

    def recipe_config(self, output_dir: Path) -> Any:
        """Our recipe's FinetuneConfig: the demo config with these settings on top."""
        from finetune.config import load_config

        return load_config(Path(self.config), self.overrides(output_dir))

    def overrides(self, output_dir: Path) -> list[str]:
        """`finetune run` overrides that give our recipe these settings (on top of the demo config)."""
        return [
            f"base_model={self.base_model}",
            f"output_dir={output_dir}",
            "overwrite=true",
            f"seed={self.seed}",
            f"data.path={self.data_path}",
            "data.format=chat",
            "data.eval_fraction=0",
            f"data.max_seq_len={self.max_seq_len}",
            f"lora.r={self.lora_r}",
            f"lora.alpha={self.lora_alpha}",
            f"lora.dropout={self.lora_dropout}",
            f"lora.target_modules={json.dumps(self.lora_target_modules)}",
            f"training.max_steps={self.steps}",
            f"training.micro_batch_size={self.micro_batch_size}",
            f"training.gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"training.learning_rate={self.learning_rate}",
            f"training.warmup_ratio={self.warmup_ratio}",
            f"training.lr_scheduler={self.lr_scheduler}",
            f"training.max_grad_norm={'null' if self.max_grad_norm is None else self.max_grad_norm}",
            f"training.adam_betas=[{self.adam_betas[0]}, {self.adam_betas[1]}]",
            f"training.weight_decay={self.weight_decay}",
            f"training.precision={self.precision}",
            f"training.attn_implementation={self.attn_implementation}",
            f"training.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            "training.packing=true",
            f"training.eval_every={self.steps + 1}",
            f"training.save_every={self.steps + 1}",
            "training.log_every=1",
        ]


def settings_from_demo_config(
    base_model: Path,
    data_path: Path,
    steps: int,
    *,
    max_seq_len: int | None = None,
    micro_batch_size: int | None = None,
    precision: str | None = None,
    gradient_checkpointing: bool = False,
    demo_config: Path = DEMO_CONFIG,
) -> Settings:
    """A demo config's settings (configs/tiny-demo.yaml by default, the CPU demo), with the benchmark's base,
    data and step count. Precision `auto` becomes what the recipe would pick on this machine, so that TRL
    gets the same."""
    from finetune.config import load_config

    config = load_config(demo_config, [f"base_model={base_model}", f"data.path={data_path}"])
    training, lora = config.training, config.lora
    return Settings(
        base_model=str(base_model),
        data_path=str(data_path),
        steps=steps,
        max_seq_len=max_seq_len or config.data.max_seq_len,
        micro_batch_size=micro_batch_size or training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        warmup_ratio=training.warmup_ratio,
        # The recipe's warm-up is ceil(warmup_ratio * steps); TRL gets the same count.
        warmup_steps=math.ceil(training.warmup_ratio * steps),
        lr_scheduler=training.lr_scheduler,
        max_grad_norm=training.max_grad_norm,
        adam_betas=training.adam_betas,
        weight_decay=training.weight_decay,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
        precision=precision or resolved_precision(training.precision),
        gradient_checkpointing=gradient_checkpointing,
        seed=config.seed,
        config=str(demo_config),
    )


def resolved_precision(precision: str) -> str:
    """fp32 or bf16: `auto` resolved as our recipe does (bf16 where the machine computes it natively)."""
    if precision != "auto":
        return precision
    from finetune.recipe import native_bf16

    return "bf16" if native_bf16() else "fp32"


# SmolLM2's template writes every turn with this one expression (the newlines are literal in the template).
CHATML_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
# The same text, with the assistant's reply and its <|im_end|> inside `{% generation %}` (what TRL's
# assistant_only_loss masks by, and what our recipe labels).
CHATML_TURN_MARKED = (
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
    "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + CHATML_TURN + "{% endif %}"
)


def with_generation_markers(template: str) -> str:
    """`template` with `{% generation %}` markers around each assistant reply and its <|im_end|>, rendering
    the same text; a template that has markers already is returned as it is. Knows ChatML templates that
    write each turn with SmolLM2's one expression; refuses others rather than guess."""
    if "generation %}" in template:
        return template
    if template.count(CHATML_TURN) != 1:
        raise ValueError(
            "the chat template has no {% generation %} markers and is not SmolLM2's ChatML template; "
            "give TRL a template with markers around the assistant replies"
        )
    return template.replace(CHATML_TURN, CHATML_TURN_MARKED)


def matched_batch_size(tokens_per_step: float, mean_sample_tokens: float) -> int:
    """TRL's padded batch size (samples per step) closest to ours in real tokens per step.

    Our packed steps hold a varying number of samples (as many as fit the token budget); a padded batch
    holds a fixed number, so it gets the count that carries the same real tokens on average.
    """
    if tokens_per_step <= 0 or mean_sample_tokens <= 0:
        raise ValueError("tokens_per_step and mean_sample_tokens must be positive")
    return max(1, round(tokens_per_step / mean_sample_tokens))


# ----- counting ------------------------------------------------------------------------------------------


@dataclass
class TokenCounts:
    """What a side's batches held, summed over the steps."""

    real_tokens: int = 0  # non-padding tokens
    computed_tokens: int = 0  # tokens in the tensors, padding included
    label_tokens: int = 0  # positions trained (next-token targets)
    samples: int = 0
    sum_sq_lengths: int = 0  # sum over samples of length**2: the attention a sample needs
    sum_sq_rows: int = 0  # sum over computed rows of width**2: the attention dense sdpa computes

    def add_lengths(self, lengths: Sequence[int]) -> None:
        self.samples += len(lengths)
        self.real_tokens += sum(lengths)
        self.sum_sq_lengths += sum(n * n for n in lengths)


def segment_lengths(position_ids: Sequence[int]) -> list[int]:
    """Lengths of the samples of a padding-free row: a new sample starts wherever the position is 0."""
    lengths: list[int] = []
    for position in position_ids:
        if position == 0 or not lengths:
            lengths.append(0)
        lengths[-1] += 1
    return lengths


def block_sparse_scores(lengths: Sequence[int], block: int = FLEX_BLOCK) -> int:
    """Attention scores FlexAttention computes for one packed row of samples of these `lengths`: every
    (query block, key block) pair, key block at or before the query block, in which some sample has tokens
    in both, in full (block x block); blocks with no sample in common are skipped."""
    pairs: set[tuple[int, int]] = set()
    start = 0
    for length in lengths:
        first, last = start // block, (start + length - 1) // block
        pairs.update((q, k) for q in range(first, last + 1) for k in range(first, q + 1))
        start += length
    return len(pairs) * block * block


def steady_rate(marks: Sequence[tuple[float, int, int]], skip: int) -> tuple[float, int, int]:
    """(seconds, real tokens, sum of squared sample lengths) of the steps after the first `skip`, from
    cumulative marks taken at the end of every step (`skip` 0: all steps)."""
    if not marks:
        return float("nan"), 0, 0
    skip = min(skip, len(marks) - 1)
    end = marks[-1]
    begin = marks[skip - 1] if skip > 0 else (0.0, 0, 0)
    return end[0] - begin[0], end[1] - begin[1], end[2] - begin[2]


def warmup_steps_excluded(steps: int) -> int:
    return min(WARMUP_STEPS_EXCLUDED, steps // 5)


def label_count(labels: Sequence[int]) -> int:
    """Trained positions of one sample: labels other than IGNORE_INDEX after the first token.

    The first token of a sample is never a target (no position predicts it, and in a packed row both our
    collator and TRL's padding-free one mask it), so it is left out on both sides.
    """
    return sum(label != IGNORE_INDEX for label in labels[1:])


def samples_digest(samples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """A digest of (input ids, labels) of every sample, the first label masked: equal iff identical."""
    digest = hashlib.sha256()
    for ids, labels in samples:
        digest.update(json.dumps([list(ids), [IGNORE_INDEX, *labels[1:]]]).encode())
    return digest.hexdigest()


def tail_mean(values: Sequence[float], fraction: float = 0.2, minimum: int = 5) -> tuple[float, float]:
    """Mean and standard error of the last `fraction` of `values` (at least `minimum` of them)."""
    if not values:
        return float("nan"), float("nan")
    count = min(len(values), max(minimum, math.ceil(fraction * len(values))))
    tail = list(values[-count:])
    mean = statistics.fmean(tail)
    error = statistics.stdev(tail) / math.sqrt(count) if count > 1 else float("nan")
    return mean, error


# ----- model FLOPs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsReport:
    model_flops: float  # 6N convention
    lora_flops: float  # what LoRA training computes
    mfu: float
    mfu_lora: float


def matmul_params(model_config: dict[str, Any]) -> int:
    """Parameters of a Qwen2/Llama-style decoder that enter a matmul per token (N in 6N).

    All linear layers of all blocks plus the output head; the input embedding is left out (a lookup, no
    matmul) unless it is tied to the output head, and norms/biases are negligible (left out).
    """
    hidden = model_config["hidden_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config["num_key_value_heads"]
    head_dim = model_config.get("head_dim") or hidden // heads
    inter = model_config["intermediate_size"]
    layers = model_config["num_hidden_layers"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter  # gate, up, down
    head = hidden * model_config["vocab_size"]
    return layers * (attention + mlp) + head


def attention_flops(model_config: dict[str, Any], sum_sq_lengths: int) -> float:
    """Attention score and value matmuls, forward and backward: 12 * layers * heads * head_dim * sum(len^2).

    Per layer and sample of length n, QK^T and AV take 2 * n^2 * heads * head_dim FLOPs each forward
    (counted without the causal half, the usual PaLM convention); backward is twice the forward.
    """
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    return 12.0 * model_config["num_hidden_layers"] * heads * head_dim * sum_sq_lengths


def model_flops(
    model_config: dict[str, Any],
    tokens: int,
    sum_sq_lengths: int,
    seconds: float,
    peak_flops: float,
    lora_params: int = 0,
) -> FlopsReport:
    """Model FLOPs and MFU of `tokens` real tokens trained in `seconds`.

    - `model_flops` (the reported MFU): 6 * N * tokens + attention, N = `matmul_params`: the standard
      convention (forward 2N, backward 4N per token), as if every weight got a gradient, so the figure
      compares with full fine-tuning and pre-training MFU reports.
    - `lora_flops`: what LoRA actually computes: frozen weights take the forward (2N) and the backward
      through the activations (2N) but no weight gradient, so 4N, plus 6 * lora_params, plus attention.

    Padding is not counted (it is no useful work), so a padded batch shows as lower MFU.
    """
    n = matmul_params(model_config)
    attention = attention_flops(model_config, sum_sq_lengths)
    full = 6.0 * n * tokens + attention
    lora = (4.0 * n + 6.0 * lora_params) * tokens + attention
    achieved = seconds * peak_flops
    return FlopsReport(
        model_flops=full,
        lora_flops=lora,
        mfu=full / achieved if achieved > 0 else float("nan"),
        mfu_lora=lora / achieved if achieved > 0 else float("nan"),
    )


# ----- the workers (one subprocess per side) -------------------------------------------------------------


def _rss_now() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with the dev tools
        return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _records(settings: Settings) -> list[Any]:
    """The training records exactly as our recipe reads them (same list, same order)."""
    from finetune.data import load_data

    config = settings.recipe_config(Path("unused"))
    train, _, _ = load_data(config.data, config.seed)
    return train


def run_ours(settings: Settings, work: Path) -> dict[str, Any]:
    from finetune.batching import collate_packed
    from finetune.recipe import LoraRecipe, packed_row_len

    config = settings.recipe_config(work / "ours-adapter")
    recipe = LoraRecipe(config)
    recipe.setup()
    if not recipe.packing:
        raise RuntimeError("our recipe fell back to padded batches; the comparison expects packing")
    samples = recipe.train_samples
    # What the N steps will see, from the recipe's own plan (the same collate the recipe uses).
    counts = TokenCounts()
    step_counts: list[tuple[int, int]] = []  # cumulative (real tokens, sum of squared lengths) per step
    per_step = len(recipe.plan) // settings.steps
    row_len = packed_row_len(config)
    for number, indices in enumerate(recipe.plan, start=1):
        batch = collate_packed([samples[i] for i in indices], row_len)
        lengths = [len(samples[i].input_ids) for i in indices]
        counts.add_lengths(lengths)
        counts.computed_tokens += batch.input_ids.numel()
        if settings.attn_implementation == "flex_attention":
            counts.sum_sq_rows += block_sparse_scores(lengths)
        else:
            counts.sum_sq_rows += batch.input_ids.shape[0] * batch.input_ids.shape[1] ** 2
        counts.label_tokens += batch.n_label_tokens
        if number % per_step == 0:
            step_counts.append((counts.real_tokens, counts.sum_sq_lengths))
    seconds, rss_before, gpu_before = _timed(recipe.train)
    state = recipe.state
    if state.tokens != counts.real_tokens or state.label_tokens != counts.label_tokens:
        raise RuntimeError(
            f"token count mismatch: recipe {state.tokens}/{state.label_tokens}, "
            f"plan {counts.real_tokens}/{counts.label_tokens}"
        )
    history = state.train_history  # one entry per step (log_every=1)
    if [int(h["tokens"]) for h in history] != [tokens for tokens, _ in step_counts]:
        raise RuntimeError("the recipe's per-step token counts differ from its plan's")
    marks = [(h["train_seconds"], tokens, sq) for h, (tokens, sq) in zip(history, step_counts, strict=True)]
    model = recipe.accelerator.unwrap_model(recipe.model)
    losses = [h["loss"] for h in history]
    result = _result("ours", settings, counts, seconds, losses, rss_before, model, gpu_before, marks)
    result["batch"] = {
        "micro_batch_size": settings.micro_batch_size,
        "row_token_budget": settings.micro_batch_size * settings.max_seq_len,
        "packed_rows_per_step": settings.gradient_accumulation_steps,
    }
    result["labels"] = _label_summary([(s.input_ids, s.labels) for s in samples])
    shutil.rmtree(work / "ours-adapter.partial", ignore_errors=True)
    return result


def run_trl(
    settings: Settings, work: Path, *, packing: bool, batch_size: int, chat_template_path: str | None = None
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.recipe import peft_lora_config

    side = "trl_packed" if packing else "trl"
    counts = TokenCounts()
    marks: list[tuple[float, int, int]] = []  # cumulative (seconds, real tokens, sum len^2) per step

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that counts what each training micro-batch holds (no change to the training)."""

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                _count_batch(inputs, counts)
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        """The time and the tokens counted so far at the end of every optimizer step (device synchronised)."""

        started = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            _sync()
            self.started = time.monotonic()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            _sync()
            marks.append((time.monotonic() - self.started, counts.real_tokens, counts.sum_sq_lengths))

    records = _records(settings)
    dataset = Dataset.from_list([{"messages": record.to_messages()} for record in records])
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=dtype, attn_implementation="sdpa")
    # The LoRA of our side's config, mapped onto PEFT by the recipe itself.
    peft_config = peft_lora_config(settings.recipe_config(Path("unused")).lora)
    scheduler = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
    args = SFTConfig(
        output_dir=str(work / f"{side}-out"),
        max_steps=settings.steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=scheduler[settings.lr_scheduler],
        lr_scheduler_kwargs={"min_lr_rate": 0.0} if settings.lr_scheduler == "cosine" else {},
        warmup_steps=settings.warmup_steps,
        optim="adamw_torch",
        adam_beta1=settings.adam_betas[0],
        adam_beta2=settings.adam_betas[1],
        adam_epsilon=1e-8,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm if settings.max_grad_norm is not None else 0.0,
        bf16=settings.precision == "bf16",
        use_cpu=not _cuda(),  # the Trainer refuses bf16 on a machine without a GPU unless told it is the CPU
        gradient_checkpointing=settings.gradient_checkpointing,
        max_length=settings.max_seq_len,
        packing=packing,
        assistant_only_loss=True,
        chat_template_path=chat_template_path,
        pad_to_multiple_of=None,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=_cuda(),
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepClock()],
    )
    labels = None
    if not packing:  # the tokenized, labelled samples, in record order (packing regroups them)
        prepared: Any = trainer.train_dataset
        labels = _label_summary([(row["input_ids"], row["labels"]) for row in prepared])
    seconds, rss_before, gpu_before = _timed(trainer.train)
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    if trainer.state.global_step != settings.steps:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} steps, not {settings.steps}")
    result = _result(side, settings, counts, seconds, losses, rss_before, trainer.model, gpu_before, marks)
    result["batch"] = {
        "per_device_train_batch_size": batch_size,
        "packing": packing,
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "max_length": settings.max_seq_len,
    }
    result["trl_logged_tokens"] = int(getattr(trainer, "_total_train_tokens", 0))
    if labels is not None:
        result["labels"] = labels
    shutil.rmtree(work / f"{side}-out", ignore_errors=True)
    return result


def _count_batch(inputs: dict[str, Any], counts: TokenCounts) -> None:
    """Real tokens, padded size, targets and sample lengths of one TRL micro-batch."""
    input_ids = inputs["input_ids"]
    labels = inputs["labels"]
    counts.computed_tokens += int(input_ids.numel())
    counts.sum_sq_rows += int(input_ids.shape[0]) * int(input_ids.shape[1]) ** 2
    counts.label_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    if "attention_mask" in inputs and inputs["attention_mask"] is not None:  # padded batch
        counts.add_lengths([int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()])
    else:  # padding-free: one flattened row, position ids restart at 0 for each sample
        counts.add_lengths(segment_lengths(inputs["position_ids"][0].tolist()))


def _label_summary(samples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, Any]:
    return {
        "samples": len(samples),
        "tokens": sum(len(ids) for ids, _ in samples),
        "label_tokens": sum(label_count(labels) for _, labels in samples),
        "per_sample_label_tokens": [label_count(labels) for _, labels in samples],
        "digest": samples_digest(samples),
    }


def _reset_cuda_peak() -> int | None:
    """Start GPU peak tracking afresh; returns the memory allocated now (model and data), None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _timed(train: Callable[[], object]) -> tuple[float, int, int | None]:
    """Run `train`: its wall seconds (device synchronised), and the RSS and GPU peak baselines before it."""
    rss_before = _rss_now()
    gpu_before = _reset_cuda_peak()
    _sync()
    started = time.monotonic()
    train()
    _sync()
    return time.monotonic() - started, rss_before, gpu_before


def _result(
    side: str,
    settings: Settings,
    counts: TokenCounts,
    seconds: float,
    losses: list[float],
    rss_before: int,
    model: Any,
    gpu_before: int | None,
    marks: Sequence[tuple[float, int, int]],
) -> dict[str, Any]:
    """A side's figures. `tokens_per_s` leaves out the first `warmup_steps_excluded` steps (from `marks`,
    cumulative (seconds, real tokens, sum len^2) at each step's end); `tokens_per_s_all_steps` does not."""
    import torch

    if len(marks) != settings.steps or marks[-1][1] != counts.real_tokens:
        raise RuntimeError(f"{side}: {len(marks)} step marks for {settings.steps} steps, or tokens differ")
    skip = warmup_steps_excluded(settings.steps)
    steady_seconds, steady_tokens, steady_sum_sq = steady_rate(marks, skip)
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)
    final_loss, final_loss_se = tail_mean(losses)
    cuda = torch.cuda.is_available()
    return {
        "side": side,
        "steps": settings.steps,
        "train_seconds": seconds,
        "counts": asdict(counts),
        "tokens_per_s": steady_tokens / steady_seconds,
        "tokens_per_s_all_steps": counts.real_tokens / seconds,
        "steady": {
            "steps_excluded": skip,
            "seconds": steady_seconds,
            "real_tokens": steady_tokens,
            "sum_sq_lengths": steady_sum_sq,
        },
        "real_tokens_per_step": counts.real_tokens / settings.steps,
        "label_tokens_per_step": counts.label_tokens / settings.steps,
        "padding_fraction": 1 - counts.real_tokens / max(counts.computed_tokens, 1),
        # Attention scores computed (dense over each row, masked or not) per score a sample needs.
        "attention_overcompute": counts.sum_sq_rows / max(counts.sum_sq_lengths, 1),
        "losses": losses,
        "final_loss": final_loss,
        "final_loss_se": final_loss_se,
        "last_step_loss": losses[-1] if losses else float("nan"),
        "peak_rss_bytes": _peak_rss(),
        "rss_before_train_bytes": rss_before,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "gpu_before_train_bytes": gpu_before,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_dtypes": sorted(
            {str(p.dtype).removeprefix("torch.") for p in parameters if p.requires_grad}
        ),
        "frozen_dtypes": sorted(
            {str(p.dtype).removeprefix("torch.") for p in parameters if not p.requires_grad}
        ),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
    }


def worker_main(spec_path: Path) -> int:
    """Entry of a side's subprocess: train as the spec says, write the result JSON next to it."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    raw = dict(spec["settings"])
    raw["adam_betas"] = tuple(raw["adam_betas"])
    settings = Settings(**raw)
    work = Path(spec["work_dir"])
    load_before = _load_average()
    side = spec["side"]
    if side in ("ours", *OUR_VARIANTS):
        result = run_ours(settings, work)
        result["side"] = side
    else:
        result = run_trl(
            settings,
            work,
            packing=side == "trl_packed",
            batch_size=spec["batch_size"],
            chat_template_path=spec.get("chat_template_path"),
        )
    result["loadavg_1m_before"] = load_before
    result["loadavg_1m_after"] = _load_average()
    write_json(Path(spec["result_path"]), result)
    return 0


# ----- the driver -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the driver decides before any side runs."""

    settings: Settings
    trl_batch_size: int
    ours_tokens_per_step: float
    mean_sample_tokens: float
    n_samples: int
    model_config: dict[str, Any] = field(default_factory=dict)
    # TRL's copy of the base's chat template with `{% generation %}` markers (None: the base's own has them)
    trl_chat_template_path: str | None = None


def prepare_data(work_dir: Path, n_train: int) -> Path:
    """`python -m client tasks --group format`: the chat records both sides train on (cached in work_dir)."""
    out = work_dir / f"data-format-{n_train}"
    train = out / "train.jsonl"
    if not train.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "client",
                "tasks",
                "--out",
                str(out),
                "--group",
                "format",
                "--n-train",
                str(n_train),
            ],
            check=True,
            cwd=REPO_ROOT,
        )
    return train


def build_random_qwen2(out_dir: Path, architecture: dict[str, Any], *, dtype_name: str) -> Path:
    """A Qwen2 model with random weights and the tiny base's tokenizer, saved once to out_dir."""
    marker = out_dir / "bench_model.json"
    wanted = {"architecture": architecture, "dtype": dtype_name}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == wanted:
        return out_dir
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from finetune.tiny_base import build_tiny_base

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base(TINY_BASE_DIR))
    if len(tokenizer) > architecture["vocab_size"]:
        raise ValueError("the tokenizer's ids must lie inside the model's vocabulary")
    config = Qwen2Config(
        **architecture,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / marker.name).write_text(json.dumps(wanted), encoding="utf-8")
    del model
    os.replace(tmp, out_dir)
    return out_dir


def several_rows(bench_base: BenchBase, micro_batch_size: int | None) -> bool:
    """Whether our micro-batches hold more than one row (the base's demo config, or --micro-batch-size)."""
    from finetune.config import load_config

    rows = micro_batch_size or load_config(bench_base.finetune_config, []).training.micro_batch_size
    return rows > 1


def trl_chat_template(base: Path, work_dir: Path) -> str | None:
    """A .jinja copy of the base's chat template with `{% generation %}` markers, for TRL's
    assistant_only_loss; None when the base's own template has them (the tiny base's)."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(base).chat_template
    marked = with_generation_markers(template)
    if marked == template:
        return None
    path = work_dir / "trl-chat-template.jinja"
    path.write_text(marked, encoding="utf-8")
    return str(path)


def make_plan(settings: Settings, model_config: dict[str, Any]) -> Plan:
    """Tokenize as our recipe does and size TRL's padded batch to our real tokens per step."""
    from transformers import AutoTokenizer

    from finetune.prompting import end_of_turn_ids
    from finetune.recipe import encode_records, plan_micro_batches

    config = settings.recipe_config(Path("unused"))
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    records = _records(settings)
    samples, _ = encode_records(records, tokenizer, end_of_turn_ids(tokenizer), config)
    lengths = [len(s.input_ids) for s in samples]
    n_micro = settings.steps * settings.gradient_accumulation_steps
    plan = plan_micro_batches(lengths, config, True, n_micro)
    tokens_per_step = sum(lengths[i] for batch in plan for i in batch) / settings.steps
    mean_len = statistics.fmean(lengths)
    per_micro = tokens_per_step / settings.gradient_accumulation_steps
    return Plan(
        settings=settings,
        trl_batch_size=matched_batch_size(per_micro, mean_len),
        ours_tokens_per_step=tokens_per_step,
        mean_sample_tokens=mean_len,
        n_samples=len(samples),
        model_config=model_config,
    )


def run_side(side: str, plan: Plan, work_dir: Path, log_dir: Path) -> dict[str, Any]:
    """One side in its own process; returns its result, or {'error': ...} if it failed."""
    spec_path = work_dir / f"{side}-spec.json"
    result_path = work_dir / f"{side}-result.json"
    result_path.unlink(missing_ok=True)
    batch = plan.trl_batch_size if side == "trl" else plan.settings.micro_batch_size
    settings = plan.settings
    if side == "ours_rows":  # the same tokens per step as max_seq_len-long rows, one per micro-batch
        settings = replace(
            settings,
            micro_batch_size=1,
            gradient_accumulation_steps=settings.micro_batch_size * settings.gradient_accumulation_steps,
        )
    if side == "ours_flex":  # the same micro-batches, each one row with block-sparse attention
        settings = replace(settings, attn_implementation="flex_attention")
    write_json(
        spec_path,
        {
            "side": side,
            "settings": asdict(settings),
            "batch_size": batch,
            "chat_template_path": plan.trl_chat_template_path,
            "work_dir": str(work_dir),
            "result_path": str(result_path),
        },
    )
    log_path = log_dir / f"{side}.log"
    command = [sys.executable, "-m", "bench.finetune_throughput", "--worker-spec", str(spec_path)]
    log.info("%s: %s (log: %s)", side, shlex.join(command), log_path)
    started = time.monotonic()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    with log_path.open("w", encoding="utf-8") as log_file:
        process = subprocess.run(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - started
    if process.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        log.error("%s failed (exit %d); log tail:\n%s", side, process.returncode, tail)
        return {"side": side, "error": f"exit {process.returncode}", "log_tail": tail, "process_wall_s": wall}
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_wall_s"] = wall
    result["log"] = str(log_path)
    log.info(
        "%s: %.0f real tok/s, peak RSS %.0f MiB, final loss %.4f, %.0f s",
        side,
        result["tokens_per_s"],
        result["peak_rss_bytes"] / 2**20,
        result["final_loss"],
        wall,
    )
    return result


def label_check(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """Do both sides train on the same tokens? Compares the labelled samples of ours and TRL's default."""
    a, b = ours.get("labels"), trl.get("labels")
    if not a or not b:
        return {"checked": False}
    per_a, per_b = a["per_sample_label_tokens"], b["per_sample_label_tokens"]
    differing = sum(x != y for x, y in zip(per_a, per_b, strict=False)) + abs(len(per_a) - len(per_b))
    return {
        "checked": True,
        "identical": a["digest"] == b["digest"],
        "samples": [a["samples"], b["samples"]],
        "tokens": [a["tokens"], b["tokens"]],
        "label_tokens": [a["label_tokens"], b["label_tokens"]],
        "samples_with_different_label_count": differing,
    }


def summarize(results: dict[str, dict[str, Any]], plan: Plan, peak_tflops: float | None) -> dict[str, Any]:
    """Ratios ours/TRL, loss agreement and (GPU) MFU."""
    summary: dict[str, Any] = {"ratios": {}, "loss": {}, "mfu": {}}
    ours = results.get("ours", {})
    memory = memory_key(results)
    for side, result in results.items():
        if "error" in result:
            continue
        if peak_tflops and plan.model_config:
            steady = result["steady"]
            report = model_flops(
                plan.model_config,
                steady["real_tokens"],
                steady["sum_sq_lengths"],
                steady["seconds"],
                peak_tflops * 1e12,
                lora_params=result["trainable_params"],
            )
            summary["mfu"][side] = asdict(report)
        if side not in TRL_SIDES or "error" in ours:
            continue
        summary["ratios"][side] = {
            "tokens_per_s": ours["tokens_per_s"] / result["tokens_per_s"],
            "peak_memory": ours[memory] / result[memory],
            "memory_kind": memory,
        }
        diff = ours["final_loss"] - result["final_loss"]
        noise = math.sqrt(ours["final_loss_se"] ** 2 + result["final_loss_se"] ** 2)
        summary["loss"][side] = {
            "ours": ours["final_loss"],
            "theirs": result["final_loss"],
            "difference": diff,
            "noise_2se": 2 * noise,
            "within_noise": abs(diff) <= 2 * noise,
        }
    if "trl" in results and "error" not in ours and "error" not in results["trl"]:
        summary["labels"] = label_check(ours, results["trl"])
    for variant in OUR_VARIANTS:  # each against ours and TRL's sides
        figures = results.get(variant, {})
        if figures and "error" not in figures:
            summary[variant] = {
                side: {
                    "tokens_per_s": figures["tokens_per_s"] / results[side]["tokens_per_s"],
                    "peak_memory": figures[memory] / results[side][memory],
                }
                for side in ("ours", *TRL_SIDES)
                if side in results and "error" not in results[side]
            }
    return summary


# ----- report ------------------------------------------------------------------------------------------


def memory_key(results: dict[str, dict[str, Any]]) -> str:
    """Peak GPU memory when the sides ran on a GPU, else the processes' peak RSS."""
    on_gpu = any(r.get("device") == "cuda" for r in results.values() if "error" not in r)
    return "gpu_peak_bytes" if on_gpu else "peak_rss_bytes"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def results_table(document: dict[str, Any]) -> list[str]:
    results, summary = document["results"], document["summary"]
    show_mfu = bool(summary["mfu"])
    key = memory_key(results)
    on_gpu = key == "gpu_peak_bytes"
    header = [
        "side",
        "real tok/s",
        "all steps",
        "ours ÷ side",
        "peak GPU memory (max allocated)" if on_gpu else "peak RSS",
        "ours ÷ side (mem)",
        "memory before training",
        "real tok/step",
        "labelled tok/step",
        "padding",
        "final loss",
        "train s",
    ]
    if show_mfu:
        header += ["MFU (6N)", "MFU (LoRA 4N)"]
    rows = []
    for side in SIDES:
        result = results.get(side)
        if result is None:
            continue
        if "error" in result:
            rows.append([SIDE_LABELS[side], f"failed: {result['error']}", *[""] * (len(header) - 2)])
            continue
        ratio = summary["ratios"].get(side)
        cells = [
            SIDE_LABELS[side],
            f"{result['tokens_per_s']:,.0f}",
            f"{result['tokens_per_s_all_steps']:,.0f}",
            "—" if ratio is None else f"**{ratio['tokens_per_s']:.2f}x**",
            _mib(result[key]),
            "—" if ratio is None else f"{ratio['peak_memory']:.2f}",
            _mib(result["gpu_before_train_bytes" if on_gpu else "rss_before_train_bytes"]),
            f"{result['real_tokens_per_step']:,.0f}",
            f"{result['label_tokens_per_step']:,.0f}",
            f"{100 * result['padding_fraction']:.0f}%",
            f"{result['final_loss']:.3f} ± {result['final_loss_se']:.3f}",
            f"{result['train_seconds']:.1f}",
        ]
        if show_mfu:
            mfu = summary["mfu"].get(side)
            cells += (
                ["n/a", "n/a"]
                if mfu is None
                else [f"{100 * mfu['mfu']:.1f}%", f"{100 * mfu['mfu_lora']:.1f}%"]
            )
        rows.append(cells)
    return markdown_table(header, rows, "l" * len(header))


def bins(count: int) -> str:
    return f"{count} bin" + ("s" if count != 1 else "")


def _against_each(ratios: dict[str, dict[str, float]]) -> str:
    """'1.19x the speed of ours, 2.65x the speed of TRL default (memory 0.78x, 0.53x respectively)'."""
    speeds = ", ".join(
        f"{r['tokens_per_s']:.2f}x the speed of {SHORT_LABELS[side]}" for side, r in ratios.items()
    )
    memory = ", ".join(f"{r['peak_memory']:.2f}x" for r in ratios.values())
    return f"{speeds} (memory {memory} respectively)"


def interpretation(document: dict[str, Any]) -> list[str]:
    results, summary = document["results"], document["summary"]
    ours = results.get("ours", {})
    if "error" in ours:
        return ["Our side failed; see its log."]
    settings = document["plan"]["settings"]
    row = settings["micro_batch_size"] * settings["max_seq_len"]  # tokens per micro-batch
    lines: list[str] = []
    trl, ratio = results.get("trl", {}), summary["ratios"].get("trl")
    if ratio and "error" not in trl:
        speed, memory = ratio["tokens_per_s"], ratio["peak_memory"]
        verdict = "meets" if speed >= TARGET_RATIO and memory <= 1.0 else "misses"
        batch = trl["batch"]["per_device_train_batch_size"]
        rows = settings["micro_batch_size"]
        layout = (
            f"a micro-batch of up to {row} tokens is {rows} rows of at most {settings['max_seq_len']} tokens"
            if rows > 1
            else f"a micro-batch is one row of at most {row} tokens"
        )
        lines += [
            f"- Against TRL's default setup ours trains **{speed:.2f}x** the real tokens per second at "
            f"{memory:.2f}x its peak memory: this **{verdict}** the target (>= {TARGET_RATIO}x at equal "
            "or lower memory).",
            f"- What each side wastes. TRL default: {100 * trl['padding_fraction']:.0f}% of its computed "
            f"tokens are padding (batches of {batch} samples padded to the longest). Ours: no padding but "
            f"a short filler at row ends; {layout}, so with sdpa "
            "(no varlen kernel), whose block-diagonal mask is applied to a dense row x row score matrix, "
            "attention "
            f"computes {ours['attention_overcompute']:.1f}x the scores the samples need (TRL default: "
            f"{trl['attention_overcompute']:.1f}x).",
        ]
    packed, packed_ratio = results.get("trl_packed", {}), summary["ratios"].get("trl_packed")
    if packed_ratio and "error" not in packed:
        lines.append(
            f"- TRL with its own packing flattens its {bins(settings['micro_batch_size'])} into one "
            f"padding-free row as well, and pays the same attention "
            f"({packed['attention_overcompute']:.0f}x): "
            f"ours is {packed_ratio['tokens_per_s']:.2f}x its speed at {packed_ratio['peak_memory']:.2f}x "
            "its memory."
        )
    flex = summary.get("ours_flex", {})
    if flex:
        lines.append(
            "- Config variant `training.attn_implementation=flex_attention` (PyTorch's FlexAttention; it "
            f"trains on CUDA only): the same micro-batches, each one row of up to {row} tokens whose block "
            f"mask skips the {FLEX_BLOCK}x{FLEX_BLOCK} blocks where no sample meets itself "
            f"({results['ours_flex']['attention_overcompute']:.1f}x the scores the samples need, computed "
            f"as whole blocks): {_against_each(flex)}."
        )
    rows = summary.get("ours_rows", {})
    accumulation = settings["micro_batch_size"] * settings["gradient_accumulation_steps"]
    if rows:
        lines.append(
            "- Config variant, same code and the same token budget per step: `micro_batch_size=1 "
            f"gradient_accumulation_steps={accumulation}`, one row of at most {settings['max_seq_len']} "
            "tokens per forward pass instead of all rows in one batched pass "
            f"({results['ours_rows']['attention_overcompute']:.1f}x attention): {_against_each(rows)}. "
            "Rows fill a little less "
            f"({results['ours_rows']['real_tokens_per_step']:,.0f} real tokens per step)."
        )
    if summary["loss"]:
        parts = []
        for side, entry in summary["loss"].items():
            where = "within" if entry["within_noise"] else "outside"
            parts.append(
                f"{SHORT_LABELS[side]} {entry['theirs']:.3f} (difference {entry['difference']:+.3f}, "
                f"{where} 2 standard errors = {entry['noise_2se']:.3f})"
            )
        window = max(5, math.ceil(0.2 * ours["steps"]))
        lines.append(
            f"- Final training loss (mean of the last {window} steps): ours {ours['final_loss']:.3f}, "
            + "; ".join(parts)
            + "."
        )
    labels = summary.get("labels", {})
    if labels.get("checked"):
        same = "identical" if labels["identical"] else "NOT identical"
        markers = (
            "a copy of the base's chat template with `{% generation %}` markers added around each assistant "
            "reply and its `<|im_end|>`, the same rendered text, given as SFTConfig's `chat_template_path`"
            if document["plan"].get("trl_chat_template_path")
            else "the template's `{% generation %}` markers"
        )
        lines.append(
            f"- Labels: TRL's `assistant_only_loss` ({markers}) and our "
            f"recipe train on the same tokens: input ids and labels of all {labels['samples'][0]} samples "
            f"are {same} ({labels['label_tokens'][0]:,} vs {labels['label_tokens'][1]:,} labelled tokens, "
            f"{labels['samples_with_different_label_count']} samples with a different count)."
        )
    return lines


def weights_text(results: dict[str, dict[str, Any]]) -> str:
    """' Weights: frozen bfloat16, LoRA float32 on every side.' (empty for results saved without dtypes)."""
    kinds = {
        (", ".join(r["frozen_dtypes"]), ", ".join(r["trainable_dtypes"]))
        for r in results.values()
        if "error" not in r and "trainable_dtypes" in r
    }
    if len(kinds) == 1:
        ((frozen, trainable),) = kinds
        return f" Weights: frozen base {frozen}, LoRA {trainable} on every side."
    return "".join(
        f" {SHORT_LABELS[side]}: frozen base {', '.join(result['frozen_dtypes'])}, "
        f"LoRA {', '.join(result['trainable_dtypes'])}."
        for side, result in results.items()
        if "error" not in result and "trainable_dtypes" in result
    )


def precision_text(settings: dict[str, Any]) -> str:
    if settings["precision"] != "bf16":
        return settings["precision"]
    return (
        "bf16 (ours: the base loaded in bf16 and accelerate's bf16 autocast; TRL: the base loaded in bf16 "
        "and `bf16=True`, the Trainer's bf16 autocast)"
    )


def cpu_heading(document: dict[str, Any]) -> str:
    bench_base = base_for_document(document)
    if bench_base.name == DEFAULT_BASE:
        return "embedded tiny base (4 layers, hidden 256)"
    # The config as the repo names it (configs/NAME.yaml), whichever checkout recorded the absolute path.
    config = Path(document["plan"]["settings"]["config"])
    return f"{bench_base.title} (`{config.parent.name}/{config.name}`)"


def cpu_markdown(document: dict[str, Any], chart: str | None) -> list[str]:
    plan = document["plan"]
    settings = plan["settings"]
    results = document["results"]
    loads = ", ".join(
        f"{SHORT_LABELS[s]} {r['loadavg_1m_before']:.2f}->{r['loadavg_1m_after']:.2f}"
        for s, r in results.items()
        if "error" not in r
    )
    lines = [
        *header_markdown(document["header"]),
        f"- 1-minute load average before->after each side: {loads}",
        "",
        f"### CPU: {cpu_heading(document)}, `format` task data",
        "",
        *results_table(document),
        "",
        f"Same for all: {settings['steps']} optimizer steps on {plan['n_samples']} chat records "
        f"(`python -m client tasks --group format --n-train {document['n_train']}`, "
        f"{plan['mean_sample_tokens']:.1f} tokens per sample on average), LoRA r={settings['lora_r']} "
        f"alpha={settings['lora_alpha']} dropout={settings['lora_dropout']} on all linear layers, AdamW lr "
        f"{settings['learning_rate']:g} with {settings['warmup_steps']} warm-up steps then cosine to 0, "
        f"grad clip {settings['max_grad_norm']}, {precision_text(settings)}, sdpa attention, no gradient "
        f"checkpointing, max_seq_len {settings['max_seq_len']}, loss on assistant tokens only. Tokens per "
        f"step matched: ours packs as many samples as fit {settings['micro_batch_size']} x "
        f"{settings['max_seq_len']} tokens into one row ({plan['ours_tokens_per_step']:,.0f} real tokens per "
        f"step); TRL default gets {plan['trl_batch_size']} samples per batch, the count that holds the same "
        f"real tokens on average; TRL packed gets {bins(settings['micro_batch_size'])} (BFD) of "
        f"{settings['max_seq_len']} tokens, the same budget as our row. Tokens/s counts real (non-padding) "
        "tokens over the wall time of the training loop's steps (tokenization, model loading and saving are "
        "outside); TRL's are counted from the batches its "
        "`compute_loss` receives (`attention_mask.sum()`, or the flattened row when padding-free). The "
        f"first {warmup_steps_excluded(settings['steps'])} steps are left out of the real tok/s column "
        "(one-off costs: allocator growth, kernel selection, compilation); `all steps` keeps them. Peak "
        "memory is the max RSS of each side's own process (model, data, Python and libraries included). "
        "Final loss: mean ± standard error of the last 20% of the steps." + weights_text(results),
        "",
    ]
    if chart:
        lines += [f"![finetune throughput]({chart})", ""]
    return lines + interpretation(document)


MFU_FORMULA = (
    "MFU = (6 N tokens + 12 L H d sum(len^2)) / (seconds x peak bf16 dense FLOPs, 989 TFLOPs for an H100 "
    "SXM): N = matmul parameters (every linear layer and the output head, not the input-embedding "
    "lookup), tokens = real tokens, attention counted per sample (packed samples do not attend to each "
    "other), padding not counted. 'LoRA 4N' replaces 6N by what LoRA computes: 4N for frozen weights "
    "(forward + gradients through the activations, no weight gradients) + 6 x LoRA parameters."
)


def gpu_markdown(document: dict[str, Any] | None) -> list[str]:
    lines = ["### GPU: Qwen2.5-7B architecture, random weights, bf16, max_seq_len 2048", ""]
    if document is not None and document["mode"] == "gpu-smoke-cpu":
        lines = ["### GPU code path, smoke check on CPU: tiny Qwen2 config, fp32 (figures mean nothing)", ""]
    if document is None:
        return [
            *lines,
            "**Not measured in this session**: the machine that ran it has no GPU. The code path is in "
            "place and was checked on CPU with a tiny Qwen2 config (`--gpu --smoke-cpu`); run "
            "`python -m bench.finetune_throughput --gpu` on a CUDA machine to fill this in. It reports real "
            "tokens/s, peak `torch.cuda.max_memory_allocated()` and MFU, for the sides above and for ours "
            "with `flex_attention` (one packed row per micro-batch, block-sparse attention), which trains on "
            "CUDA only.",
            "",
            MFU_FORMULA,
        ]
    plan = document["plan"]
    settings = plan["settings"]
    return [
        *lines,
        *header_markdown(document["header"]),
        "",
        *results_table(document),
        "",
        f"{settings['steps']} steps; ours packs up to {settings['micro_batch_size']} x "
        f"{settings['max_seq_len']} tokens per step ({plan['ours_tokens_per_step']:,.0f} real on average), "
        f"TRL default gets {plan['trl_batch_size']} samples per batch, TRL packed "
        f"{settings['micro_batch_size']} bins of {settings['max_seq_len']}. Peak FLOPs used: "
        f"{document['peak_tflops']:g} TFLOPs; N = {matmul_params(plan['model_config']):,}.",
        "",
        MFU_FORMULA,
        "",
        *interpretation(document),
    ]


def section_markdown(
    cpu_document: dict[str, Any] | None, chart: str | None, gpu_document: dict[str, Any] | None
) -> str:
    lines = ["## Fine-tuning throughput: `finetune run` vs TRL's SFTTrainer", ""]
    if cpu_document is None:
        lines += ["CPU: not measured yet: `python -m bench.finetune_throughput`.", ""]
    else:
        lines += [*cpu_markdown(cpu_document, chart), ""]
    return "\n".join(lines + gpu_markdown(gpu_document))


def base_section_markdown(document: dict[str, Any], chart: str | None) -> str:
    """The section of a CPU run on a base other than the tiny one (no GPU part: --gpu has its own model)."""
    title = base_for_document(document).title
    lines = [f"## Fine-tuning throughput on {title}: `finetune run` vs TRL's SFTTrainer", ""]
    return "\n".join(lines + cpu_markdown(document, chart))


def plot(document: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = {s: r for s, r in document["results"].items() if "error" not in r}
    sides = [s for s in SIDES if s in results]
    key = memory_key(results)
    labels = [SHORT_LABELS[s] for s in sides]
    palette = {
        "ours": "#2a9d8f",
        "ours_rows": "#264653",
        "ours_flex": "#8ab17d",
        "trl": "#e76f51",
        "trl_packed": "#f4a261",
    }
    colors = [palette[s] for s in sides]
    figure = Figure(figsize=(13, 4))
    FigureCanvasAgg(figure)
    speed, memory, loss = figure.subplots(1, 3)
    speed.bar(labels, [results[s]["tokens_per_s"] for s in sides], color=colors)
    speed.set_title("real (non-padding) tokens / s after warm-up  (higher is better)")
    memory.bar(labels, [results[s][key] / 2**20 for s in sides], color=colors)
    memory.set_title(
        ("peak GPU memory" if key == "gpu_peak_bytes" else "peak RSS") + " (MiB, lower is better)"
    )
    for axis, name in ((speed, "tokens_per_s"), (memory, key)):
        for index, side in enumerate(sides):
            value = results[side][name] / (1 if name == "tokens_per_s" else 2**20)
            axis.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom", fontsize=9)
    for side, color in zip(sides, colors, strict=True):
        losses = results[side]["losses"]
        loss.plot(range(1, len(losses) + 1), losses, label=SHORT_LABELS[side], color=color, linewidth=1.2)
    loss.set_title("training loss per step")
    loss.set_xlabel("optimizer step")
    loss.legend()
    bench_base = base_for_document(document)
    on = "" if bench_base.name == DEFAULT_BASE else f", {bench_base.title}"
    figure.suptitle(f"LoRA fine-tuning, {document['mode']}{on}: ours vs TRL SFTTrainer")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----- main ------------------------------------------------------------------------------------------------


def load_saved(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def publish_saved(folder: Path) -> int:
    """The section of BENCHMARKS.md again from the documents saved in `folder` (after a text change)."""
    cpu_document = load_saved(folder / "results.json")
    if cpu_document is not None and base_for_document(cpu_document).name != DEFAULT_BASE:
        section = base_for_document(cpu_document).section(NAME)
        publish_section(
            section, base_section_markdown(cpu_document, f"bench/results/{section}/{NAME}.png"), write=True
        )
        return 0
    gpu_document = load_saved(folder / "results-gpu.json")
    if cpu_document is None and gpu_document is None:
        raise SystemExit(f"--from-json: neither results.json nor results-gpu.json in {folder}")
    markdown = section_markdown(cpu_document, f"bench/results/{NAME}/{NAME}.png", gpu_document)
    publish_section(NAME, markdown, write=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune_throughput",
        description="Our LoRA fine-tuning (finetune run) against TRL's SFTTrainer with PEFT on the same "
        "base, data and settings: real tokens/s, peak memory, final loss, ratio ours/TRL. Writes "
        "bench/results/finetune_throughput/ and the finetune_throughput section of BENCHMARKS.md "
        "(finetune_throughput-smollm2 with --base smollm2).",
    )
    add_base_option(parser)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per side (default: 60 on CPU, 20 with --gpu, 6 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few steps, results under --work-dir only, BENCHMARKS.md untouched",
    )
    parser.add_argument(
        "--sides",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated sides to run, in this order (default: {','.join(SIDES)}; "
        f"{', '.join(CUDA_ONLY_SIDES)} with --gpu only; ours_rows only where a micro-batch has several rows)",
    )
    parser.add_argument(
        "--n-train", type=int, default=2000, help="training records generated (default: 2000)"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="Qwen2.5-7B architecture (random weights), bf16, max_seq_len 2048, on a CUDA GPU",
    )
    parser.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="with --gpu: run the GPU code path on CPU with a tiny Qwen2 config (a check only)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="ours: rows of max_seq_len per packed micro-batch; TRL packed: bins per batch "
        "(default: the tiny-demo config's 8 on CPU, 2 with --gpu)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="turn gradient checkpointing on for every side (default: off, as in our configs)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_BF16_DENSE_TFLOPS,
        help="the GPU's peak dense bf16 TFLOPs for MFU (default: 989, H100 SXM)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench-finetune-throughput",
        help="data, models, logs, and --quick/--smoke-cpu results (default: %(default)s)",
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: rewrite the section from the saved results.json and results-gpu.json",
    )
    parser.add_argument("--worker-spec", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker_spec is not None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return worker_main(args.worker_spec)
    if args.from_json is not None:
        return publish_saved(args.from_json.parent)
    if args.smoke_cpu and not args.gpu:
        parser.error("--smoke-cpu goes with --gpu")
    if args.gpu and args.base != DEFAULT_BASE:
        parser.error("--gpu builds its own model (Qwen2.5-7B architecture); leave --base at its default")
    bench_base: BenchBase = BASES[args.base]
    on_cuda = args.gpu and not args.smoke_cpu
    if args.sides is None:
        args.sides = [side for side in SIDES if on_cuda or side not in CUDA_ONLY_SIDES]
        if not args.gpu and not several_rows(bench_base, args.micro_batch_size):
            args.sides.remove("ours_rows")  # one row per micro-batch already: ours_rows would be ours again
    for side in args.sides:
        if side not in SIDES:
            parser.error(f"--sides: unknown side {side!r}; choose from {', '.join(SIDES)}")
        if side in CUDA_ONLY_SIDES and not on_cuda:
            parser.error(f"--sides: {side} trains on a CUDA GPU only (FlexAttention has no CPU backward)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")

    mode = "cpu" if not args.gpu else "gpu-smoke-cpu" if args.smoke_cpu else "gpu"
    if mode == "gpu" and not _cuda():
        parser.error("--gpu needs a CUDA GPU; use --gpu --smoke-cpu to check the code path on CPU")
    scratch = mode == "gpu-smoke-cpu" or args.quick
    default_steps = 6 if args.quick or mode == "gpu-smoke-cpu" else 20 if mode == "gpu" else 60
    steps = args.steps or default_steps
    section = bench_base.section(NAME)
    header, work_dir, out_dir = start_run(
        "bench.finetune_throughput", argv, args.work_dir, section, scratch=scratch
    )
    log_dir = work_dir / f"logs-{mode}"
    log_dir.mkdir(exist_ok=True)
    data = prepare_data(work_dir, args.n_train)
    trl_template = None
    if mode == "cpu":
        base = bench_base.build()
        model_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        settings = settings_from_demo_config(
            base,
            data,
            steps,
            micro_batch_size=args.micro_batch_size,
            gradient_checkpointing=args.gradient_checkpointing,
            demo_config=bench_base.finetune_config,
        )
        peak_tflops = None
        trl_template = trl_chat_template(base, work_dir)
    else:
        architecture = QWEN25_7B if mode == "gpu" else QWEN2_SMOKE
        precision = "bf16" if mode == "gpu" else "fp32"
        base = build_random_qwen2(work_dir / f"qwen2-random-{mode}", architecture, dtype_name=precision)
        model_config = dict(architecture)
        settings = settings_from_demo_config(
            base,
            data,
            steps,
            max_seq_len=2048,
            micro_batch_size=args.micro_batch_size or 2,
            precision=precision,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        peak_tflops = args.peak_tflops
    plan = make_plan(settings, model_config)
    plan.trl_chat_template_path = trl_template
    log.info(
        "plan: %d steps, ours %.0f real tokens/step, TRL default batch %d samples (mean sample %.1f tokens)",
        steps,
        plan.ours_tokens_per_step,
        plan.trl_batch_size,
        plan.mean_sample_tokens,
    )
    results = {side: run_side(side, plan, work_dir, log_dir) for side in args.sides}  # one after the other
    summary = summarize(results, plan, peak_tflops)
    for result in results.values():  # per-sample label counts were for the check only
        if "labels" in result:
            result["labels"].pop("per_sample_label_tokens")
    document = {
        "header": header,
        "base": bench_base.name,
        "mode": mode,
        "n_train": args.n_train,
        "peak_tflops": peak_tflops,
        "plan": asdict(plan),
        "results": results,
        "summary": summary,
    }
    json_name = {
        "cpu": "results.json",
        "gpu": "results-gpu.json",
        "gpu-smoke-cpu": "results-gpu-smoke-cpu.json",
    }
    write_json(out_dir / json_name[mode], document)
    chart_name = f"{NAME}{'' if mode == 'cpu' else '-' + mode}.png"
    plot(document, out_dir / chart_name)

    cpu_path, gpu_path = results_dir(NAME) / "results.json", results_dir(NAME) / "results-gpu.json"
    chart = f"bench/results/{section}/{chart_name}"
    if bench_base.name != DEFAULT_BASE:  # its own section, CPU only
        markdown = base_section_markdown(document, None if scratch else chart)
        publish_section(section, markdown, write=not (scratch or args.no_markdown))
    elif mode == "gpu-smoke-cpu":  # a check of the code path: printed, never written to BENCHMARKS.md
        print("\n".join(gpu_markdown(document)))
    elif mode == "gpu":
        cpu_document = load_saved(cpu_path)
        markdown = section_markdown(cpu_document, f"bench/results/{NAME}/{NAME}.png", document)
        publish_section(NAME, markdown, write=not (scratch or args.no_markdown))
    else:
        gpu_document = load_saved(gpu_path)
        markdown = section_markdown(document, None if scratch else chart, gpu_document)
        publish_section(NAME, markdown, write=not (scratch or args.no_markdown))
    failed = [side for side, result in results.items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
