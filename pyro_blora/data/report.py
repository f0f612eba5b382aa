"""What was filtered out of a dataset, and how to fix it.

Bad rows are dropped so one broken file does not stop training, but never silently: every
dropped row is counted under a reason, listed by id, and each reason comes with a fix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyro_blora.checkpoint import atomic_write_json

__all__ = ["REASON_HINTS", "DataReport", "NoUsableRowsError"]

REASON_HINTS: dict[str, str] = {
    "missing_file": "the audio path does not exist; fix the paths "
    "(relative paths resolve against the manifest's folder)",
    "unreadable_audio": "corrupt, truncated or unsupported audio; re-encode as WAV/FLAC "
    "(e.g. ffmpeg -i in.mp3 -ar 16000 out.wav)",
    "empty_audio": "the audio has no samples (or under 10 ms); re-export the clip or remove the row",
    "non_finite_audio": "the audio holds NaN or infinite samples; re-export the clip",
    "audio_too_long": "Whisper takes at most 30 s per input; split long recordings into segments of 30 s or less",
    "empty_text": "the transcript is empty or whitespace; add the transcript or remove the row",
    "text_too_long": "prompt + transcript + end token exceed the decoder's positions (448 for Whisper); "
    "split the utterance",
    "unknown_language": "the language is not one the tokenizer knows; use a Whisper code such as 'en', 'zh', 'es' "
    "(for code-switched speech, the matrix language) or pass language= to override",
    "non_english_for_english_only_model": "the row's language is not English but the model is English-only "
    "('.en'); use a multilingual checkpoint such as 'base', or fix the row's language",
}


class NoUsableRowsError(ValueError):
    """Every row of a dataset was filtered out."""


@dataclass
class DataReport:
    """Counts of dropped rows per reason, their ids, and the fix for each reason."""

    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, row_id: str) -> None:
        if reason not in REASON_HINTS:
            raise KeyError(f"unknown filter reason {reason!r}; known: {sorted(REASON_HINTS)}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.ids.setdefault(reason, []).append(row_id)

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    @property
    def hints(self) -> dict[str, str]:
        return {reason: REASON_HINTS[reason] for reason in self.counts}

    def __str__(self) -> str:
        lines = [f"{self.kept} of {self.total} rows usable, {self.dropped} dropped"]
        for reason, count in sorted(self.counts.items(), key=lambda item: -item[1]):
            shown = ", ".join(self.ids[reason][:5]) + (", ..." if count > 5 else "")
            lines.append(f"  {reason}: {count} ({shown})")
            lines.append(f"    fix: {REASON_HINTS[reason]}")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        payload = asdict(self) | {"hints": self.hints}
        atomic_write_json(path, payload)

    @classmethod
    def from_json(cls, path: str | Path) -> "DataReport":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(total=payload["total"], kept=payload["kept"], counts=payload["counts"], ids=payload["ids"])
