"""Subtitles (SRT, WebVTT) from Monte Carlo transcripts.

One cue per segment of the chosen hypothesis. Words whose confidence (the share of posterior
draws that agree with them) is below the threshold are marked: in [brackets] in SRT, which has
no portable styling, and in WebVTT with brackets inside a ``<c.low>`` class span that the file's
STYLE block colours, so players that ignore styles still show the brackets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pyro_blora.predict.transcripts import SegmentTranscript, UtteranceTranscript, spaced_words

__all__ = ["LINE_WIDTH", "format_timestamp", "output_paths", "srt_text", "timed_segments", "vtt_text", "write_subtitles"]

# Characters per subtitle line before wrapping (a common broadcast limit).
LINE_WIDTH = 42
VTT_STYLE = "STYLE\n::cue(.low) {\n  color: #ff5555;\n}\n"


def format_timestamp(seconds: float, decimal: str = ",") -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT, ``decimal="."``)."""
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def timed_segments(transcript: UtteranceTranscript) -> list[SegmentTranscript]:
    """The segments of the chosen hypothesis that hold words: one subtitle cue (or plotted span) each."""
    if transcript.segments is None:
        raise ValueError(
            f"transcript {transcript.id!r} has no segments (schema version 1); re-run `pyro-blora transcribe` "
            "to get timed segments"
        )
    return [segment for segment in transcript.segments if segment.words]


def _cue_lines(segment: SegmentTranscript, low_confidence: float, style: bool) -> list[str]:
    """The segment's words, low-confidence ones marked, wrapped at LINE_WIDTH visible characters."""
    lines: list[tuple[str, int]] = [("", 0)]
    for separator, word in spaced_words(segment.words):
        visible = f"[{word.word}]" if word.confidence < low_confidence else word.word
        written = f"<c.low>{visible}</c>" if style and word.confidence < low_confidence else visible
        text, width = lines[-1]
        if width and width + len(separator) + len(visible) > LINE_WIDTH:
            lines.append((written, len(visible)))
        else:
            lines[-1] = (text + (separator if width else "") + written, width + (len(separator) if width else 0) + len(visible))
    return [text for text, _ in lines]


def srt_text(transcript: UtteranceTranscript, low_confidence: float = 0.5) -> str:
    """SubRip subtitles: numbered cues, low-confidence words in [brackets]."""
    cues = []
    for number, segment in enumerate(timed_segments(transcript), start=1):
        timing = f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}"
        cues.append("\n".join([str(number), timing, *_cue_lines(segment, low_confidence, style=False)]))
    return "\n\n".join(cues) + "\n" if cues else ""


def vtt_text(transcript: UtteranceTranscript, low_confidence: float = 0.5) -> str:
    """WebVTT subtitles: low-confidence words in [brackets] inside a styled ``<c.low>`` span."""
    blocks = ["WEBVTT", VTT_STYLE.rstrip("\n")]
    for segment in timed_segments(transcript):
        timing = f"{format_timestamp(segment.start, '.')} --> {format_timestamp(segment.end, '.')}"
        blocks.append("\n".join([timing, *_cue_lines(segment, low_confidence, style=True)]))
    return "\n\n".join(blocks) + "\n"


def output_paths(target: Path, transcripts: Sequence[UtteranceTranscript], suffix: str) -> list[Path]:
    """``target`` itself when it ends in ``suffix`` (one transcript), else one file per transcript inside it."""
    if target.suffix.lower() == suffix:
        if len(transcripts) != 1:
            raise ValueError(
                f"{target} names one {suffix} file but there are {len(transcripts)} transcripts; "
                f"give a folder instead and each audio file gets its own {suffix} file in it"
            )
        return [target]
    paths, used = [], set()
    for transcript in transcripts:
        stem = Path(transcript.id).stem or "transcript"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        paths.append(target / f"{name}{suffix}")
    return paths


def write_subtitles(
    transcripts: Sequence[UtteranceTranscript],
    target: str | os.PathLike,
    kind: str,
    low_confidence: float = 0.5,
) -> list[Path]:
    """Write SRT (``kind="srt"``) or WebVTT (``"vtt"``) files: to ``target`` when it ends in the suffix and
    there is one transcript, else into the folder ``target``, one file per audio file."""
    render = {"srt": srt_text, "vtt": vtt_text}.get(kind)
    if render is None:
        raise ValueError(f"subtitle kind must be 'srt' or 'vtt', got {kind!r}")
    paths = output_paths(Path(target), transcripts, f".{kind}")
    for transcript, path in zip(transcripts, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(transcript, low_confidence), encoding="utf-8")
    return paths
