"""IFEval's 25 verifiable instructions: one checker class each, and a registry from instruction id to class.

A port of google-research `instruction_following_eval/instructions.py` (Zhou et al. 2023): every
`check` reproduces its `check_following`, regexes and off-by-one quirks included, so scores match the
paper's code. Where the reference draws a missing or out-of-range argument at random, these checkers
refuse it with an error that names the argument instead: a score must not depend on a dice roll.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from tuneserve.ifeval import text

logger = logging.getLogger(__name__)

# The comparisons an instruction with a threshold may ask for: count < n, or count >= n.
RELATIONS = ("less than", "at least")

# ISO 639-1 codes the reference accepts for language:response_language (its LANGUAGE_CODES).
LANGUAGE_CODES: Mapping[str, str] = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
    "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
    "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil",
    "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew",
    "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}  # fmt: skip

_CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class InstructionArgumentError(ValueError):
    """An instruction's kwargs are missing, unknown, of the wrong type or out of range."""


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


def _require_relation(name: str, value: str) -> None:
    if value not in RELATIONS:
        raise InstructionArgumentError(f"{name} must be one of {RELATIONS}, got {value!r}")


def _require_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise InstructionArgumentError(f"{name} must be >= 0, got {value}")


def _require_text(name: str, value: str) -> None:
    if not value.strip():
        raise InstructionArgumentError(f"{name} must be a non-empty string, got {value!r}")


class Instruction(ABC):
    """One instruction with its arguments; `check` says whether a response follows it."""

    @abstractmethod
    def check(self, response: str) -> bool: ...


def _detects_as(response: str, language: str) -> bool:
    try:
        return text.detect_language(response) == language
    except text.LanguageUndetectable:
        # The reference counts a text langdetect cannot read (no letters) as following.
        logger.debug("no language detectable in %r; counted as followed, as the reference does", response)
        return True


# --- keywords -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeywordExistence(Instruction):
    """Every keyword occurs, case-insensitively. Keywords are regexes in the reference, and here."""

    keywords: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.keywords:
            raise InstructionArgumentError("keywords must list at least one keyword")
        for keyword in self.keywords:
            _require_text("keywords", keyword)

    def check(self, response: str) -> bool:
        return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in self.keywords)


@dataclass(frozen=True)
class KeywordFrequency(Instruction):
    """The keyword (a regex, case-insensitive; substrings count) occurs `relation` `frequency` times."""

    keyword: str
    frequency: int
    relation: str

    def __post_init__(self) -> None:
        _require_text("keyword", self.keyword)
        _require_non_negative("frequency", self.frequency)
        _require_relation("relation", self.relation)

    def check(self, response: str) -> bool:
        occurrences = len(re.findall(self.keyword.strip(), response, flags=re.IGNORECASE))
        return _compare(occurrences, self.relation, self.frequency)


@dataclass(frozen=True)
class ForbiddenWords(Instruction):
    """None of the words occurs as a whole word, case-insensitively."""

    forbidden_words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.forbidden_words:
            raise InstructionArgumentError("forbidden_words must list at least one word")
        for word in self.forbidden_words:
            _require_text("forbidden_words", word)

    def check(self, response: str) -> bool:
        return not any(
            re.search(r"\b" + word + r"\b", response, flags=re.IGNORECASE) for word in self.forbidden_words
        )


@dataclass(frozen=True)
class LetterFrequency(Instruction):
    """The letter (case-insensitive) occurs `let_relation` `let_frequency` times."""

    letter: str
    let_frequency: int
    let_relation: str

    def __post_init__(self) -> None:
        # The reference takes any single character ('#' occurs in the data) and draws a random
        # letter for anything longer.
        if len(self.letter) != 1 or not self.letter.strip():
            raise InstructionArgumentError(f"letter must be a single character, got {self.letter!r}")
        _require_non_negative("let_frequency", self.let_frequency)
        _require_relation("let_relation", self.let_relation)

    def check(self, response: str) -> bool:
        count = collections.Counter(response.lower())[self.letter.lower()]
        return _compare(count, self.let_relation, self.let_frequency)


