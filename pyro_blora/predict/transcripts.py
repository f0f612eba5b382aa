"""Transcripts with word confidences: the records, word alignment between hypotheses, and the JSON lines file.

JSON lines schema (``SCHEMA_VERSION`` 2), one object per utterance, keys in this order:

- ``schema_version`` (int): 2.
- ``id`` (str): the dataset row id, or the file name for files.
- ``source`` (str | null): the audio file path, when there is one.
- ``language`` (str | null): the language given to Whisper (null: detected by Whisper).
- ``text`` (str): the chosen hypothesis.
- ``chooser`` (str): ``"mean"`` or ``"mbr"``.
- ``num_samples`` (int): S.
- ``samples`` (list[str]): the S sample hypotheses, in draw order.
- ``uncertainty`` (float >= 0): mean pairwise error rate between the samples (0: all agree).
- ``mean_token_entropy`` (float, nats): mean next-token entropy along the sample hypotheses.
- ``mean_log_prob`` (float | null, nats): mean token log-probability of the posterior-mean
  hypothesis (null with the MBR chooser).
- ``words`` (list of ``{"word": str, "confidence": float in [0, 1]}``): the chosen hypothesis
  tokenised, each with the fraction of samples that agree with it (all segments, in order).
- ``duration`` (float, s): length of the audio. *New in version 2.*
- ``segments`` (list of ``{"start": float, "end": float, "text": str, "words": [...]}``): the chosen
  hypothesis by segment, with start and end in seconds from the start of the audio; ``words`` as
  above, and the segments' words together are the top-level ``words``. Long-form recordings have
  Whisper's timestamped segments; a clip of 30 s or less is one segment from 0 to its duration.
  *New in version 2.*
- ``reference`` (str | null): the dataset's transcript, when there is one.

Version 2 only adds keys, so a reader of version 1 that looks keys up by name reads version 2
lines unchanged. :func:`read_jsonl` reads both; version 1 lines get ``duration`` and ``segments``
null.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterable, Iterator, Sequence

import jiwer

from pyro_blora.metrics import contains_cjk, normalize_text, scoring_unit, tokenize

__all__ = [
    "JSONL_KEYS",
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "SegmentTranscript",
    "UtteranceTranscript",
    "WordConfidence",
    "agreement",
    "read_jsonl",
    "render_table",
    "segment_word_confidences",
    "spaced_words",
    "word_confidences",
    "word_keys",
    "write_jsonl",
]

SCHEMA_VERSION = 2
# Versions read_jsonl accepts: 2 only added keys to 1.
READABLE_SCHEMA_VERSIONS = (1, 2)
JSONL_KEYS = (
    "schema_version",
    "id",
    "source",
    "language",
    "text",
    "chooser",
    "num_samples",
    "samples",
    "uncertainty",
    "mean_token_entropy",
    "mean_log_prob",
    "words",
    "duration",
    "segments",
    "reference",
)
@dataclass(frozen=True)
class WordConfidence:
    word: str
    # Fraction of the S samples that agree with this word.
    confidence: float


@dataclass(frozen=True)
class SegmentTranscript:
    """A timed stretch of the chosen hypothesis (seconds from the start of the audio)."""

    start: float
    end: float
    text: str
    words: list[WordConfidence]


@dataclass(frozen=True)
class UtteranceTranscript:
    """One line of the JSON lines output (see the module docstring for the schema)."""

    id: str
    source: str | None
    language: str | None
    text: str
    chooser: str
    num_samples: int
    samples: list[str]
    uncertainty: float
    mean_token_entropy: float
    mean_log_prob: float | None
    words: list[WordConfidence]
    reference: str | None = None
    duration: float | None = None
    segments: list[SegmentTranscript] | None = None

    def to_json_dict(self) -> dict[str, Any]:
        record = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        return {key: record[key] for key in JSONL_KEYS}

    @classmethod
    def from_json_dict(cls, record: dict[str, Any]) -> "UtteranceTranscript":
        version = record.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"transcript record has schema_version {version!r}; this version of pyro-blora reads "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}. Re-run `pyro-blora transcribe` to write it in the "
                "current schema, or upgrade pyro-blora."
            )
        values = {key: record.get(key) for key in JSONL_KEYS if key != "schema_version"}
        values["words"] = [WordConfidence(**word) for word in values["words"]]
        if values["segments"] is not None:
            values["segments"] = [
                SegmentTranscript(**{**segment, "words": [WordConfidence(**w) for w in segment["words"]]})
                for segment in values["segments"]
            ]
        return cls(**values)


# ------------------------------------------------------------------ word alignment
def word_keys(text: str, language: str | None) -> tuple[list[str], list[str]]:
    """Scoring tokens of ``text`` and their normalised forms (the keys that are compared)."""
    code = language or "und"
    words = tokenize(text, scoring_unit(code, [text]))
    # A normalised token never contains whitespace, so keys can be joined and split again.
    keys = ["_".join(normalize_text(word, code).split()) or word for word in words]
    return words, keys


def agreement(anchor: Sequence[str], others: Sequence[Sequence[str]]) -> list[list[bool]]:
    """For each sequence in ``others``: which tokens of ``anchor`` it matches, by edit-distance alignment."""
    matched = [[False] * len(anchor) for _ in others]
    if not anchor:
        return matched
    pairs = [(i, other) for i, other in enumerate(others) if other]
    if not pairs:
        return matched
    output = jiwer.process_words([" ".join(anchor)] * len(pairs), [" ".join(other) for _, other in pairs])
    for (i, _), chunks in zip(pairs, output.alignments):
        for chunk in chunks:
            if chunk.type == "equal":
                for position in range(chunk.ref_start_idx, chunk.ref_end_idx):
                    matched[i][position] = True
    return matched


def segment_word_confidences(
    chosen_segments: Sequence[str], samples: Sequence[str], language: str | None = None
) -> list[list[WordConfidence]]:
    """Words of consecutive segments of the chosen hypothesis, each with the fraction of ``samples``
    (texts covering the same stretch of audio) that agree with it; the segments are aligned together,
    so a word that a sample puts across a segment boundary still counts."""
    if not samples:
        raise ValueError("word confidences need at least one sample hypothesis")
    split = [word_keys(text, language) for text in chosen_segments]
    matches = agreement([key for _, keys in split for key in keys], [word_keys(sample, language)[1] for sample in samples])
    out, offset = [], 0
    for words, _ in split:
        out.append([
            WordConfidence(word, sum(match[offset + i] for match in matches) / len(samples)) for i, word in enumerate(words)
        ])
        offset += len(words)
    return out


def word_confidences(chosen: str, samples: Sequence[str], language: str | None = None) -> list[WordConfidence]:
    """Each word of ``chosen`` with the fraction of ``samples`` that agree with it after alignment."""
    return segment_word_confidences([chosen], samples, language)[0]


# ------------------------------------------------------------------ output
def write_jsonl(transcripts: Iterable[UtteranceTranscript], handle: IO[str]) -> int:
    """Write one JSON object per line; returns the number of lines."""
    count = 0
    for transcript in transcripts:
        handle.write(json.dumps(transcript.to_json_dict(), ensure_ascii=False) + "\n")
        count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[UtteranceTranscript]:
    with open(path, encoding="utf-8") as handle:
        return [UtteranceTranscript.from_json_dict(json.loads(line)) for line in handle if line.strip()]


def render_table(transcripts: Sequence[UtteranceTranscript], low_confidence: float = 0.5):
    """A ``rich`` table: low-confidence words in brackets (and red), one row per utterance.

    Every string Rich would read as markup is escaped (file names such as ``take[2].wav`` included), so
    brackets print as written."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=escape(f"Monte Carlo transcripts (words below {low_confidence:.2f} confidence in [brackets])"))
    for name in ("id", "transcript", "uncertainty", "min conf."):
        table.add_column(name, overflow="fold")
    for transcript in transcripts:
        text = Text()
        for separator, word in spaced_words(transcript.words):
            text.append(separator)
            if word.confidence < low_confidence:
                text.append(f"[{word.word}]", style="bold red")
            else:
                text.append(word.word)
        lowest = min((w.confidence for w in transcript.words), default=1.0)
        table.add_row(escape(transcript.id), text, f"{transcript.uncertainty:.3f}", f"{lowest:.2f}")
    return table


def spaced_words(words: Sequence[WordConfidence]) -> Iterator[tuple[str, WordConfidence]]:
    """Each word with the separator written before it: a space, or nothing between CJK characters."""
    for index, word in enumerate(words):
        yield ("" if index == 0 or _is_cjk_pair(words[index - 1].word, word.word) else " "), word


# CJK and full-width punctuation (。，、！？ …) attaches to the word before it.
_CJK_PUNCTUATION = re.compile(r"[\u3000-\u303f\uff00-\uffef]")


def _is_cjk_pair(left: str, right: str) -> bool:
    """Two neighbouring CJK characters, or CJK punctuation after any word, are written without a space."""
    return (contains_cjk(left[-1:]) and contains_cjk(right[:1])) or bool(_CJK_PUNCTUATION.match(right[:1]))

