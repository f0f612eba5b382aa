"""Per-utterance checks: each bad row gets one reason instead of a crash deep in torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pyro_blora.data.audio import AudioDecodeError, load_audio
from pyro_blora.data.labels import EnglishOnlyModelError, TranscriptEncoder, UnknownLanguageError
from pyro_blora.features import HOP_LENGTH, SAMPLING_RATE

__all__ = ["CheckedUtterance", "check_utterance"]


@dataclass(frozen=True)
class CheckedUtterance:
    """A usable utterance (problem is None) or the reason it is not (waveform/labels then empty)."""

    problem: str | None
    waveform: np.ndarray
    labels: list[int]


def check_utterance(
    audio: Mapping,
    text: str,
    language: str,
    encoder: TranscriptEncoder,
    max_audio_seconds: float,
    max_label_tokens: int,
) -> CheckedUtterance:
    """Cheap text checks first, so a row with an empty transcript is never decoded."""
    if not text.strip():
        return _rejected("empty_text")
    try:
        labels = encoder.labels(text, language)
    except EnglishOnlyModelError:
        return _rejected("non_english_for_english_only_model")
    except UnknownLanguageError:
        return _rejected("unknown_language")
    if len(labels) > max_label_tokens:
        return _rejected("text_too_long")
    try:
        waveform = load_audio(audio)
    except FileNotFoundError:
        return _rejected("missing_file")
    except AudioDecodeError:
        return _rejected("unreadable_audio")
    if waveform.shape[0] < HOP_LENGTH:
        return _rejected("empty_audio")
    if not np.isfinite(waveform).all():
        return _rejected("non_finite_audio")
    if waveform.shape[0] > max_audio_seconds * SAMPLING_RATE:
        return _rejected("audio_too_long")
    return CheckedUtterance(None, waveform, labels)


def _rejected(reason: str) -> CheckedUtterance:
    return CheckedUtterance(reason, np.zeros(0, dtype=np.float32), [])