# --- language -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseLanguage(Instruction):
    """langdetect names `language` for the whole response."""

    language: str

    def __post_init__(self) -> None:
        if self.language not in LANGUAGE_CODES:
            raise InstructionArgumentError(
                f"language must be one of the reference's codes {sorted(LANGUAGE_CODES)}, "
                f"got {self.language!r}"
            )

    def check(self, response: str) -> bool:
        return _detects_as(response, self.language)


# --- length constraints -------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberOfSentences(Instruction):
    """Punkt sentence count compared with `num_sentences`."""

    num_sentences: int
    relation: str

    def __post_init__(self) -> None:
        _require_non_negative("num_sentences", self.num_sentences)
        _require_relation("relation", self.relation)

    def check(self, response: str) -> bool:
        return _compare(text.count_sentences(response), self.relation, self.num_sentences)


@dataclass(frozen=True)
class NumberOfParagraphs(Instruction):
    """Exactly `num_paragraphs` paragraphs separated by `***`; an empty one inside fails."""

    num_paragraphs: int

    def __post_init__(self) -> None:
        _require_non_negative("num_paragraphs", self.num_paragraphs)

    def check(self, response: str) -> bool:
        paragraphs = re.split(r"\s?\*\*\*\s?", response)
        count = len(paragraphs)
        for index, paragraph in enumerate(paragraphs):
            if not paragraph.strip():
                if index in (0, len(paragraphs) - 1):
                    count -= 1
                else:
                    return False
        return count == self.num_paragraphs


@dataclass(frozen=True)
class NumberOfWords(Instruction):
    """Count of `\\w+` runs compared with `num_words`."""

    num_words: int
    relation: str

    def __post_init__(self) -> None:
        _require_non_negative("num_words", self.num_words)
        _require_relation("relation", self.relation)

    def check(self, response: str) -> bool:
        return _compare(text.count_words(response), self.relation, self.num_words)


@dataclass(frozen=True)
class NthParagraphFirstWord(Instruction):
    """Exactly `num_paragraphs` paragraphs split on blank lines (`\\n\\n`), paragraph `nth_paragraph`
    (1-based) starting with `first_word` (case-insensitive, trailing punctuation ignored)."""

    num_paragraphs: int
    nth_paragraph: int
    first_word: str

    def __post_init__(self) -> None:
        _require_non_negative("num_paragraphs", self.num_paragraphs)
        if not 1 <= self.nth_paragraph <= self.num_paragraphs:
            raise InstructionArgumentError(
                f"nth_paragraph must be between 1 and num_paragraphs ({self.num_paragraphs}), "
                f"got {self.nth_paragraph}"
            )
        _require_text("first_word", self.first_word)

    def check(self, response: str) -> bool:
        paragraphs = re.split(r"\n\n", response)
        count = len(paragraphs) - sum(1 for paragraph in paragraphs if not paragraph.strip())
        # The reference indexes the raw split (blank paragraphs included) with the non-blank count.
        if self.nth_paragraph > count:
            return False
        paragraph = paragraphs[self.nth_paragraph - 1].strip()
        if not paragraph:
            return False
        word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
        first_word = ""
        for letter in word:
            if letter in {".", ",", "?", "!", "'", '"'}:
                break
            first_word += letter.lower()
        return count == self.num_paragraphs and first_word == self.first_word.lower()


# --- detectable content -------------------------------------------------------------------------


@dataclass(frozen=True)
class Placeholders(Instruction):
    """At least `num_placeholders` square-bracket placeholders such as [address]."""

    num_placeholders: int

    def __post_init__(self) -> None:
        _require_non_negative("num_placeholders", self.num_placeholders)

    def check(self, response: str) -> bool:
        return len(re.findall(r"\[.*?\]", response)) >= self.num_placeholders


@dataclass(frozen=True)
class Postscript(Instruction):
    """A line (case-insensitive) containing the postscript marker, e.g. "P.S." or "P.P.S"."""

    postscript_marker: str

    def __post_init__(self) -> None:
        _require_text("postscript_marker", self.postscript_marker)

    def check(self, response: str) -> bool:
        marker = self.postscript_marker.strip()
        if marker == "P.P.S":
            pattern = r"\s*p\.\s?p\.\s?s.*$"
        elif marker == "P.S.":
            pattern = r"\s*p\.\s?s\..*$"
        else:
            pattern = r"\s*" + marker.lower() + r".*$"
        return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# --- detectable format --------------------------------------------------------------------------


