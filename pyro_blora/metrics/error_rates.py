"""Word, character and mixed (code-switching) error rates, corpus-level and per utterance.

All rates are edit distances between token sequences (via jiwer's alignment), summed over
utterances and divided by the number of reference tokens. What changes is the token:

- word: whitespace-separated words (`wer`);
- character: characters of the text with whitespace runs collapsed to one space, which counts
  as a character, as in jiwer's `cer`;
- mixed: each CJK character is one token and every other whitespace-separated run is one
  token, so "我喜欢 python" is four tokens (`mixed_error_rate`, alias `mer`). This is the
  mixed error rate used for Mandarin-English code-switching. It is *not* jiwer's `mer`,
  which is the match error rate, a different metric.

CJK characters, by code point (Unicode blocks):
  Han: U+3005-U+3007 (々〆〇), U+3400-U+4DBF (Extension A), U+4E00-U+9FFF (Unified Ideographs),
  U+F900-U+FAFF (Compatibility Ideographs), U+20000-U+323AF (Extensions B-H and the
  Compatibility Supplement);
  Japanese kana: U+3041-U+309F (Hiragana), U+30A0-U+30FF (Katakana, with the prolonged sound
  mark ー), U+31F0-U+31FF (Katakana Phonetic Extensions), U+FF66-U+FF9F (half-width Katakana);
  Korean: U+AC00-U+D7A3 (precomposed Hangul syllables), as Korean is scored per syllable.

Empty references: an utterance with an empty reference contributes its hypothesis tokens as
insertions. A corpus rate needs at least one reference token, so when every reference is
empty the rate functions raise ValueError. The per-utterance rate of an empty reference is
0.0 for an empty hypothesis and nan otherwise (undefined; filter it before correlating).

The rate functions score the strings as given; `error_rate` normalises first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import jiwer

from pyro_blora.metrics.normalization import language_code, normalize_text

__all__ = [
    "CJK_LANGUAGES",
    "ErrorCounts",
    "Unit",
    "cer",
    "contains_cjk",
    "corpus_rate",
    "error_counts",
    "error_rate",
    "language_error_counts",
    "mer",
    "mixed_error_rate",
    "mixed_tokens",
    "scoring_unit",
    "tokenize",
    "utterance_error_counts",
    "utterance_error_rates",
    "wer",
]

Unit = Literal["word", "character", "mixed"]

# Languages scored with the mixed error rate (Whisper codes; "yue" is Cantonese).
CJK_LANGUAGES = frozenset({"zh", "ja", "ko", "yue"})

_CJK_CLASS = (
    "\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af"
    "\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
    "\uac00-\ud7a3"
)
# One CJK character, or a run of anything that is neither CJK nor whitespace.
_MIXED_TOKEN = re.compile(f"[{_CJK_CLASS}]|[^{_CJK_CLASS}\\s]+")
_CJK_CHARACTER = re.compile(f"[{_CJK_CLASS}]")


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations that turn references into hypotheses, and the number of reference tokens."""

    substitutions: int
    deletions: int
    insertions: int
    reference_length: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / reference_length; 0.0 for empty-vs-empty, nan for insertions into an empty reference."""
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else math.nan
        return self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def mixed_tokens(text: str) -> list[str]:
    """Tokens of the mixed error rate: each CJK character alone, other words whole."""
    return _MIXED_TOKEN.findall(text)


def _character_tokens(text: str) -> list[str]:
    return list(" ".join(text.split()))


_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "word": str.split,
    "character": _character_tokens,
    "mixed": mixed_tokens,
}


def _tokenizer(unit: Unit) -> Callable[[str], list[str]]:
    if unit not in _TOKENIZERS:
        raise ValueError(f"unit must be one of {sorted(_TOKENIZERS)}, got {unit!r}")
    return _TOKENIZERS[unit]


def tokenize(text: str, unit: Unit = "word") -> list[str]:
    """Split a transcript into the tokens that `unit` scores."""
    return _tokenizer(unit)(text)


def _as_utterances(texts: str | Sequence[str], role: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{role}[{index}] is {type(text).__name__}, expected a string transcript")
    return texts


def utterance_error_counts(
    references: str | Sequence[str], hypotheses: str | Sequence[str], unit: Unit = "word"
) -> list[ErrorCounts]:
    """One `ErrorCounts` per (reference, hypothesis) pair."""
    references = _as_utterances(references, "references")
    hypotheses = _as_utterances(hypotheses, "hypotheses")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"got {len(references)} references but {len(hypotheses)} hypotheses; "
            "pass one hypothesis per reference, in the same order"
        )
    if not references:
        raise ValueError("no utterances to score: references and hypotheses are empty")
    tokenizer = _tokenizer(unit)

    def transform(texts: list[str]) -> list[list[str]]:
        return [tokenizer(text) for text in texts]

    output = jiwer.process_words(
        references, hypotheses, reference_transform=transform, hypothesis_transform=transform
    )
    counts = []
    for reference_tokens, chunks in zip(output.references, output.alignments):
        edits = {"equal": 0, "substitute": 0, "delete": 0, "insert": 0}
        for chunk in chunks:
            # Substituted and deleted spans are measured on the reference, insertions on the hypothesis.
            if chunk.type == "insert":
                edits["insert"] += chunk.hyp_end_idx - chunk.hyp_start_idx
            else:
                edits[chunk.type] += chunk.ref_end_idx - chunk.ref_start_idx
        counts.append(
            ErrorCounts(edits["substitute"], edits["delete"], edits["insert"], len(reference_tokens))
        )
    return counts


def error_counts(
    references: str | Sequence[str], hypotheses: str | Sequence[str], unit: Unit = "word"
) -> ErrorCounts:
    """Edit counts summed over the corpus."""
    return sum(utterance_error_counts(references, hypotheses, unit), ErrorCounts(0, 0, 0, 0))


def utterance_error_rates(
    references: str | Sequence[str], hypotheses: str | Sequence[str], unit: Unit = "word"
) -> list[float]:
    """Per-utterance error rates, e.g. to correlate with per-utterance uncertainty."""
    return [counts.rate for counts in utterance_error_counts(references, hypotheses, unit)]


def corpus_rate(counts: Sequence[ErrorCounts]) -> float:
    """Summed errors over summed reference tokens of per-utterance counts."""
    total = sum(counts, ErrorCounts(0, 0, 0, 0))
    if total.reference_length == 0:
        raise ValueError(
            "every reference is empty, so the error rate is undefined; score non-empty references "
            "(use error_counts to count the insertions)"
        )
    return total.rate


def _corpus_rate(references, hypotheses, unit: Unit) -> float:
    return corpus_rate(utterance_error_counts(references, hypotheses, unit))


def wer(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Corpus word error rate (can exceed 1 through insertions)."""
    return _corpus_rate(references, hypotheses, "word")


