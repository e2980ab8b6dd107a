"""Does batch composition change greedy answers? The same requests alone and inside mixed traffic, per server.

`python -m bench.batch_invariance [--quick]`; probes alone and in mixed loads on each server and dtype, and a
kernel check in this process. BENCHMARKS.md says how it measures and what it found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shlex
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, int_list, start_run, write_json
from bench.report import header_markdown, publish_section
from bench.servers import SERVED_BASE_NAME, EngineSettings, server_command
from pipeline.bases import built_base_dir
from pipeline.launch import ServerProcess, free_port, running
from tuneserve.tables import markdown_table

log = logging.getLogger("bench.batch_invariance")

NAME = "batch_invariance"
DEFAULT_WORK_DIR = Path("/tmp/bench-batch-invariance")
TINY_BASE_DIR = built_base_dir("tiny")
ADAPTERS_DIR = REPO_ROOT / ".cache" / "batch-invariance-adapters"
# Adapter name -> the task families it is tuned on (client.tasks); `caps` is the one the probes ask.
ADAPTER_FAMILIES = {
    "caps": ["uppercase"],
    "fmt": ["json_object", "wrap_in_quotes"],
    "words": ["end_with_phrase", "start_with_word"],
}
PROBE_ADAPTER = "caps"
BACKGROUND_FAMILIES = ["json_object", "wrap_in_quotes", "end_with_phrase", "start_with_word", "bullet_list"]
# Server -> (server_command's server, environment). VLLM_PLUGINS=none keeps vLLM from loading our
# LoRA plugin, which is installed as an entry point and would otherwise run inside vLLM's own server too.
SERVERS: dict[str, tuple[str, dict[str, str]]] = {
    "ours": ("ours", {}),
    "ours-no-plugin": ("ours", {"VLLM_PLUGINS": "none"}),
    "vllm": ("vllm", {"VLLM_PLUGINS": "none"}),
    # vLLM's batch-invariant mode (not run by default: on CPU it does not start, see BENCHMARKS.md)
    "vllm-batch-invariant": ("vllm", {"VLLM_PLUGINS": "none", "VLLM_BATCH_INVARIANT": "1"}),
}
DEFAULT_SERVERS = ("ours", "ours-no-plugin", "vllm")
SERVER_LABELS = {
    "ours": "ours (plugin)",
    "ours-no-plugin": "ours, VLLM_PLUGINS=none",
    "vllm": "vLLM server, VLLM_PLUGINS=none",
    "vllm-batch-invariant": "vLLM server, VLLM_BATCH_INVARIANT=1",
}


@dataclass(frozen=True)
class Plan:
    """What is sent: probes (to the adapter and to the base), their repeats in each mixed load, background."""

    adapter_probes: int = 24
    base_probes: int = 8
    max_tokens: int = 64
    repeats: int = 6  # times each probe is sent in each mixed load
    background_per_probe: float = 1.0  # background requests per probe request in a mixed load
    concurrency: tuple[int, ...] = (8, 32)
    seed: int = 0


# ----- adapters and requests ---------------------------------------------------------------------------


def trained_adapters(base: Path, root: Path = ADAPTERS_DIR) -> dict[str, Path]:
    """caps/fmt/words trained by `finetune run` (configs/tiny-demo.yaml, 40 steps each), cached in `root`."""
    from client.tasks import write_task_data
    from finetune.cli import main as finetune_main

    paths = {name: root / name for name in ADAPTER_FAMILIES}
    for name, families in ADAPTER_FAMILIES.items():
        if (paths[name] / "adapter_model.safetensors").is_file():
            continue
        data = write_task_data(root / "data" / name, families, n_train=160, n_test=8, seed=0)["train"]
        overrides = [f"base_model={base}", f"data.path={data}", f"output_dir={paths[name]}"]
        overrides += ["training.max_steps=40", "training.eval_every=40", "training.save_every=40"]
        config = str(REPO_ROOT / "configs" / "tiny-demo.yaml")
        if finetune_main(["run", "--config", config, *overrides, "data.max_seq_len=128"]) != 0:
            raise RuntimeError(f"training adapter {name} failed")
    return paths


@dataclass(frozen=True)
class Probe:
    key: str  # model/index, stable across runs
    model: str
    prompt: str


def probes(plan: Plan) -> list[Probe]:
    from client.tasks import generate

    adapter = generate(["uppercase"], plan.adapter_probes, "test", seed=plan.seed)
    base = generate(["end_with_phrase", "bullet_list"], plan.base_probes, "test", seed=plan.seed)
    return [Probe(f"{PROBE_ADAPTER}/{i}", PROBE_ADAPTER, item.prompt) for i, item in enumerate(adapter)] + [
        Probe(f"base/{i}", SERVED_BASE_NAME, item.prompt) for i, item in enumerate(base)
    ]


def background(count: int, seed: int) -> list[tuple[str, str, int]]:
    """(model, prompt, max_tokens) of `count` requests over the base and every adapter, varied lengths."""
    from client.tasks import generate

    rng = random.Random(seed)
    models = [SERVED_BASE_NAME, *ADAPTER_FAMILIES]
    items = generate([*BACKGROUND_FAMILIES, "uppercase"], count, "train", seed=seed)
    return [(models[i % len(models)], item.prompt, rng.randint(8, 96)) for i, item in enumerate(items)]


def chat_body(model: str, prompt: str, max_tokens: int, *, logprobs: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if logprobs:
        body |= {"logprobs": True, "top_logprobs": 2}
    return body


def answer_of(reply: dict[str, Any]) -> dict[str, Any]:
    """Text, tokens, their logprobs and each position's top-2 logprobs of a chat reply."""
    choice = reply["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    return {
        "text": choice["message"]["content"],
        "finish_reason": choice.get("finish_reason"),
        "tokens": [entry["token"] for entry in content],
        "logprobs": [entry["logprob"] for entry in content],
        "top2": [
            sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)[:2] for entry in content
        ],
    }


