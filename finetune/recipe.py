"""The LoRA fine-tuning recipe: setup -> train -> save, on one device or many (accelerate/torchrun, DDP).

Read top to bottom: `run(config)` is the whole job; checkpoints make a killed run resumable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from finetune import artifacts
from finetune.batching import Batch, collate_packed, collate_padded, plan_packed, plan_padded, token_loss_sum
from finetune.config import ConfigError, FinetuneConfig, LoraSettings, dump_config
from finetune.data import DataReport, Record, load_data, recorded_paths
from finetune.lineage import load_parent_weights, read_parent
from finetune.prompting import EncodedSample, PromptError, encode_conversation, encode_raw, end_of_turn_ids
from finetune.servable import check_lora_weights
from finetune.task_eval import follow_flags, load_task_prompts, prompt_ids
from tuneserve.manifest import ADAPTER_WEIGHTS, MANIFEST

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    step: int = 0
    tokens: int = 0
    label_tokens: int = 0
    train_seconds: float = 0.0
    best_eval_loss: float | None = None  # the lowest eval loss seen
    best_step: int | None = None  # the best step by training.best_metric, whose weights best_weights holds
    best_value: float | None = None  # training.best_metric at best_step
    evals_without_improvement: int = 0
    stopped_early: bool = False
    train_history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    task_history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EncodingReport:
    n_samples: int = 0
    n_truncated: int = 0
    n_dropped_overlong: int = 0
    n_dropped_no_labels: int = 0


# ---------------------------------------------------------------------------------------------- setup


def partial_dir(output_dir: Path) -> Path:
    """Work folder of a run in progress (checkpoints); removed once the adapter is in place."""
    return output_dir.with_name(output_dir.name + ".partial")


def native_bf16() -> bool:
    """Whether this machine computes in bf16 natively: a CUDA GPU that supports it, else a CPU with
    AVX512-BF16 or AMX (there bf16 autocast trained SmolLM2-135M 1.3x faster than fp32; without them
    bf16 is emulated and slower)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(config: FinetuneConfig) -> torch.dtype:
    requested = config.training.precision
    if requested == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return torch.bfloat16 if requested == "bf16" else torch.float32


def encode_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], config: FinetuneConfig
) -> tuple[list[EncodedSample], EncodingReport]:
    """Render and tokenize every record; apply the over-length policy, counting what it does."""
    max_len = config.data.max_seq_len
    eos_id = tokenizer.eos_token_id
    assert eos_id is not None  # end_of_turn_ids already refused a tokenizer without EOS
    report = EncodingReport()
    samples = []
    for record in records:
        try:
            if record.raw is not None:
                sample = encode_raw(tokenizer, *record.raw, eos_id=eos_id)
            else:
                sample = encode_conversation(
                    tokenizer, record.to_messages(), stop_ids, tools=record.tool_list()
                )
        except PromptError as exc:
            raise PromptError(f"{record.origin}: {exc}") from None
        if len(sample.input_ids) > max_len:
            if config.data.overlong == "drop":
                report.n_dropped_overlong += 1
                continue
            sample = EncodedSample(sample.input_ids[:max_len], sample.labels[:max_len])
            report.n_truncated += 1
        # The first token is never a target (see batching), so a sample needs a label after it.
        if sum(label != -100 for label in sample.labels[1:]) == 0:
            report.n_dropped_no_labels += 1
            continue
        samples.append(sample)
    report.n_samples = len(samples)
    return samples, report


def refuse_cuda_only_settings(config: FinetuneConfig, device: torch.device) -> None:
    """Settings that train on a CUDA GPU only, refused before any data or model is loaded elsewhere."""
    flex = config.training.attn_implementation == "flex_attention"
    if device.type == "cuda":
        if flex and importlib.util.find_spec("triton") is None:
            raise ConfigError(
                "training.attn_implementation=flex_attention compiles its kernels with Triton, which is not "
                "installed; install triton (it comes with CUDA builds of torch) or use sdpa"
            )
        return
    if config.training.quantization == "4bit":
        raise ConfigError("training.quantization=4bit (QLoRA) needs a CUDA GPU; set it to none on CPU")
    if flex:
        raise ConfigError(
            "training.attn_implementation=flex_attention trains on a CUDA GPU only (PyTorch's FlexAttention "
            "has no backward pass on CPU); use sdpa on CPU"
        )