@dataclass(frozen=True)
class BulletLists(Instruction):
    """Exactly `num_bullets` lines starting with a markdown bullet (`* ` or `-`)."""

    num_bullets: int

    def __post_init__(self) -> None:
        _require_non_negative("num_bullets", self.num_bullets)

    def check(self, response: str) -> bool:
        stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
        dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
        return len(stars) + len(dashes) == self.num_bullets


@dataclass(frozen=True)
class ConstrainedResponse(Instruction):
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe."."""

    def check(self, response: str) -> bool:
        stripped = response.strip()
        return any(option in stripped for option in _CONSTRAINED_RESPONSE_OPTIONS)


@dataclass(frozen=True)
class HighlightedSections(Instruction):
    """At least `num_highlights` non-empty *highlighted* or **bold** spans on one line each."""

    num_highlights: int

    def __post_init__(self) -> None:
        _require_non_negative("num_highlights", self.num_highlights)

    def check(self, response: str) -> bool:
        singles = re.findall(r"\*[^\n\*]*\*", response)
        doubles = re.findall(r"\*\*[^\n\*]*\*\*", response)
        count = sum(1 for span in singles if span.strip("*").strip())
        count += sum(1 for span in doubles if span.removeprefix("**").removesuffix("**").strip())
        return count >= self.num_highlights


@dataclass(frozen=True)
class MultipleSections(Instruction):
    """At least `num_sections` sections, each opened by `section_spliter` and a number ("Section 1")."""

    section_spliter: str  # the reference's spelling, kept because it is the dataset's kwarg name
    num_sections: int

    def __post_init__(self) -> None:
        _require_text("section_spliter", self.section_spliter)
        _require_non_negative("num_sections", self.num_sections)

    def check(self, response: str) -> bool:
        pattern = r"\s?" + self.section_spliter.strip() + r"\s?\d+\s?"
        return len(re.split(pattern, response)) - 1 >= self.num_sections


@dataclass(frozen=True)
class JsonFormat(Instruction):
    """The whole response parses as JSON, optionally inside a ``` / ```json fence."""

    def check(self, response: str) -> bool:
        body = (
            response.strip()
            .removeprefix("```json")
            .removeprefix("```Json")
            .removeprefix("```JSON")
            .removeprefix("```")
            .removesuffix("```")
            .strip()
        )
        try:
            json.loads(body)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Title(Instruction):
    """A non-blank title in double angular brackets, such as <<poem of joy>>."""

    def check(self, response: str) -> bool:
        return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", response))


# --- combination --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoResponses(Instruction):
    """Exactly two different non-blank responses separated by `******`."""

    def check(self, response: str) -> bool:
        parts = response.split("******")
        answers = []
        for index, part in enumerate(parts):
            if part.strip():
                answers.append(part)
            elif index not in (0, len(parts) - 1):
                return False
        return len(answers) == 2 and answers[0].strip() != answers[1].strip()


@dataclass(frozen=True)
class RepeatPrompt(Instruction):
    """Starts (case-insensitively) with `prompt_to_repeat`."""

    prompt_to_repeat: str

    def __post_init__(self) -> None:
        _require_text("prompt_to_repeat", self.prompt_to_repeat)

    def check(self, response: str) -> bool:
        return response.strip().lower().startswith(self.prompt_to_repeat.strip().lower())


# --- start / end --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndPhrase(Instruction):
    """Ends (case-insensitively, ignoring enclosing double quotes) with `end_phrase`."""

    end_phrase: str

    def __post_init__(self) -> None:
        _require_text("end_phrase", self.end_phrase)

    def check(self, response: str) -> bool:
        return response.strip().strip('"').lower().endswith(self.end_phrase.strip().lower())


@dataclass(frozen=True)
class Quotation(Instruction):
    """Wrapped in double quotation marks."""

    def check(self, response: str) -> bool:
        stripped = response.strip()
        return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'


