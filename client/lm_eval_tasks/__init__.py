"""Task definitions for EleutherAI's lm-evaluation-harness, shipped with the client (its `--include_path`).

`python -m client lm-eval-tasks` prints this folder; tuneserve_ifeval.yaml is lm-eval's own IFEval task on
the IFEval prompts shipped in client/data, scored by lm-eval's own IFEval functions (tuneserve_ifeval.py).
"""

from pathlib import Path


def include_path() -> Path:
    """The folder to pass to `lm_eval --include_path`."""
    return Path(__file__).resolve().parent
