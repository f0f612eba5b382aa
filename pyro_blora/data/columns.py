"""The canonical schema every source is brought to, and the user's column mapping onto it.

Canonical columns: `id` (str), `audio` (undecoded `{"path", "bytes"}`), `text` (str), `language`
(str, a Whisper language code) and, when present, `speaker` (str). Other columns are kept.
"""

from __future__ import annotations

from typing import Mapping

import datasets

__all__ = [
    "CANONICAL_COLUMNS",
    "COLUMN_FLAGS",
    "REQUIRED_COLUMNS",
    "MissingColumnError",
    "check_column_mapping",
    "canonicalize",
]

CANONICAL_COLUMNS = ("id", "audio", "text", "language", "speaker")
REQUIRED_COLUMNS = ("audio", "text")

# The command-line flags that set `columns=` (pyro-blora train / evaluate), named in the fixes.
COLUMN_FLAGS = {"audio": "--audio-column", "text": "--text-column", "language": "--language-column"}

# Names other corpora give the required columns; used only to suggest a `columns=` fix.
_COMMON_ALIASES = {
    "audio": ("path", "file", "file_name", "filename", "audio_path", "audio_filepath", "wav", "filepath"),
    "text": ("sentence", "transcription", "transcript", "normalized_text", "raw_text", "label", "utterance"),
}


class MissingColumnError(KeyError):
    """A required column is absent; the message names it and the `columns=` fix."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def check_column_mapping(
    available: list[str], columns: Mapping[str, str] | None, origin: str
) -> dict[str, str]:
    """Validate `columns` (canonical name -> source name) and return the renames to apply."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(
            f"columns= maps unknown canonical names {unknown}; keys must be among {list(CANONICAL_COLUMNS)} "
            "and values the names in your data, e.g. columns={'audio': 'path', 'text': 'sentence'}"
        )
    for canonical, source in columns.items():
        if source not in available:
            flag = f" ({COLUMN_FLAGS[canonical]})" if canonical in COLUMN_FLAGS else ""
            raise MissingColumnError(
                f"{origin}: columns= maps {canonical!r} to {source!r}{flag}, but there is no column {source!r} "
                f"(found: {', '.join(available)})"
            )
        if canonical in available and canonical != source and canonical not in columns.values():
            raise ValueError(
                f"{origin}: columns= maps {source!r} onto {canonical!r}, but a column {canonical!r} exists "
                f"already; remove or rename it first (e.g. dataset.remove_columns({canonical!r}))"
            )
    renames = {source: canonical for canonical, source in columns.items() if source != canonical}
    mapped = {renames.get(name, name) for name in available}
    for required in REQUIRED_COLUMNS:
        if required not in mapped:
            raise MissingColumnError(_missing_column_message(required, available, origin))
    return renames


def canonicalize(
    dataset: datasets.Dataset,
    columns: Mapping[str, str] | None,
    default_language: str,
    origin: str,
    id_prefix: str,
) -> datasets.Dataset:
    """Rename, type and fill the canonical columns without touching (or copying) the audio data."""
    renames = check_column_mapping(list(dataset.column_names), columns, origin)
    if renames:
        dataset = dataset.rename_columns(renames)
    dataset = _undecoded_audio(dataset, origin)
    texts = ["" if text is None else str(text) for text in dataset["text"]]
    dataset = _replace_column(dataset, "text", texts)
    if "language" in dataset.column_names:
        languages = [str(lang).strip() if lang not in (None, "") else default_language for lang in dataset["language"]]
    else:
        languages = [default_language] * len(dataset)
    dataset = _replace_column(dataset, "language", languages)
    if "speaker" in dataset.column_names:
        speakers = ["" if speaker is None else str(speaker) for speaker in dataset["speaker"]]
        dataset = _replace_column(dataset, "speaker", speakers)
    if "id" in dataset.column_names:
        ids = [str(row_id) for row_id in dataset["id"]]
    else:
        ids = [f"{id_prefix}{index}" for index in range(len(dataset))]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{origin}: the id column has duplicates; ids must be unique (or drop the column)")
    return _replace_column(dataset, "id", ids)


def _undecoded_audio(dataset: datasets.Dataset, origin: str) -> datasets.Dataset:
    feature = dataset.features["audio"]
    if isinstance(feature, datasets.Audio) and not feature.decode:
        return dataset
    is_path_or_bytes = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary")
    if not (isinstance(feature, datasets.Audio) or is_path_or_bytes):
        raise TypeError(
            f"{origin}: the audio column has type {feature}; it must hold file paths, file bytes or a "
            "datasets.Audio feature. Map the right column with columns={'audio': '<your column>'}"
        )
    return dataset.cast_column("audio", datasets.Audio(decode=False))


def _replace_column(dataset: datasets.Dataset, name: str, values: list[str]) -> datasets.Dataset:
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values, feature=datasets.Value("string"))


def _missing_column_message(required: str, available: list[str], origin: str) -> str:
    candidates = [name for name in _COMMON_ALIASES[required] if name in available]
    suggestion = candidates[0] if candidates else "<your column>"
    return (
        f"{origin} has no {required!r} column (found: {', '.join(available) or 'none'}). "
        f"Map yours with {COLUMN_FLAGS[required]} {suggestion} on the command line, "
        f"or columns={{{required!r}: {suggestion!r}}} in Python"
    )