def cer(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Corpus character error rate; the single spaces between words count as characters."""
    return _corpus_rate(references, hypotheses, "character")


def mixed_error_rate(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Corpus mixed error rate: CJK characters and other words as tokens (not jiwer's match error rate)."""
    return _corpus_rate(references, hypotheses, "mixed")


mer = mixed_error_rate


def contains_cjk(text: str) -> bool:
    """Whether `text` holds at least one character that the mixed error rate scores alone."""
    return _CJK_CHARACTER.search(text) is not None


def scoring_unit(language: str, references: str | Sequence[str] = ()) -> Unit:
    """"mixed" for Chinese, Japanese, Korean, Cantonese or references containing CJK text, else "word"."""
    if language_code(language) in CJK_LANGUAGES:
        return "mixed"
    if any(contains_cjk(text) for text in _as_utterances(references, "references")):
        return "mixed"
    return "word"


def language_error_counts(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    language: str,
    *,
    normalize: bool = True,
) -> tuple[list[ErrorCounts], Unit]:
    """Per-utterance edit counts as a language is reported (normalised; MER for CJK text, else WER),
    and the unit: their sums make :func:`error_rate`, so per-utterance records add up to it exactly."""
    references = _as_utterances(references, "references")
    hypotheses = _as_utterances(hypotheses, "hypotheses")
    if normalize:
        references = [normalize_text(text, language) for text in references]
        hypotheses = [normalize_text(text, language) for text in hypotheses]
    unit = scoring_unit(language, references)
    return utterance_error_counts(references, hypotheses, unit), unit


def error_rate(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    language: str,
    *,
    normalize: bool = True,
) -> float:
    """The error rate a language is reported with: normalise, then MER for CJK text and WER otherwise."""
    counts, _ = language_error_counts(references, hypotheses, language, normalize=normalize)
    return corpus_rate(counts)
