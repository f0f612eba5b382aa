"""Whisper-style transcript normalisation, safe for Chinese, Japanese, Korean and Arabic script.

English text goes through Whisper's English normaliser (contractions, numbers, spellings);
every other language through the basic normaliser, with one change described below.

Why the basic normaliser is adapted: transformers' `BasicTextNormalizer` replaces every
character of Unicode category M (marks), S (symbols) and P (punctuation) with a space. Marks
that do not compose with their base letter under NFKC then split words apart: Arabic
harakat turn "كَتَبَ" into "ك ت ب", and Devanagari vowel signs break Hindi words the same
way. `ScriptPreservingNormalizer` instead deletes the Arabic diacritics and the tatweel
(Arabic references are often vocalised, model output rarely is) and keeps all other marks
attached to their letter. CJK characters are letters (category Lo) and are kept either way;
CJK punctuation such as "，" and "。" is punctuation and becomes a space.

Idempotence: text is NFKC-normalised first (full-width and mathematical letters become plain
ones before lower-casing), and the English normaliser is repeated until its output stops
changing, because one pass can rewrite its own output ("0:1" -> "0 one" -> "one"). Normalising
an already normalised transcript therefore changes nothing. This departs from a single Whisper
pass only on such inputs.

Spelling mapping: Whisper's English normaliser also maps British to American spellings with
a table that ships with hub checkpoints (`normalizer.json`), not with transformers. The
default here is an empty table, so "colour" and "color" stay different words; pass the table
from a checkpoint (see `load_english_spelling_mapping`) to match Whisper's scores exactly.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from os import PathLike
from typing import Callable, Mapping

from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

__all__ = [
    "ScriptPreservingNormalizer",
    "language_code",
    "load_english_spelling_mapping",
    "normalize_text",
]

# Arabic harakat, tanwin, shadda, sukun, maddah/hamza above/below (U+064B-U+065F), the
# superscript alef (U+0670) and the tatweel used to stretch words (U+0640).
_ARABIC_DIACRITICS = re.compile("[\u064b-\u065f\u0670\u0640]")

# Far above the passes any input needed in property tests (7, on strings like "five one twenty 0 0 0 0").
_MAX_PASSES = 32


def _remove_symbols_keep_marks(text: str) -> str:
    """NFKC, drop Arabic diacritics, turn symbols and punctuation into spaces, keep other marks."""
    text = _ARABIC_DIACRITICS.sub("", unicodedata.normalize("NFKC", text))
    return "".join(" " if unicodedata.category(char)[0] in "SP" else char for char in text)


class ScriptPreservingNormalizer(BasicTextNormalizer):
    """Whisper's basic normaliser that keeps combining marks inside words (see module docstring)."""

    def __init__(self) -> None:
        super().__init__(remove_diacritics=False, split_letters=False)
        self.clean = _remove_symbols_keep_marks

    def __call__(self, text: str) -> str:
        return super().__call__(text).strip()


def language_code(language: str) -> str:
    """Lower-case primary subtag of a language tag: "en-US" -> "en", "ZH" -> "zh"."""
    if not isinstance(language, str) or not language.strip():
        raise ValueError(
            f"language must be a non-empty language code such as 'en' or 'zh', got {language!r}"
        )
    return re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]


def load_english_spelling_mapping(path: str | PathLike) -> dict[str, str]:
    """Read the British-to-American spelling table (`normalizer.json` of a Whisper checkpoint)."""
    with open(path, encoding="utf-8") as handle:
        mapping = json.load(handle)
    if not isinstance(mapping, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in mapping.items()
    ):
        raise ValueError(
            f"{path} is not a spelling table: expected a JSON object mapping words to words, "
            "like the normalizer.json file of a Whisper checkpoint"
        )
    return mapping


@lru_cache(maxsize=1)
def _english_without_spellings() -> EnglishTextNormalizer:
    return EnglishTextNormalizer({})


@lru_cache(maxsize=1)
def _basic() -> ScriptPreservingNormalizer:
    return ScriptPreservingNormalizer()


def normalize_text(
    text: str,
    language: str = "en",
    *,
    english_spelling_mapping: Mapping[str, str] | None = None,
) -> str:
    """Normalise a transcript before scoring, so that case, punctuation and formatting are not errors.

    `language` is a Whisper language code; "en" selects the English normaliser, anything else
    the script-preserving basic one. `english_spelling_mapping` only affects English.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects a string, got {type(text).__name__}")
    # Compatibility forms first (full-width letters, mathematical letters, ligatures), so that
    # lower-casing sees the plain letter and a second pass changes nothing.
    text = unicodedata.normalize("NFKC", text)
    if language_code(language) != "en":
        return _basic()(text)
    if english_spelling_mapping is None:
        normalizer = _english_without_spellings()
    else:
        normalizer = EnglishTextNormalizer(dict(english_spelling_mapping))
    return _until_stable(lambda value: normalizer(value).strip(), text)


def _until_stable(normalizer: Callable[[str], str], text: str) -> str:
    """Repeat the English normaliser until the text stops changing.

    One pass is not idempotent on digit runs ("0:1" -> "0 one" -> "one"): its number rules see
    their own output as new input. Scoring must not depend on whether a transcript was already
    normalised, so passes repeat; ordinary sentences are stable after the first.
    """
    for _ in range(_MAX_PASSES):
        normalized = normalizer(text)
        if normalized == text:
            break
        text = normalized
    return text
