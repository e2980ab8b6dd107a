"""`python -m client demo` (`make demo`): the whole product end to end, on one machine.

1. build (or reuse) the base: the embedded tiny base by default, or `--base-model` (hub id or folder);
2. generate instruction data per task (a family of the `client tasks` suite, or a group of families) and
   fine-tune one LoRA adapter per task (plus one on `--data`, if given) with `finetune run`;
3. start `serve` with the base and every adapter (`--adapters-dir`), wait for /health;
4. `client bench` on each task's held-out split, on the whole suite's held-out split and on the first
   IFEval prompts, for the base and every adapter,
   then a short `client load` over a mix of all models;
5. stop the server and write OUT/report.md, OUT/demo.json and charts: base vs each adapter, with the
   differences, and the load figures.

Every stage runs the very command a user would type (printed before it runs and listed in the report),
so the demo doubles as a walkthrough of the command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.report import machine_info
from client.server_process import ServerProcess, free_port, tail_lines
from client.tasks import FAMILIES, families_of

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_BASE_DIR = REPO_ROOT / ".cache" / "tiny-base"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny-demo.yaml"
# The embedded base runs on any CPU: no compilation (faster start), a small context and KV cache.
# Families the tiny base learns (README: those that need copying words from the prompt are beyond it).
DEFAULT_TASKS = ("uppercase", "lowercase", "wrap_in_quotes")
TINY_SERVE_ARGS = ("--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(1 << 30))


class DemoError(RuntimeError):
    """A stage failed; the message names the stage, the command and the tail of its log."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; the defaults are `make demo` on a machine without a GPU."""

    out: Path = Path("demo-out")
    base_model: str | None = None  # None: the embedded tiny base, built into TINY_BASE_DIR
    finetune_config: Path | None = None  # None: tiny-demo.yaml, or the shipped config for --base-model
    finetune_overrides: tuple[str, ...] = ()  # key=value, after the demo's own (base, data, output)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # one adapter each: a task family, or a group of families
    data: str | None = None  # the user's instruction data: one more adapter, named `data_adapter`
    data_adapter: str = "data"
    n_train: int = 2000
    n_test: int = 200
    suite_per_family: int = 20  # held-out items per family for the whole-suite bench (0 skips it)
    seed: int = 0
    bench_concurrency: int = 16
    bench_max_tokens: int = 128
    ifeval_data: str | None = None  # None: ../shared's input_data.jsonl, else the hub's google/IFEval
    ifeval_limit: int = 60  # 0 skips IFEval
    load_concurrency: tuple[int, ...] = (1, 8)
    load_prompts: int = 64
    load_input_len: int = 64
    load_output_len: int = 32
    serve_args: tuple[str, ...] | None = None  # None: TINY_SERVE_ARGS for the tiny base, else none
    startup_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in self.tasks:
            families_of(name)  # raises ValueError naming the known families and groups
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks listed more than once: {list(self.tasks)}")
        if not self.tasks and self.data is None:
            raise ValueError("nothing to fine-tune: give at least one task or --data")
        if self.data is not None and self.data_adapter in self.tasks:
            raise ValueError(f"--data-adapter {self.data_adapter!r} clashes with a task's adapter")
        for name in ("n_train", "n_test", "load_prompts", "load_input_len", "load_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.suite_per_family < 0:
            raise ValueError(f"suite_per_family must be >= 0, got {self.suite_per_family}")
        if self.ifeval_limit < 0 or self.bench_concurrency < 1 or self.bench_max_tokens < 1:
            raise ValueError("ifeval_limit must be >= 0; bench_concurrency and bench_max_tokens >= 1")
        if not self.load_concurrency or min(self.load_concurrency) < 1:
            raise ValueError(f"load concurrency levels must be >= 1, got {list(self.load_concurrency)}")
        for override in self.finetune_overrides:
            if "=" not in override:
                raise ValueError(f"fine-tune overrides are key=value, got {override!r}")


@dataclass
class Demo:
    """What the demo did: commands, stage timings, and where each stage's output is."""

    config: DemoConfig
    base_model: str = ""
    served_base: str = ""
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> adapter folder
    task_tests: dict[str, Path] = field(default_factory=dict)  # task -> its held-out test.jsonl
    commands: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why

    @property
    def models(self) -> list[str]:
        return [self.served_base, *self.adapters]

    @property
    def out(self) -> Path:
        return self.config.out

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
    """tiny-demo.yaml for the tiny base; for another base, the shipped config whose base_model it is."""
    if config.finetune_config is not None:
        return config.finetune_config.resolve()
    if config.base_model is None:
        return TINY_CONFIG
    import yaml

    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if isinstance(document, dict) and document.get("base_model") == base_model:
            return path
    raise DemoError(
        f"no shipped config under configs/ has base_model {base_model!r}; pass --finetune-config "
        "(e.g. configs/qwen2.5-7b-instruct-lora.yaml, whose base_model the demo overrides)"
    )


# --- stages ---------------------------------------------------------------------------------------


def _prepare_base(demo: Demo) -> None:
    config = demo.config
    if config.base_model is None:
        demo.run("base", _python("finetune", "tiny-base", "--out", str(TINY_BASE_DIR)))
        demo.base_model = str(TINY_BASE_DIR)
    else:
        local = Path(config.base_model)
        demo.base_model = str(local.resolve()) if local.exists() else config.base_model
    local = Path(demo.base_model)
    demo.served_base = local.name if local.is_dir() else demo.base_model


def _fine_tune(demo: Demo) -> None:
    config, out = demo.config, demo.out
    finetune_config = _resolve_finetune_config(config, demo.base_model)
    jobs: list[tuple[str, str]] = []  # (adapter name, training data)
    for task in config.tasks:
        data_dir = out / "data" / task
        demo.run(
            "data",
            _python(
                "client",
                "tasks",
                *("--out", str(data_dir), "--families", ",".join(families_of(task))),
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
        n_test = str(config.suite_per_family * len(FAMILIES))
        demo.run(
            "data",
            _python(
                "client",
                "tasks",
                "--out",
                str(suite),
                "--n-train",
                "0",
                "--n-test",
                n_test,
                "--seed",
                str(config.seed),
            ),
        )
        demo.task_tests["suite"] = suite / "test.jsonl"
    if config.data is not None:
        local = Path(config.data)
        jobs.append((config.data_adapter, str(local.resolve()) if local.exists() else config.data))
    for name, data in jobs:
        adapter = (out / "adapters" / name).resolve()
        demo.run(
            f"fine-tune {name}",
            _python(
                "finetune",
                "run",
                *("--config", str(finetune_config), "overwrite=true", f"base_model={demo.base_model}"),
                *(f"data.path={data}", f"output_dir={adapter}", *config.finetune_overrides),
            ),
        )
        demo.adapters[name] = adapter


@contextmanager
def _serving(demo: Demo) -> Iterator[ServerProcess]:
    config = demo.config
    port = free_port()
    serve_args = (
        config.serve_args
        if config.serve_args is not None
        else (TINY_SERVE_ARGS if config.base_model is None else ())
    )
    argv = _python(
        "serve",
        "--base-model",
        demo.base_model,
        "--served-model-name",
        demo.served_base,
        "--adapters-dir",
        str((demo.out / "adapters").resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-loras",
        str(len(demo.adapters)),
        *serve_args,
    )
    shown = _show(argv)
    demo.commands.append(shown)
    server = ServerProcess(
        name="serve",
        command=argv,
        url=f"http://127.0.0.1:{port}",
        log_path=demo.out / "serve.log",
        cwd=REPO_ROOT,
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


def _bench(demo: Demo, server: ServerProcess) -> None:
    config, out = demo.config, demo.out
    common = ["--base-url", f"{server.url}/v1", "--models", ",".join(demo.models)]
    common += ["--concurrency", str(config.bench_concurrency), "--max-tokens", str(config.bench_max_tokens)]
    common += ["--seed", str(config.seed)]
    for task, test in demo.task_tests.items():
        demo.run(
            f"bench tasks {task}",
            _python(
                "client",
                "bench",
                *(
                    "--suite",
                    "tasks",
                    "--data",
                    str(test),
                    *common,
                    "--out",
                    str(out / "bench" / f"tasks-{task}"),
                ),
            ),
        )
    if config.ifeval_limit == 0:
        demo.skipped["ifeval"] = "--ifeval-limit 0"
        return
    from client.suites import IFEVAL_HUB_ID, default_data

    data = config.ifeval_data or default_data("ifeval")
    log = out / "bench" / "ifeval.log"
    try:
        demo.run(
            "bench ifeval",
            _python(
                "client",
                "bench",
                *("--suite", "ifeval", "--data", data, "--limit", str(config.ifeval_limit), *common),
                *("--out", str(out / "bench" / "ifeval")),
            ),
            log=log,
        )
    except DemoError as error:
        if config.ifeval_data is not None or data != IFEVAL_HUB_ID:
            raise
        # No local copy (../shared/data) and the hub is unreachable: say so, and go on with the rest.
        demo.skipped["ifeval"] = (
            f"IFEval data: no local copy and {IFEVAL_HUB_ID} could not be loaded ({error})"
        )
        print(f"skipping IFEval: {demo.skipped['ifeval']}", file=sys.stderr)
    else:
        print(tail_lines(log, 4))


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


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary written to OUT/demo.json."""
    from client.demo_report import write_demo_report

    config.out.mkdir(parents=True, exist_ok=True)
    demo = Demo(config=config)
    started = datetime.now(UTC)
    with _stage(demo, "base model"):
        _prepare_base(demo)
    with _stage(demo, "data and fine-tuning"):
        _fine_tune(demo)
    with _stage(demo, "serve, bench and load"), _serving(demo) as server:
        _bench(demo, server)
        _load(demo, server)
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
        help="hub id or local folder of the base (default: the embedded tiny base, built if missing)",
    )
    parser.add_argument(
        "--finetune-config",
        type=Path,
        help="finetune YAML (default: configs/tiny-demo.yaml; with --base-model, the shipped config for it)",
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
        default=defaults.tasks,
        help="one adapter per entry, each tuned on a task family or a group of families (`client tasks`); "
        f"'' for none (default: {','.join(defaults.tasks)})",
    )
    parser.add_argument("--data", help="your instruction data (file or hub id): one more adapter")
    parser.add_argument("--data-adapter", default=defaults.data_adapter, help="its name (default: data)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="training items per task")
    parser.add_argument("--n-test", type=int, default=defaults.n_test, help="held-out items per task")
    parser.add_argument(
        "--suite-per-family",
        type=int,
        default=defaults.suite_per_family,
        help="held-out items per family for the whole-suite bench; 0 skips it (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and sampling seed (default: 0)")
    parser.add_argument("--max-tokens", type=int, default=defaults.bench_max_tokens, help="per bench reply")
    parser.add_argument("--ifeval-data", help="IFEval JSONL (default: ../shared's copy, else google/IFEval)")
    parser.add_argument(
        "--ifeval-limit",
        type=int,
        default=defaults.ifeval_limit,
        help="IFEval prompts; 0 skips (default: 60)",
    )
    parser.add_argument(
        "--load-concurrency", type=_ints, default=defaults.load_concurrency, help="load levels (default: 1,8)"
    )
    parser.add_argument("--load-prompts", type=int, default=defaults.load_prompts, help="requests per level")
    parser.add_argument(
        "--serve-arg",
        dest="serve_args",
        action="append",
        metavar="ARG",
        help="extra `python -m serve` argument, repeatable (replaces the tiny base's engine defaults)",
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
            data=args.data,
            data_adapter=args.data_adapter,
            n_train=args.n_train,
            n_test=args.n_test,
            suite_per_family=args.suite_per_family,
            seed=args.seed,
            bench_max_tokens=args.max_tokens,
            ifeval_data=args.ifeval_data,
            ifeval_limit=args.ifeval_limit,
            load_concurrency=args.load_concurrency,
            load_prompts=args.load_prompts,
            serve_args=tuple(args.serve_args) if args.serve_args is not None else None,
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        summary = run_demo(config)
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    print(f"\n{summary['headline']}\nreport: {config.out / 'report.md'}")
    return 0


def config_dict(config: DemoConfig) -> dict[str, Any]:
    """The config as JSON-ready values (paths as strings)."""
    return json.loads(json.dumps(asdict(config), default=str))
