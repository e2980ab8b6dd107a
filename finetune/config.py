"""Typed fine-tuning config: YAML file + `key=value` overrides, validated at load time.

Every error names the offending field (dotted path) and says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.servable import check_lora_settings


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PARENT_DATA = "@parent"  # a data source that stands for the training data of init_from's adapter


class DataSource(_Strict):
    """One data set of a mix: how many of its training records the run uses."""

    path: str = Field(
        description="Local .json/.jsonl/.parquet file, a hub dataset id, or @parent: the data init_from's "
        "adapter was trained on (replay)."
    )
    split: str = Field("train", description="Split to read when `path` is a hub dataset id.")
    weight: float | None = Field(
        None,
        gt=0,
        description="Records taken, as a multiple of the source's own training records: 0.3 = a seeded 30% "
        "sample, 2 = each record twice (default 1 when count is unset).",
    )
    count: int | None = Field(
        None, ge=1, description="Exactly this many training records (repeating records if it holds fewer)."
    )

    @model_validator(mode="after")
    def _weight_or_count(self) -> DataSource:
        if self.weight is not None and self.count is not None:
            raise ValueError("give weight or count, not both")
        return self


class DataConfig(_Strict):
    """Where the instruction data comes from and how it becomes training samples."""

    path: str | None = Field(
        None, description="Local .json/.jsonl/.parquet file, or a hub dataset id (or give `sources`)."
    )
    sources: list[DataSource] | None = Field(
        None,
        min_length=1,
        description="Several data sets mixed, each by weight or count (instead of `path`); each is split "
        "into train and eval on its own, eval takes every source's held-out part.",
    )
    format: Literal["auto", "alpaca", "chat", "prompt_completion"] = Field(
        "auto", description="Record format; `auto` detects it from each record's fields."
    )
    split: str = Field("train", description="Split to read when `path` is a hub dataset id.")
    eval_path: str | None = Field(
        None, description="Separate eval data; if unset, `eval_fraction` is held out."
    )
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of records held out for eval loss.")
    dedupe: bool = Field(True, description="Drop exact duplicate conversations (reported with a count).")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="`error` stops at the first bad record (file, line, field); `skip` counts them."
    )
    system_prompt: str | None = Field(None, description="System message added to records that have none.")
    prompt_completion_style: Literal["chat", "raw"] = Field(
        "chat",
        description="prompt/completion records: `chat` renders them as one user/assistant turn, "
        "`raw` trains on the plain concatenation followed by EOS.",
    )
    max_seq_len: int = Field(1024, ge=16, description="Token limit per sample (and per packed row).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer samples.")
    limit: int | None = Field(None, ge=1, description="Use only the first N records (after de-duplication).")

    @model_validator(mode="after")
    def _path_or_sources(self) -> DataConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError("give either path (one data set) or sources (a mix), not both or neither")
        if self.sources is not None and self.limit is not None:
            raise ValueError("limit applies to one path; with sources, give each source a count")
        return self

    def source_paths(self) -> list[str]:
        return [self.path] if self.path is not None else [source.path for source in self.sources or []]


class LoraSettings(_Strict):
    """LoRA hyper-parameters; anything vLLM cannot serve is refused here, before training."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(
        32, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; `all-linear` = every linear projection but lm_head."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Refused: vLLM cannot serve DoRA adapters.")
    modules_to_save: list[str] | None = Field(None, description="Refused: vLLM cannot serve modules_to_save.")

    @model_validator(mode="after")
    def _servable(self) -> LoraSettings:
        targets = None if self.target_modules == "all-linear" else list(self.target_modules)
        problems = check_lora_settings(
            r=self.r, use_dora=self.use_dora, modules_to_save=self.modules_to_save, target_modules=targets
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TaskEvalConfig(_Strict):
    """Greedy replies of the model being trained to held-out prompts checked by rules, at every eval pass."""

    path: str = Field(
        description="JSONL of held-out prompts: `python -m client tasks`'s test.jsonl (prompt, checks) or "
        "IFEval's input format (prompt, instruction_id_list, kwargs), as `python -m client distill` writes."
    )
    n: int | None = Field(
        32, ge=1, description="A seeded sample of this many prompts, the same at every eval (None = all)."
    )
    max_new_tokens: int = Field(256, ge=1, description="Reply length limit; a cut reply is scored as it is.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")


class TrainingConfig(_Strict):
    """Optimisation, precision, evaluation and checkpointing."""

    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored if max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward pass (packed rows when packing).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of learning_rate.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None = off).")
    packing: bool = Field(
        True, description="Padding-free packing of samples into rows (falls back if unsupported)."
    )
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto",
        description="`auto` = bf16 on a GPU that supports it or a CPU with bf16 instructions "
        "(AVX512-BF16, AMX), else fp32. fp16 is refused.",
    )
    attn_implementation: Literal[
        "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "sdpa",
        description=(
            "transformers attention kernel. sdpa/eager: packed rows of max_seq_len with a dense masked "
            "attention; flash_attention_2/3 (flash-attn package) and flex_attention (PyTorch FlexAttention: "
            "block-sparse, no extra package; trains on CUDA only): one packed row per micro-batch whose "
            "samples attend only to themselves."
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations: less memory, ~30% slower."
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="`4bit` = QLoRA (bitsandbytes, GPU only)."
    )
    eval_every: int = Field(50, ge=1, description="Optimizer steps between eval-loss passes.")
    eval_batches: int | None = Field(None, ge=1, description="Cap on eval batches per pass (None = all).")
    save_every: int = Field(100, ge=1, description="Optimizer steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evals without improvement (None = never)."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest improvement of best_metric that counts (loss drop, or score rise)."
    )
    task_eval: TaskEvalConfig | None = Field(
        None, description="Score greedy replies to held-out verifiable prompts at every eval (task_score)."
    )
    best_metric: Literal["eval_loss", "task_score"] = Field(
        "eval_loss",
        description="What the best checkpoint and early stopping go by: the lowest eval loss or the highest "
        "task score (needs task_eval).",
    )
    export: Literal["auto", "best", "final"] = Field(
        "auto",
        description="Adapter written to output_dir: the best checkpoint by best_metric, or the last one; "
        "`auto` = best when early stopping is on, else final.",
    )
    log_every: int = Field(1, ge=1, description="Optimizer steps between train-loss records.")

    @model_validator(mode="after")
    def _best_metric_is_measured(self) -> TrainingConfig:
        if self.best_metric == "task_score" and self.task_eval is None:
            raise ValueError("best_metric task_score needs task_eval (a file of held-out prompts to score)")
        return self

    @field_validator("precision")
    @classmethod
    def _no_fp16(cls, value: str) -> str:
        if value == "fp16":
            raise ValueError("fp16 is not supported (loss scaling is not implemented); use bf16 or fp32")
        return value


class FinetuneConfig(_Strict):
    """A whole fine-tuning run."""

    base_model: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or local path of the base.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base.")
    output_dir: Path = Field(
        description="Final adapter folder; it appears there atomically when training ends."
    )
    overwrite: bool = Field(False, description="Replace an existing output_dir instead of refusing.")
    seed: int = Field(42, description="Seed of the train/eval split, shuffling and LoRA initialisation.")
    init_from: Path | None = Field(
        None,
        description="An adapter folder to continue tuning: the run starts from its weights (with a fresh "
        "optimizer), and the manifest records it as the parent. Its LoRA settings and base must be this "
        "run's.",
    )
    data: DataConfig
    lora: LoraSettings = LoraSettings()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _replay_needs_a_parent(self) -> FinetuneConfig:
        if PARENT_DATA in self.data.source_paths() and self.init_from is None:
            raise ValueError(f"data source {PARENT_DATA} replays init_from's training data; set init_from")
        return self

    @model_validator(mode="after")
    def _something_to_choose_by(self) -> FinetuneConfig:
        training = self.training
        no_eval_split = self.data.eval_path is None and self.data.eval_fraction == 0
        choosing = training.export == "best" or training.early_stopping_patience is not None
        if choosing and training.best_metric == "eval_loss" and no_eval_split:
            raise ValueError(
                "training.export best and early stopping go by eval loss, and data.eval_fraction is 0 with "
                "no data.eval_path: hold out eval data, or set training.best_metric=task_score with task_eval"
            )
        return self


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see configs/ for the known fields)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; value is parsed as YAML (`3`, `true`, `[q_proj]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key=value, e.g. training.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from exc
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a YAML config, apply overrides, and validate everything before any work starts."""
    tree: dict[str, Any] = {}
    source = "from overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of fields, not {type(loaded).__name__}"
            )
        tree = loaded or {}
    for override in overrides:
        apply_override(tree, override)
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def dump_config(config: FinetuneConfig) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
