"""Subtitles (SRT, WebVTT) and a confidence-over-time plot from Monte Carlo transcripts.

One cue per segment of the chosen hypothesis. Words whose confidence (the share of posterior
draws that agree with them) is below the threshold are marked: in [brackets] in SRT, which has
no portable styling, and in WebVTT with brackets inside a ``<c.low>`` class span that the file's
STYLE block colours, so players that ignore styles still show the brackets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pyro_blora.predict.transcribe import SegmentTranscript, UtteranceTranscript, spaced_words

__all__ = ["LINE_WIDTH", "format_timestamp", "output_paths", "plot_confidence", "srt_text", "vtt_text", "write_subtitles"]

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


def _segments(transcript: UtteranceTranscript) -> list[SegmentTranscript]:
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
    for number, segment in enumerate(_segments(transcript), start=1):
        timing = f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}"
        cues.append("\n".join([str(number), timing, *_cue_lines(segment, low_confidence, style=False)]))
    return "\n\n".join(cues) + "\n" if cues else ""


def vtt_text(transcript: UtteranceTranscript, low_confidence: float = 0.5) -> str:
    """WebVTT subtitles: low-confidence words in [brackets] inside a styled ``<c.low>`` span."""
    blocks = ["WEBVTT", VTT_STYLE.rstrip("\n")]
    for segment in _segments(transcript):
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


def plot_confidence(transcript: UtteranceTranscript, path: str | os.PathLike, low_confidence: float = 0.5) -> Path:
    """One PNG: each word's confidence at its place in time (words spread evenly over their segment),
    segments shaded, the threshold dashed. Needs matplotlib (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments = _segments(transcript)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, (transcript.duration or 30.0) / 10)), 3.2))
    times, values = [], []
    for index, segment in enumerate(segments):
        ax.axvspan(segment.start, segment.end, color="0.92" if index % 2 else "0.85", zorder=0)
        step = (segment.end - segment.start) / len(segment.words)
        for k, word in enumerate(segment.words):
            times.append(segment.start + (k + 0.5) * step)
            values.append(word.confidence)
    colours = ["#d62728" if v < low_confidence else "#1f77b4" for v in values]
    ax.scatter(times, values, s=8, c=colours, zorder=2)
    ax.axhline(low_confidence, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlim(0, transcript.duration or (segments[-1].end if segments else 1.0))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("word confidence")
    ax.set_title(f"{transcript.id}: {sum(v < low_confidence for v in values)} of {len(values)} words below {low_confidence:.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