async def send_all(
    url: str, requests: Sequence[tuple[str | None, dict[str, Any]]], concurrency: int
) -> list[tuple[str | None, dict[str, Any] | str]]:
    """POST every (probe key or None, body) with at most `concurrency` in flight; (key, answer or error)."""
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(key: str | None, body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | str]:
            async with semaphore:
                response = await http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return key, f"{response.status_code}: {response.text[:200]}"
            return key, answer_of(response.json()) if key is not None else {}

        return list(await asyncio.gather(*(one(key, body) for key, body in requests)))


# ----- comparison --------------------------------------------------------------------------------------


def margin(top2: Sequence[float]) -> float | None:
    """logprob of the best candidate minus the second's (None without two candidates)."""
    return top2[0] - top2[1] if len(top2) > 1 else None


def first_divergence(reference: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any] | None:
    """Where `answer`'s tokens first differ from `reference`'s (None when they are the same), with the
    top-2 margin there in the reference and in the answer."""
    ref, got = reference["tokens"], answer["tokens"]
    if ref == got and reference["text"] == answer["text"]:
        return None
    index = next(
        (i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
    )

    def at(side: dict[str, Any]) -> tuple[str | None, float | None]:
        tokens = side["tokens"]
        return (tokens[index], margin(side["top2"][index])) if index < len(tokens) else (None, None)

    ref_token, ref_margin = at(reference)
    got_token, got_margin = at(answer)
    return {
        "index": index,
        "reference_token": ref_token,
        "token": got_token,
        "reference_margin": ref_margin,
        "margin": got_margin,
        "reference_text": reference["text"],
        "text": answer["text"],
    }


def logprob_drift(reference: dict[str, Any], answer: dict[str, Any]) -> float:
    """Largest |logprob difference| of the chosen tokens before the first divergence (0.0: bit-identical)."""
    drift = 0.0
    for ref_token, token, ref_lp, lp in zip(
        reference["tokens"], answer["tokens"], reference["logprobs"], answer["logprobs"], strict=False
    ):
        if ref_token != token:
            break
        drift = max(drift, abs(ref_lp - lp))
    return drift


def summarize(
    references: dict[str, dict[str, Any]], answers: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """Divergences of `answers` (probe key, answer) from `references`, per model and overall."""
    divergences, drifts = [], []
    per_model: dict[str, list[int]] = {}
    for key, answer in answers:
        reference = references[key]
        found = first_divergence(reference, answer)
        counts = per_model.setdefault(key.split("/")[0], [0, 0])
        counts[0] += 1
        if found is not None:
            counts[1] += 1
            divergences.append({"probe": key} | found)
        drifts.append(logprob_drift(reference, answer))
    margins = [d["reference_margin"] for d in divergences if d["reference_margin"] is not None]
    return {
        "requests": len(answers),
        "divergent": len(divergences),
        "per_model": {model: {"requests": n, "divergent": d} for model, (n, d) in per_model.items()},
        "bit_identical_logprobs": sum(1 for d in drifts if d == 0.0),
        "max_logprob_drift": max(drifts, default=0.0),
        "min_margin": min(margins, default=None),
        "median_margin": statistics.median(margins) if margins else None,
        "divergences": divergences,
    }


# ----- one server --------------------------------------------------------------------------------------


def measure_server(
    server_name: str,
    dtype: str,
    base: Path,
    adapters: dict[str, Path],
    plan: Plan,
    work_dir: Path,
) -> dict[str, Any]:
    """Start one server, send the solo passes and the mixed loads, stop it; its conditions' summaries."""
    kind, env = SERVERS[server_name]
    engine = EngineSettings(dtype=dtype, max_loras=len(adapters) + 1, max_lora_rank=16)
    port = free_port()
    server = ServerProcess(
        name=f"{server_name}-{dtype}",
        command=server_command(kind, base, port, engine, list(adapters.items())),
        url=f"http://127.0.0.1:{port}",
        log_path=work_dir / f"{server_name}-{dtype}.log",
        cwd=REPO_ROOT,
        env=env,
    )
    probe_list = probes(plan)
    by_key = {probe.key: probe for probe in probe_list}
    result: dict[str, Any] = {"command": shlex.join(server.command), "env": env, "conditions": {}}
    import httpx

    try:
        with running(server):
            result["startup_s"] = server.startup_s
            return result | run_conditions(server.url, probe_list, by_key, plan)
    except (
        RuntimeError,
        httpx.HTTPError,
    ) as error:  # did not start, or failed: recorded, the others still run
        log.warning("%s (%s) failed: %s", server_name, dtype, str(error)[-2000:])
        return result | {"error": str(error)[-3000:]}


def run_conditions(
    url: str, probe_list: Sequence[Probe], by_key: dict[str, Probe], plan: Plan
) -> dict[str, Any]:
    def body(key: str) -> dict[str, Any]:
        probe = by_key[key]
        return chat_body(probe.model, probe.prompt, plan.max_tokens, logprobs=True)

    def probe_answers(replies: Sequence[tuple[str | None, Any]]) -> list[tuple[str, dict[str, Any]]]:
        failed = [reply for key, reply in replies if isinstance(reply, str)]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
        return [(key, reply) for key, reply in replies if key is not None]

    # Warm-up: every model once, alone, then together, so every adapter is loaded before anything counts.
    warm = [(None, chat_body(m, "Hello.", 8, logprobs=False)) for m in [SERVED_BASE_NAME, *ADAPTER_FAMILIES]]
    probe_answers(asyncio.run(send_all(url, warm, 1)))
    probe_answers(asyncio.run(send_all(url, warm * 4, 16)))
    conditions: dict[str, Any] = {}
    started = time.monotonic()
    solo = probe_answers(asyncio.run(send_all(url, [(p.key, body(p.key)) for p in probe_list], 1)))
    references = dict(solo)
    conditions["solo (reference)"] = summarize(references, solo) | {"seconds": time.monotonic() - started}
    started = time.monotonic()
    repeat = probe_answers(asyncio.run(send_all(url, [(p.key, body(p.key)) for p in probe_list], 1)))
    conditions["solo, repeated"] = summarize(references, repeat) | {"seconds": time.monotonic() - started}
    rng = random.Random(plan.seed)
    for level in plan.concurrency:
        keys = [p.key for p in probe_list] * plan.repeats
        extra = background(round(len(keys) * plan.background_per_probe), seed=plan.seed + level)
        requests: list[tuple[str | None, dict[str, Any]]] = [(key, body(key)) for key in keys]
        requests += [(None, chat_body(m, prompt, n, logprobs=False)) for m, prompt, n in extra]
        rng.shuffle(requests)
        started = time.monotonic()
        mixed = probe_answers(asyncio.run(send_all(url, requests, level)))
        conditions[f"mixed, concurrency {level}"] = summarize(references, mixed) | {
            "background": len(extra),
            "seconds": time.monotonic() - started,
        }
    return {"conditions": conditions, "references": references}


# ----- the kernels, in this process --------------------------------------------------------------------


def kernel_check(dtypes: Sequence[str]) -> dict[str, Any]:
    """Bits of one row computed alone vs inside bigger batches, for the CPU kernels the engine runs.

    - vLLM's CPU linear (oneDNN `onednn_mm`, what the base's projections use) at the tiny base's shapes: row i
      of an M-row product against row i of a 64-row product.
    - LoRA: token 0 on adapter slot 0, alone vs with 31 decode tokens over 4 adapters vs inside a 48-token
      prefill run on one adapter, through vLLM's own ops (bgmv shrink/expand: per-token products) and through
      the plugin's `_apply` (one matmul pair per run, batched matmuls over adapters, or one GEMM per adapter).
    """
    import torch
    from vllm import _custom_ops as ops

    out: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(0)
    for name in dtypes:
        dtype = getattr(torch, name)
        linear = {}
        for n, k in ((768, 256), (256, 256), (1408, 256), (256, 704), (2048, 256)):
            weight = (torch.randn(n, k, generator=generator) * 0.05).to(dtype)
            handle = ops.create_onednn_mm(weight.t(), 32)
            x = torch.randn(64, k, generator=generator).to(dtype)
            full = ops.onednn_mm(handle, x, None)
            differing = sum(
                int((ops.onednn_mm(handle, x[:m].contiguous(), None) != full[:m]).any(dim=1).sum())
                for m in (1, 2, 3, 8, 17, 32)
            )
            linear[f"{n}x{k}"] = differing
        slots, rank, features, outputs = 4, 16, 256, 768
        a = torch.randn(slots, 1, rank, features, generator=generator) * 0.05
        b = (torch.randn(slots, 1, outputs, rank, generator=generator) * 0.05).to(dtype)
        x_all = torch.randn(48, features, generator=generator).to(dtype)
        y_all = torch.randn(48, outputs, generator=generator).to(dtype)
        batches = {
            "alone": torch.tensor([0]),
            "decode, 4 adapters": torch.tensor([0, 1, 2, 3] * 8),
            "prefill run of 48": torch.zeros(48, dtype=torch.long),
            "prefill run + other adapters": torch.tensor([0] * 40 + [1, 2, 3] * 2 + [1, 2]),
        }

        lora = {}
        weights = (a.to(dtype), b)
        for label in ("vLLM ops", "plugin"):
            alone = _lora_row(label, weights, x_all, y_all, batches["alone"])
            lora[label] = {
                batch: float((_lora_row(label, weights, x_all, y_all, indices) - alone).abs().max())
                for batch, indices in batches.items()
                if batch != "alone"
            }
        out[name] = {"linear_rows_differing": linear, "lora_max_abs_diff_vs_alone": lora}
    return out


def _lora_row(path: str, weights: tuple[Any, Any], x_all: Any, y_all: Any, indices: Any) -> Any:
    """Token 0's output row after one LoRA layer (A: (slots, 1, rank, in), B: (slots, 1, out, rank)) adds
    its product, for a step whose tokens use slots `indices`: through vLLM's ops or the plugin's `_apply`."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from vllm_cpu_lora_fix import ops as plugin

    a, b = weights
    x, y = x_all[: len(indices)], y_all[: len(indices)].clone()
    if path == "plugin":
        plugin._apply(plugin.LoraBatchPlan(indices), x, [(a.squeeze(1), b.squeeze(1), y)], 0.5, y.dtype)
        return y[0]
    shrunk = torch.zeros(len(indices), a.shape[2], dtype=torch.float32)
    lora_ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
    lora_ops.bgmv_expand_slice(shrunk, b, y, indices, 0, y.shape[1], True)
    return y[0]


# ----- the run -----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, header: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    from finetune.tiny_base import build_tiny_base

    base = build_tiny_base(TINY_BASE_DIR)
    adapters = trained_adapters(base)
    plan = Plan(
        repeats=args.repeats,
        concurrency=tuple(args.concurrency),
        adapter_probes=args.adapter_probes,
        base_probes=args.base_probes,
    )
    document: dict[str, Any] = {
        "header": header,
        "plan": asdict(plan),
        "adapters": {name: str(path) for name, path in adapters.items()},
        "kernels": kernel_check(args.dtypes),
        "servers": {},
    }
    for dtype in args.dtypes:
        for server_name in args.servers:
            log.info("server %s, %s", server_name, dtype)
            document["servers"][f"{server_name}/{dtype}"] = measure_server(
                server_name, dtype, base, adapters, plan, work_dir
            )
            write_json(work_dir / "partial.json", document)  # what is measured so far survives a crash
    document["cross_server"] = cross_server(document["servers"])
    return document


def cross_server(servers: dict[str, Any]) -> dict[str, Any]:
    """Each server's solo answers against vLLM's server's solo answers in the same dtype."""
    out = {}
    for label, result in servers.items():
        server_name, dtype = label.split("/")
        reference = servers.get(f"vllm/{dtype}", {}).get("references")
        if server_name == "vllm" or reference is None or "references" not in result:
            continue
        summary = summarize(reference, list(result["references"].items()))
        out[label] = {k: v for k, v in summary.items() if k != "divergences"} | {
            "divergences": summary["divergences"]
        }
    return out


# ----- BENCHMARKS.md -----------------------------------------------------------------------------------


def _margin(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def section_markdown(header: dict[str, Any], document: dict[str, Any]) -> str:
    plan = Plan(**{**document["plan"], "concurrency": tuple(document["plan"]["concurrency"])})
    probe_count = plan.adapter_probes + plan.base_probes
    lines = ["## Batch invariance: do greedy answers depend on what they are batched with?", ""]
    lines += header_markdown(header)
    for run in document.get("runs", [])[:-1]:
        lines.append(
            f"- merged with the earlier run `{run['header']['command']}` of {run['header']['date']}, which "
            f"measured {', '.join(run['servers'])} (rows of the same server and dtype: the later run's)"
        )
    lines += [
        "- model: the tiny base with three adapters trained by `finetune run` "
        f"({', '.join(document['adapters'])}; rank 16, all linear layers), engine flags as "
        "bench.serve_vs_vllm's (`--max-loras 4 --enforce-eager`, prefix caching and chunked prefill at "
        "vLLM's defaults), one server at a time",
        f"- probes: {plan.adapter_probes} uppercase prompts to `{PROBE_ADAPTER}` and {plan.base_probes} "
        f"prompts to the base, greedy, {plan.max_tokens} tokens at most, `logprobs` with the top 2; sent "
        "alone one at a time twice (the first pass is the reference), then "
        f"{plan.repeats} times each inside mixed traffic ({plan.background_per_probe:g} background request "
        "per probe: base and all three adapters, other prompts, 8-96 tokens) at concurrency "
        f"{', '.join(map(str, plan.concurrency))}",
        "- divergent: the answer's tokens differ from the same server's solo reference; margin: the "
        "reference's logprob of its chosen token minus that of the runner-up, at the first differing token; "
        "bit-identical: answers whose every chosen-token logprob equals the reference's exactly",
    ]
    lines += ["", *condition_table(document["servers"])]
    cross = document.get("cross_server", {})
    if cross:
        lines += ["", f"Solo answers against vLLM's server's solo answers ({probe_count} probes):", ""]
        lines += cross_table(cross)
    before = document.get("before")
    if before is not None:
        lines += [
            "",
            f"Before the plugin fix: the run `{before['header']['command']}` of {before['header']['date']}, "
            f"same probes and loads (bench/results/{NAME}/results-before-fix.json):",
            "",
            *condition_table(before["servers"]),
            "",
            *cross_table(before.get("cross_server", {})),
            "",
            *kernel_markdown(before["kernels"]),
        ]
    lines += [
        "",
        *(["After the fix:", ""] if before is not None else []),
        *kernel_markdown(document["kernels"]),
    ]
    lines += ["", *examples_markdown(document)]
    return "\n".join(lines)


AGREEMENT_COLUMNS = ["bit-identical logprobs", "max logprob drift", "margin at divergence, min / median"]


def _agreement_cells(summary: dict[str, Any]) -> list[str]:
    """The columns both tables end with: bit-identical logprobs, max drift, margins at divergence."""
    return [
        str(summary["bit_identical_logprobs"]),
        f"{summary['max_logprob_drift']:.2g}",
        f"{_margin(summary['min_margin'])} / {_margin(summary['median_margin'])}",
    ]


def condition_table(servers: dict[str, Any]) -> list[str]:
    """One row per (dtype, server, condition): answers, divergences, bit-identical logprobs, margins."""
    rows = []
    for label, result in servers.items():
        server_name, dtype = label.split("/")
        server_label = SERVER_LABELS[server_name]
        if "error" in result:
            first = result["error"].strip().splitlines()
            reason = next((line for line in reversed(first) if "Error" in line), first[-1] if first else "")
            rows.append([dtype, server_label, f"did not run: `{reason.strip()[:160]}`", *[""] * 5])
            continue
        for condition, summary in result["conditions"].items():
            per_model = summary["per_model"]
            split = " / ".join(str(per_model.get(m, {}).get("divergent", 0)) for m in (PROBE_ADAPTER, "base"))
            counts = [str(summary["requests"]), f"{summary['divergent']} ({split})"]
            rows.append([dtype, server_label, condition, *counts, *_agreement_cells(summary)])
    header = ["dtype", "server", "condition", "probe answers", "divergent (caps / base)", *AGREEMENT_COLUMNS]
    return markdown_table(header, rows, "lllrrrrr")


def cross_table(cross: dict[str, Any]) -> list[str]:
    rows = []
    for label, summary in cross.items():
        server_name, dtype = label.split("/")
        rows.append(
            [dtype, SERVER_LABELS[server_name], str(summary["divergent"]), *_agreement_cells(summary)]
        )
    header = ["dtype", "server, solo, against vLLM's server solo", "divergent", *AGREEMENT_COLUMNS]
    return markdown_table(header, rows, "llrrrr")


def kernel_markdown(kernels: dict[str, Any]) -> list[str]:
    lines = [
        "Kernels, in one process: rows of vLLM's CPU linear (oneDNN, the base's projection shapes) that "
        "differ in any bit between an M-row product (M = 1, 2, 3, 8, 17, 32) and a 64-row one; and the "
        "largest change of token 0's LoRA output (slot 0, rank 16, 256 -> 768) when computed inside other "
        "batches instead of alone:",
        "",
    ]
    rows = []
    for dtype, found in kernels.items():
        linear = ", ".join(f"{shape}: {count}" for shape, count in found["linear_rows_differing"].items())
        for path, diffs in found["lora_max_abs_diff_vs_alone"].items():
            rows.append([dtype, linear, path, *(f"{value:.2g}" for value in diffs.values())])
    header = ["dtype", "linear: rows differing", "LoRA through", "decode, 4 adapters", "prefill run of 48"]
    return lines + markdown_table([*header, "prefill run + other adapters"], rows, "lllrrr")


def examples_markdown(document: dict[str, Any], limit: int = 6) -> list[str]:
    """A few divergences: where, the two candidates, the margins, and both texts."""
    found = [
        (label, condition, d)
        for label, result in document["servers"].items()
        for condition, summary in result.get("conditions", {}).items()
        for d in summary["divergences"]
    ]
    if not found:
        return ["No probe answer diverged from its server's solo reference."]
    found.sort(key=lambda item: item[2]["reference_margin"] if item[2]["reference_margin"] is not None else 9)
    lines = [f"Divergences with the smallest margins ({min(limit, len(found))} of {len(found)}):", ""]
    for label, condition, d in found[:limit]:
        lines.append(
            f"- {label}, {condition}, {d['probe']}, token {d['index']}: reference {d['reference_token']!r} "
            f"(margin {_margin(d['reference_margin'])}), answer {d['token']!r} "
            f"(margin {_margin(d['margin'])}): "
            f"`{d['reference_text'][:80]!r}` -> `{d['text'][:80]!r}`"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch_invariance",
        description="Greedy probe answers alone vs inside mixed traffic, per server and dtype; writes "
        "bench/results/batch_invariance/ and the batch_invariance section of BENCHMARKS.md.",
    )
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["bfloat16", "float32"])
    parser.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=list(DEFAULT_SERVERS),
        help=f"comma-separated, of: {', '.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=list(Plan.concurrency),
        help="mixed-load concurrency levels (default: 8,32)",
    )
    parser.add_argument("--repeats", type=int, default=Plan.repeats, help="each probe's sends per mixed load")
    parser.add_argument("--adapter-probes", type=int, default=Plan.adapter_probes)
    parser.add_argument("--base-probes", type=int, default=Plan.base_probes)
    parser.add_argument("--quick", action="store_true", help="smoke run: one server, few probes, no markdown")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="server logs")
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="measure nothing: rewrite the section from results.json files (several: their servers merged, "
        "later files winning, e.g. a rerun of one dtype; written to --merged-json)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="with --from-json: a results.json of an earlier version to show below the tables (kept in the "
        "merged document)",
    )
    parser.add_argument(
        "--merged-json", type=Path, help="with several --from-json: where the merged document is written"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in args.servers:
        if name not in SERVERS:
            parser.error(f"--servers: unknown server {name!r}; choose from {', '.join(SERVERS)}")
    if args.quick:
        args.servers, args.dtypes, args.repeats = args.servers[:1], args.dtypes[:1], 2
        args.adapter_probes, args.base_probes, args.no_markdown = 4, 2, True
    if args.from_json is not None:
        document = merge([json.loads(path.read_text()) for path in args.from_json])
        if args.before is not None:
            document["before"] = json.loads(args.before.read_text())
        if args.merged_json is not None:
            write_json(args.merged_json, document)
        return publish(document, markdown=not args.no_markdown)
    header, work_dir, out_dir = start_run(
        "bench.batch_invariance", argv, args.work_dir, NAME, scratch=args.quick
    )
    document = measure(args, header, work_dir)
    write_json(out_dir / "results.json", document)
    return publish(document, markdown=not args.no_markdown)


def merge(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from runs of the same plan: every run's servers and kernel checks (a later run's replace
    an earlier one's of the same server or dtype), each run's header under `runs`."""
    if len(documents) == 1:
        return documents[0] | {"cross_server": cross_server(documents[0]["servers"])}
    plans = {json.dumps(document["plan"], sort_keys=True) for document in documents}
    if len(plans) > 1:
        raise ValueError("--from-json: the runs sent different probes or loads; they cannot be merged")
    servers = {label: result for document in documents for label, result in document["servers"].items()}
    runs = [{"header": document["header"], "servers": list(document["servers"])} for document in documents]
    kernels = {dtype: found for document in documents for dtype, found in document["kernels"].items()}
    return documents[-1] | {
        "runs": runs,
        "servers": servers,
        "kernels": kernels,
        "cross_server": cross_server(servers),
    }


def publish(document: dict[str, Any], *, markdown: bool) -> int:
    publish_section(NAME, section_markdown(document["header"], document), write=markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