# --- change case --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapitalWordFrequency(Instruction):
    """Count of all-capital word tokens (nltk.word_tokenize) compared with `capital_frequency`."""

    capital_frequency: int
    capital_relation: str

    def __post_init__(self) -> None:
        _require_non_negative("capital_frequency", self.capital_frequency)
        _require_relation("capital_relation", self.capital_relation)

    def check(self, response: str) -> bool:
        capitals = sum(1 for word in text.word_tokenize(response) if word.isupper())
        return _compare(capitals, self.capital_relation, self.capital_frequency)


@dataclass(frozen=True)
class EnglishCapital(Instruction):
    """All cased characters upper case, and langdetect says English."""

    def check(self, response: str) -> bool:
        return response.isupper() and _detects_as(response, "en")


@dataclass(frozen=True)
class EnglishLowercase(Instruction):
    """All cased characters lower case, and langdetect says English."""

    def check(self, response: str) -> bool:
        return response.islower() and _detects_as(response, "en")


# --- punctuation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoComma(Instruction):
    """No ASCII comma anywhere."""

    def check(self, response: str) -> bool:
        return "," not in response


# In the reference registry's order.
INSTRUCTIONS: Mapping[str, type[Instruction]] = {
    "keywords:existence": KeywordExistence,
    "keywords:frequency": KeywordFrequency,
    "keywords:forbidden_words": ForbiddenWords,
    "keywords:letter_frequency": LetterFrequency,
    "language:response_language": ResponseLanguage,
    "length_constraints:number_sentences": NumberOfSentences,
    "length_constraints:number_paragraphs": NumberOfParagraphs,
    "length_constraints:number_words": NumberOfWords,
    "length_constraints:nth_paragraph_first_word": NthParagraphFirstWord,
    "detectable_content:number_placeholders": Placeholders,
    "detectable_content:postscript": Postscript,
    "detectable_format:number_bullet_lists": BulletLists,
    "detectable_format:constrained_response": ConstrainedResponse,
    "detectable_format:number_highlighted_sections": HighlightedSections,
    "detectable_format:multiple_sections": MultipleSections,
    "detectable_format:json_format": JsonFormat,
    "detectable_format:title": Title,
    "combination:two_responses": TwoResponses,
    "combination:repeat_prompt": RepeatPrompt,
    "startend:end_checker": EndPhrase,
    "change_case:capital_word_frequency": CapitalWordFrequency,
    "change_case:english_capital": EnglishCapital,
    "change_case:english_lowercase": EnglishLowercase,
    "punctuation:no_comma": NoComma,
    "startend:quotation": Quotation,
}

INSTRUCTION_TYPES: tuple[str, ...] = tuple(INSTRUCTIONS)


def _convert(instruction_id: str, name: str, expected: Any, value: Any) -> Any:
    """`value` from JSON as the field's type: int (not bool), str, or tuple[str, ...] from a list."""
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is str and isinstance(value, str):
        return value
    if (
        expected == tuple[str, ...]
        and isinstance(value, list | tuple)
        and all(isinstance(item, str) for item in value)
    ):
        return tuple(value)
    wanted = {int: "an integer", str: "a string"}.get(expected, "a list of strings")
    raise InstructionArgumentError(f"{instruction_id}: {name} must be {wanted}, got {value!r}")


def build_instruction(instruction_id: str, kwargs: Mapping[str, Any]) -> Instruction:
    """The checker for `instruction_id` with `kwargs` as a dataset row gives them.

    Keys whose value is None are ignored: the hub copy of IFEval lists every instruction's keys in
    every row, None where unused. Raises InstructionArgumentError naming the offending argument.
    """
    cls = INSTRUCTIONS.get(instruction_id)
    if cls is None:
        raise InstructionArgumentError(
            f"unknown instruction id {instruction_id!r}; valid ids: {', '.join(INSTRUCTION_TYPES)}"
        )
    given = {name: value for name, value in kwargs.items() if value is not None}
    hints = get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InstructionArgumentError(
            f"{instruction_id}: unexpected kwargs {unknown}; it takes {names or 'none'}"
        )
    missing = [name for name in names if name not in given]
    if missing:
        raise InstructionArgumentError(f"{instruction_id}: missing kwargs {missing}; it takes {names}")
    converted = {name: _convert(instruction_id, name, hints[name], given[name]) for name in names}
    try:
        return cls(**converted)
    except InstructionArgumentError as error:
        raise InstructionArgumentError(f"{instruction_id}: {error}") from None
