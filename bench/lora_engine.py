"""bench.lora_scaling's engine-only side: the same mixes on vLLM's offline engine, without the HTTP server.

`python -m bench.lora_engine SPEC.json OUT.json` (bench.lora_scaling starts it, one process per config): the
engine is built from the config's server flags, in this process, and driven in the served load's closed loop.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import turns
from bench.servers import EngineSpec


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids (ids below 10 left out: special tokens live there)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(length)] for _ in range(count)]


def serve_settings(serve_args: Sequence[str]) -> Any:
    """The server's settings from its flags, parsed as `python -m serve` parses them."""
    from pydantic_settings import CliApp

    from serve.settings import ServeSettings

    return CliApp.run(ServeSettings, cli_args=list(serve_args))


def lora_names(settings: Any) -> list[tuple[str, str]]:
    """(name, path) of every `--lora NAME=PATH` of the server's settings, in order, through serve's parser."""
    from serve.adapters import parse_lora_option

    return [(name, str(path)) for name, path in map(parse_lora_option, settings.lora)]


def measure(spec: EngineSpec) -> dict[str, Any]:
    """Output tokens/s per mix and round (mix 0: the base only), after one warm-up pass of `concurrency`
    prompts per mix."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

    from serve.engine import engine_args

    settings = serve_settings(spec.serve_args)
    adapters = [LoRARequest(name, index, path) for index, (name, path) in enumerate(lora_names(settings), 1)]
    if max(spec.mixes) > len(adapters):
        raise SystemExit(
            f"a mix of {max(spec.mixes)} adapters, but the server flags name only {len(adapters)} "
            "(--lora NAME=PATH)"
        )
    started = time.monotonic()
    llm = LLM(**engine_args(settings))  # type: ignore[arg-type]
    startup_s = time.monotonic() - started
    vocab_size = int(llm.llm_engine.model_config.get_vocab_size())
    prompts = random_prompts(spec.num_prompts, spec.input_len, vocab_size, spec.seed)
    params = SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0, detokenize=False)

    engine = llm.llm_engine
    request_ids = itertools.count()

    def run(mix: int, count: int) -> tuple[int, float, int]:
        """(output tokens, seconds, most requests in flight) of `count` prompts, `concurrency` of them in
        flight: a new one as soon as one finishes, as the served load's clients do, so steps mix new prompts'
        prefill with decoding."""
        queue = iter(range(count))

        def submit(index: int) -> None:
            adapter = adapters[index % mix] if mix else None
            prompt: Any = {"prompt_token_ids": prompts[index]}
            engine.add_request(str(next(request_ids)), prompt, params, lora_request=adapter)

        for index in itertools.islice(queue, spec.concurrency):
            submit(index)
        tokens, peak, begin = 0, 0, time.perf_counter()
        while engine.has_unfinished_requests():
            peak = max(peak, engine.get_num_unfinished_requests())
            for output in engine.step():
                if isinstance(output, RequestOutput) and output.finished:
                    tokens += len(output.outputs[0].token_ids)
                    following = next(queue, None)
                    if following is not None:
                        submit(following)
        return tokens, time.perf_counter() - begin, peak

    for mix in spec.mixes:
        run(mix, min(spec.concurrency, spec.num_prompts))
    rounds: dict[int, list[tuple[int, float, int]]] = {mix: [] for mix in spec.mixes}
    for round_ in range(spec.rounds):
        for mix in turns(spec.mixes, round_):
            rounds[mix].append(run(mix, spec.num_prompts))
    rows = {}
    for mix, measured in rounds.items():
        per_round = [tokens / seconds for tokens, seconds, _ in measured]
        rows[str(mix)] = {
            "output_throughput": sum(per_round) / len(per_round),
            "rounds": per_round,
            "output_tokens": [tokens for tokens, _, _ in measured],
            "peak_in_flight": max(peak for _, _, peak in measured),
        }
    return {"startup_s": startup_s, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m bench.lora_engine SPEC.json OUT.json")
    spec = EngineSpec.from_json(Path(args[0]).read_text())
    Path(args[1]).write_text(json.dumps(measure(spec), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
