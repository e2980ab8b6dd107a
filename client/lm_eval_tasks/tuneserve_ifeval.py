"""The functions tuneserve_ifeval.yaml names: the packaged IFEval prompts as lm-eval's dataset, and lm-eval's
own IFEval scoring (lm_eval.tasks.ifeval.utils), made to run offline and deterministically.

lm-eval loads this file by path (`!function tuneserve_ifeval.process_results`), so imports are absolute.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any


def load_prompts(data: str | None = None, **_metadata: Any) -> Any:
    """IFEval's prompts as a datasets.DatasetDict with one `test` split: the copy shipped in the client
    package, or `data` (a JSONL file in IFEval's format, or a hub id such as google/IFEval) given with
    `--metadata '{"data": ...}'`; read by client.ifeval.load_items, as `client bench --suite ifeval` does.
    """
    import datasets

    from client.ifeval import load_items
    from client.suites import default_data

    items = load_items(data or default_data("ifeval"))
    rows = [
        {
            "key": item.key,
            "prompt": item.prompt,
            "instruction_id_list": list(item.instruction_id_list),
            "kwargs": [dict(kwargs) for kwargs in item.kwargs],
        }
        for item in items
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


@functools.cache
def _lm_eval_ifeval() -> ModuleType:
    """lm-eval's IFEval scoring module, imported once NLTK can find its English punkt_tab model (its import
    would otherwise download it) and with langdetect's global seed fixed as client.ifeval fixes it (the
    response_language checks otherwise vary from run to run)."""
    import langdetect

    from client.ifeval.nltk_data import ensure_punkt_tab
    from tuneserve.ifeval.text import LANGDETECT_SEED

    ensure_punkt_tab()
    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    from lm_eval.tasks.ifeval import utils

    return utils


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = _lm_eval_ifeval().process_results(doc, results)
    return result


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    return float(_lm_eval_ifeval().agg_inst_level_acc(items))