def peft_lora_config(lora: LoraSettings) -> LoraConfig:
    """PEFT's LoraConfig for the `lora:` section of a config: the one place its fields map onto PEFT's (the
    fine-tuning benchmark gives TRL's side the same)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(config: FinetuneConfig, dtype: torch.dtype, accelerator: Accelerator) -> PeftModel:
    """The base model with LoRA adapters attached; only the adapters are trainable."""
    kwargs: dict[str, Any] = {
        "revision": config.revision,
        "dtype": dtype,
        "attn_implementation": config.training.attn_implementation,
    }
    if config.training.quantization == "4bit":
        from transformers import BitsAndBytesConfig  # GPU-only path; bitsandbytes comes with the gpu extra

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": accelerator.local_process_index}
    model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    if config.training.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    elif config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, peft_lora_config(config.lora))
    _refuse_unservable_targets(peft_model)
    return peft_model


def _refuse_unservable_targets(model: PeftModel) -> None:
    """vLLM serves LoRA on linear projections only; catch an embedding or the output head by type."""
    output_head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Embedding) or base is output_head:
            raise ConfigError(
                f"lora.target_modules adapts {name}, an embedding or output head, which vLLM's LoRA cannot "
                "serve; target the attention/MLP projections instead (or use all-linear)"
            )


def packing_isolates_samples(
    model: torch.nn.Module, samples: list[EncodedSample], dtype: torch.dtype
) -> bool:
    """Probe: are a sample's logits the same alone and packed after another sample?

    True for every attention implementation built on transformers' mask utilities (block-diagonal mask
    from restarting position ids) and for flash attention's varlen path; a model with its own attention
    code may ignore position ids, in which case the recipe falls back to padded batches.
    """
    first, second = (EncodedSample(s.input_ids[:16], s.labels[:16]) for s in samples[:2])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = collate_packed([second]).to(device)
        packed = collate_packed([first, second]).to(device)
        logits_alone = model(
            input_ids=alone.input_ids, position_ids=alone.position_ids, use_cache=False
        ).logits
        logits_packed = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
        ).logits[:, len(first.input_ids) :]
    model.train(was_training)
    scale = logits_alone.abs().max().clamp(min=1.0)
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return bool(((logits_packed - logits_alone).abs().max() / scale) < tolerance)


# Attention kernels that cost nothing for the parts of a long packed row where samples do not meet: flash's
# varlen kernel, and FlexAttention's block-sparse mask. A micro-batch is then one row (see finetune.batching).
ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def packed_row_len(config: FinetuneConfig) -> int | None:
    """Tokens per packed row: max_seq_len for dense attention (SDPA, eager), None (one row) for flash/flex."""
    return None if config.training.attn_implementation in ONE_ROW_ATTENTION else config.data.max_seq_len


def plan_epoch(lengths: list[int], config: FinetuneConfig, packing: bool, seed: int) -> list[list[int]]:
    """One pass over all samples as micro-batches of sample indices, in a seeded order."""
    training = config.training
    if packing:
        one_row = packed_row_len(config) is None
        return plan_packed(lengths, training.micro_batch_size, config.data.max_seq_len, seed, one_row=one_row)
    return plan_padded(lengths, training.micro_batch_size, seed)


def plan_micro_batches(
    lengths: list[int], config: FinetuneConfig, packing: bool, n_micro: int
) -> list[list[int]]:
    """`n_micro` micro-batches, epoch after epoch, each epoch in its own seeded order."""
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < n_micro:
        plan.extend(plan_epoch(lengths, config, packing, config.seed + epoch))
        epoch += 1
    return plan[:n_micro]


def count_steps(lengths: list[int], config: FinetuneConfig, packing: bool, world_size: int) -> int:
    training = config.training
    if training.max_steps is not None:
        return training.max_steps
    per_epoch = len(plan_epoch(lengths, config, packing, config.seed))
    per_step = training.gradient_accumulation_steps * world_size
    return max(1, math.floor(training.epochs * per_epoch / per_step))


# ------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is written as *.tmp and renamed when complete)."""
    if not checkpoints.is_dir():
        return []
    done = [p for p in checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.suffix != ".tmp"]
    return sorted(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ the run


class LoraRecipe:
    """One fine-tuning run. `run(config)` below drives it; tests may call the phases one by one."""

    def __init__(self, config: FinetuneConfig, *, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.output_dir = Path(config.output_dir)
        self.work_dir = partial_dir(self.output_dir)
        self.checkpoint_dir = self.work_dir / "checkpoints"
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.started = time.monotonic()

    # ---- setup
    def setup(self) -> None:
        config = self.config
        self._check_paths()
        self.dtype = resolve_precision(config)
        self.accelerator = Accelerator(mixed_precision="bf16" if self.dtype == torch.bfloat16 else "no")
        refuse_cuda_only_settings(config, self.accelerator.device)
        set_seed(config.seed)

        # A parent that does not fit is refused before any data or weights are read.
        self.parent = read_parent(config) if config.init_from is not None else None
        self.tokenizer = AutoTokenizer.from_pretrained(config.base_model, revision=config.revision)
        task_eval = config.training.task_eval
        self.task_prompts = load_task_prompts(task_eval.path, task_eval.n, config.seed) if task_eval else []
        self.task_ids = prompt_ids(self.tokenizer, self.task_prompts, config.data.system_prompt)
        parent_paths = self.parent.data_paths() if self.parent is not None else None
        train_records, eval_records, self.data_report = load_data(config.data, config.seed, parent_paths)
        self.data_paths = recorded_paths(config.data, parent_paths or [])
        generation_eos = self._generation_eos()
        stop_ids = self.stop_ids = end_of_turn_ids(self.tokenizer, generation_eos)
        self.train_samples, self.train_encoding = encode_records(
            train_records, self.tokenizer, stop_ids, config
        )
        self.eval_samples, self.eval_encoding = encode_records(eval_records, self.tokenizer, stop_ids, config)
        if not self.train_samples:
            raise TrainingError("no training sample is left after tokenization; see the counts logged above")
        log.info(
            "samples: %d train, %d eval (truncated %d, dropped over-long %d, dropped without labels %d)",
            len(self.train_samples),
            len(self.eval_samples),
            self.train_encoding.n_truncated + self.eval_encoding.n_truncated,
            self.train_encoding.n_dropped_overlong + self.eval_encoding.n_dropped_overlong,
            self.train_encoding.n_dropped_no_labels + self.eval_encoding.n_dropped_no_labels,
        )

        model = load_model(config, self.dtype, self.accelerator)
        if self.parent is not None and not self.resume:  # resumed: the checkpoint holds the weights
            load_parent_weights(model, self.parent)
        if self.config.training.quantization == "none":
            model.to(self.accelerator.device)
        self.packing = config.training.packing
        if (
            self.packing
            and len(self.train_samples) >= 2
            and not packing_isolates_samples(model, self.train_samples, self.dtype)
        ):
            log.warning(
                "attention implementation %s lets packed samples see each other; "
                "falling back to padded, length-grouped batches",
                config.training.attn_implementation,
            )
            self.packing = False
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in model.parameters())
        log.info("trainable parameters: %d of %d (%.3f%%)", n_trainable, n_total, 100 * n_trainable / n_total)

        training = config.training
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=training.learning_rate,
            betas=training.adam_betas,
            weight_decay=training.weight_decay,
        )
        self.model = self.accelerator.prepare_model(model)
        world = self.accelerator.num_processes
        lengths = [len(s.input_ids) for s in self.train_samples]
        self.total_steps = count_steps(lengths, config, self.packing, world)
        accumulation = training.gradient_accumulation_steps
        self.plan = plan_micro_batches(lengths, config, self.packing, self.total_steps * accumulation * world)
        eval_lengths = [len(s.input_ids) for s in self.eval_samples]
        self.eval_plan = plan_epoch(eval_lengths, config, self.packing, config.seed)
        self.scheduler = self._make_scheduler()
        if self.resume:
            self._load_checkpoint()
        elif self.accelerator.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.config_path(self.work_dir).write_text(dump_config(config), encoding="utf-8")

    def _check_paths(self) -> None:
        if self.output_dir.exists() and not self.config.overwrite:
            raise ConfigError(
                f"output_dir {self.output_dir} already exists; use another output_dir or set overwrite=true"
            )
        existing = list_checkpoints(self.checkpoint_dir)
        if self.resume and not existing:
            raise TrainingError(f"--resume: no checkpoint in {self.checkpoint_dir} to resume from")
        if not self.resume and existing:
            raise TrainingError(
                f"an earlier run left checkpoints in {self.checkpoint_dir}; pass --resume to continue it, "
                f"or delete {self.work_dir} to start over"
            )

    def _generation_eos(self) -> Any:
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(
                self.config.base_model, revision=self.config.revision or "main"
            ).eos_token_id
        except OSError:
            return None

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        training = self.config.training
        warmup = math.ceil(training.warmup_ratio * self.total_steps)
        name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
        extra = {"min_lr_rate": training.min_lr_ratio} if training.lr_scheduler == "cosine" else None
        return get_scheduler(
            name[training.lr_scheduler],
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
            scheduler_specific_kwargs=extra,
        )

    # ---- train
    def _collate(self, samples: list[EncodedSample], indices: list[int]) -> Batch:
        chosen = [samples[i] for i in indices]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.packing:
            return collate_packed(chosen, packed_row_len(self.config), pad_id)
        return collate_padded(chosen, pad_id)

    def train(self) -> None:
        accelerator = self.accelerator
        training = self.config.training
        accumulation = training.gradient_accumulation_steps
        world, rank = accelerator.num_processes, accelerator.process_index
        per_step = accumulation * world
        if self.state.step == 0 and self._evaluates:
            self._evaluate()
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not accelerator.is_main_process,
        )
        self.model.train()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            tick = time.monotonic()
            step_batches = self.plan[self.state.step * per_step : (self.state.step + 1) * per_step]
            # Every rank knows the whole plan, so the step's global count of target tokens needs no
            # communication; each micro-batch's summed loss is divided by it, which makes the update
            # the mean over all target tokens of the step, however they fall into micro-batches.
            collated = [self._collate(self.train_samples, indices) for indices in step_batches]
            global_targets = sum(batch.n_label_tokens for batch in collated)
            mine = collated[rank * accumulation : (rank + 1) * accumulation]
            loss_sum = torch.zeros((), device=accelerator.device)
            for index, batch in enumerate(mine):
                last = index == len(mine) - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(self.model)
                with sync, accelerator.autocast():
                    summed = token_loss_sum(self.model, batch.to(accelerator.device))
                    # DDP averages gradients over ranks; scale by world size to keep the global mean.
                    accelerator.backward(summed * world / global_targets)
                loss_sum += summed.detach()
            grad_norm = None
            if training.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), training.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            loss = float(accelerator.reduce(loss_sum, reduction="sum")) / global_targets
            if not math.isfinite(loss):
                progress.close()
                raise self._diverged(f"at step {self.state.step + 1} the training loss is {loss}")
            self.state.step += 1
            self.state.tokens += sum(batch.n_tokens for batch in collated)
            self.state.label_tokens += global_targets
            self.state.train_seconds += time.monotonic() - tick
            tokens_per_s = self.state.tokens / max(self.state.train_seconds, 1e-9)
            if self.state.step % training.log_every == 0 or self.state.step == self.total_steps:
                self.state.train_history.append(
                    {
                        "step": self.state.step,
                        "loss": loss,
                        "lr": float(self.scheduler.get_last_lr()[0]),
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens": self.state.tokens,
                        "train_seconds": self.state.train_seconds,
                        "tokens_per_s": tokens_per_s,
                    }
                )
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            at_end = self.state.step == self.total_steps
            if self._evaluates and (self.state.step % training.eval_every == 0 or at_end):
                self._evaluate()
            if self.state.step % training.save_every == 0 and not at_end and not self.state.stopped_early:
                self._save_checkpoint()
        progress.close()

    def _diverged(self, what: str) -> TrainingError:
        # An adapter with NaN or infinite weights, once served, corrupts the answers of every request batched
        # with it; such a run must never publish one.
        return TrainingError(
            f"the run diverged: {what}; nothing was written to {self.output_dir}. Lower "
            f"training.learning_rate (now {self.config.training.learning_rate:g}), keep gradient clipping on "
            f"(training.max_grad_norm, now {self.config.training.max_grad_norm}), or train in fp32"
        )

    @property
    def _evaluates(self) -> bool:
        return bool(self.eval_plan or self.task_prompts)

    def _evaluate(self) -> None:
        """Eval loss and task score, as configured; then the best checkpoint and early stopping."""
        state, training = self.state, self.config.training
        values: dict[str, float] = {}
        if self.eval_plan:
            loss = values["eval_loss"] = self._eval_loss()
            state.eval_history.append({"step": state.step, "loss": loss})
            state.best_eval_loss = loss if state.best_eval_loss is None else min(state.best_eval_loss, loss)
            log.info("step %d: eval loss %.4f", state.step, loss)
        if self.task_prompts:
            passed, n = self._task_passes()
            score = values["task_score"] = passed / n
            state.task_history.append({"step": state.step, "score": score, "passed": passed, "n": n})
            log.info("step %d: task score %.3f (%d of %d prompts followed)", state.step, score, passed, n)
        value = values.get(training.best_metric)
        if value is None:  # eval loss chosen, and the eval split came out empty
            return
        delta = training.early_stopping_min_delta
        lower_is_better = training.best_metric == "eval_loss"
        if state.best_value is None or (
            value < state.best_value - delta if lower_is_better else value > state.best_value + delta
        ):
            state.best_value, state.best_step = value, state.step
            state.evals_without_improvement = 0
            unwrapped = self.accelerator.unwrap_model(self.model)
            self.best_weights = {
                k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unwrapped).items()
            }
        elif state.step > 0:
            state.evals_without_improvement += 1
            patience = training.early_stopping_patience
            if patience is not None and state.evals_without_improvement >= patience:
                log.info(
                    "early stopping at step %d: no %s improvement in %d evals (best %.4f at step %s)",
                    state.step,
                    training.best_metric,
                    patience,
                    state.best_value,
                    state.best_step,
                )
                state.stopped_early = True

    @torch.no_grad()
    def _eval_loss(self) -> float:
        accelerator = self.accelerator
        plan = self.eval_plan
        if self.config.training.eval_batches is not None:
            plan = plan[: self.config.training.eval_batches]
        mine = plan[accelerator.process_index :: accelerator.num_processes]
        self.model.eval()
        loss_sum = torch.zeros((), device=accelerator.device)
        targets = torch.zeros((), device=accelerator.device)
        for indices in mine:
            batch = self._collate(self.eval_samples, indices).to(accelerator.device)
            with accelerator.autocast():
                loss_sum += token_loss_sum(self.model, batch)
            targets += batch.n_label_tokens
        self.model.train()
        return float(
            accelerator.reduce(loss_sum, reduction="sum") / accelerator.reduce(targets, reduction="sum")
        )

    @torch.no_grad()
    def _task_passes(self) -> tuple[int, int]:
        """How many task prompts the model's greedy replies follow; each rank generates its share."""
        accelerator, task_eval = self.accelerator, self.config.training.task_eval
        assert task_eval is not None
        mine = range(accelerator.process_index, len(self.task_prompts), accelerator.num_processes)
        model = accelerator.unwrap_model(self.model)
        model.eval()
        with accelerator.autocast():
            flags = follow_flags(
                model,
                self.tokenizer,
                [self.task_prompts[i] for i in mine],
                [self.task_ids[i] for i in mine],
                self.stop_ids,
                max_new_tokens=task_eval.max_new_tokens,
                batch_size=task_eval.batch_size,
                device=accelerator.device,
            )
        self.model.train()
        passed = accelerator.reduce(torch.tensor(sum(flags), device=accelerator.device), reduction="sum")
        return int(passed), len(self.task_prompts)

    def _save_checkpoint(self) -> None:
        accelerator = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(tmp / "adapter")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.best_weights is not None:
                save_file(self.best_weights, tmp / "best_adapter.safetensors")
            (tmp / "state.json").write_text(json.dumps(asdict(self.state)), encoding="utf-8")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, final)
            for old in list_checkpoints(self.checkpoint_dir)[: -self.config.training.keep_checkpoints]:
                shutil.rmtree(old)
            log.info("checkpoint saved: %s", final)

    def _load_checkpoint(self) -> None:
        saved_config = self.config_path(self.work_dir)
        if saved_config.is_file() and saved_config.read_text(encoding="utf-8") != dump_config(self.config):
            raise TrainingError(
                f"--resume: the config differs from the one the checkpoints were made with ({saved_config}); "
                "resume with the same config and overrides"
            )
        latest = list_checkpoints(self.checkpoint_dir)[-1]
        unwrapped = self.accelerator.unwrap_model(self.model)
        set_peft_model_state_dict(unwrapped, load_file(str(latest / "adapter" / "adapter_model.safetensors")))
        self.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=False))
        best = latest / "best_adapter.safetensors"
        self.best_weights = load_file(str(best)) if best.is_file() else None
        self.state = TrainState(**json.loads((latest / "state.json").read_text(encoding="utf-8")))
        rng = latest / f"rng-{self.accelerator.process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        log.info("resumed from %s (step %d of %d)", latest, self.state.step, self.total_steps)

    @staticmethod
    def config_path(folder: Path) -> Path:
        return folder / "config.yaml"

    # ---- save
    def save(self) -> Path:
        """Write the adapter and its reports to a staging folder, then move it to output_dir in one rename."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return self.output_dir
        model = accelerator.unwrap_model(self.model)
        training = self.config.training
        wants_best = training.export == "best" or (
            training.export == "auto" and training.early_stopping_patience is not None
        )
        export_best = wants_best and self.best_weights is not None
        if wants_best and not export_best:
            log.warning(
                "no %s was measured (the eval split is empty); exporting the final weights",
                training.best_metric,
            )
        if export_best:
            assert self.best_weights is not None
            set_peft_model_state_dict(model, self.best_weights)
        staging = self.work_dir / "export.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        try:
            check_lora_weights(staging / ADAPTER_WEIGHTS[0])
        except ValueError as exc:
            raise self._diverged(f"the adapter's weights are not finite ({exc})") from exc
        artifacts.set_adapter_base(staging, self.config.base_model)
        self.config_path(staging).write_text(dump_config(self.config), encoding="utf-8")
        metrics = self._metrics(exported="best" if export_best else "final")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        artifacts.plot_loss(metrics, staging / "loss.png")
        manifest = artifacts.build_manifest(
            staging,
            self.config,
            model,
            data_hash=self.data_report.data_hash,
            data_paths=self.data_paths,
            metrics=metrics,
            tokenizer=self.tokenizer,
        )
        if self.parent is not None:
            manifest["parent"] = self.parent.record()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        artifacts.publish(staging, self.output_dir, overwrite=self.config.overwrite)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        log.info("adapter written to %s", self.output_dir)
        return self.output_dir

    def _metrics(self, *, exported: str) -> dict[str, Any]:
        state = self.state
        if torch.cuda.is_available():
            peak, peak_kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"
        report: DataReport = self.data_report
        return {
            "steps": state.step,
            "total_steps": self.total_steps,
            "stopped_early": state.stopped_early,
            "exported": exported,
            "train_loss": state.train_history,
            "eval_loss": state.eval_history,
            "final_train_loss": state.train_history[-1]["loss"] if state.train_history else None,
            "initial_eval_loss": state.eval_history[0]["loss"] if state.eval_history else None,
            "final_eval_loss": state.eval_history[-1]["loss"] if state.eval_history else None,
            "best_eval_loss": state.best_eval_loss,
            "task_score": state.task_history,
            "initial_task_score": state.task_history[0]["score"] if state.task_history else None,
            "final_task_score": state.task_history[-1]["score"] if state.task_history else None,
            "best_task_score": max((p["score"] for p in state.task_history), default=None),
            "best_metric": self.config.training.best_metric,
            "best_step": state.best_step,
            "best_value": state.best_value,
            "tokens": state.tokens,
            "target_tokens": state.label_tokens,
            "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds,
            "wall_seconds": time.monotonic() - self.started,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "device": str(self.accelerator.device),
            "world_size": self.accelerator.num_processes,
            "precision": str(self.dtype).removeprefix("torch."),
            "packing": self.packing,
            "data": {
                **asdict(report),
                "train_encoding": asdict(self.train_encoding),
                "eval_encoding": asdict(self.eval_encoding),
            },
        }


def run(config: FinetuneConfig, *, resume: bool = False) -> Path:
    """Fine-tune a LoRA adapter as `config` says; returns the adapter folder."""
    recipe = LoraRecipe(config, resume=resume)
    recipe.setup()
    recipe.train()
    return recipe.save()
