"""Manifests (CSV, TSV, JSON Lines) and audiofolders, read without `datasets`' builders.

`datasets`' audiofolder builder encodes every row with torchcodec, so it fails without it; its
CSV builder reports a non-UTF-8 file as a pandas traceback. Reading the (small, text-only)
manifest here gives clear messages and resolves relative audio paths against the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

import datasets

from pyro_blora.data.columns import check_column_mapping

__all__ = [
    "MANIFEST_SUFFIXES",
    "AUDIOFOLDER_METADATA",
    "ManifestError",
    "read_manifest",
    "read_audiofolder",
]

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
AUDIOFOLDER_METADATA = tuple(f"metadata{suffix}" for suffix in MANIFEST_SUFFIXES)


class ManifestError(ValueError):
    """A manifest cannot be read: wrong encoding, malformed lines, or no rows."""


def read_manifest(
    path: str | Path, columns: Mapping[str, str] | None = None, audio_fallback: str | None = None
) -> datasets.Dataset:
    """Rows of a manifest as a Dataset, columns renamed by `columns`, audio paths made absolute.

    Ids default to the audio path as written in the manifest, so reports name the files.
    `audio_fallback` names the audio column when neither `columns` nor an `audio` column does.
    """
    path = Path(path).expanduser().resolve()
    rows = _parse_rows(path, _decode_utf8(path))
    if not rows:
        raise ManifestError(f"manifest {str(path)!r} has no rows; add at least one line with audio and text")
    available = list(dict.fromkeys(key for row in rows for key in row))
    columns = dict(columns or {})
    if "audio" not in columns and "audio" not in available and audio_fallback in available:
        columns["audio"] = audio_fallback
    renames = check_column_mapping(available, columns, f"manifest {str(path)!r}")
    table: dict[str, list[Any]] = {renames.get(name, name): [row.get(name) for row in rows] for name in available}
    written = ["" if value is None else str(value).strip() for value in table["audio"]]
    table["audio"] = [_resolve(path.parent, value) for value in written]
    if "id" not in table and len(set(written)) == len(written):
        table["id"] = written
    return _dataset_from_columns(table, path)


def read_audiofolder(root: str | Path, columns: Mapping[str, str] | None = None) -> datasets.DatasetDict:
    """An audiofolder: a metadata file at the root (one split, "train") or in each split's folder.

    As in `datasets`' audiofolder, the metadata's `file_name` column names the audio file.
    """
    root = Path(root).expanduser().resolve()
    split_dirs = {"train": root} if _metadata_file(root) else {
        child.name: child for child in sorted(root.iterdir()) if child.is_dir() and _metadata_file(child)
    }
    if not split_dirs:
        raise ManifestError(
            f"audiofolder {str(root)!r} has no metadata file; add one of {', '.join(AUDIOFOLDER_METADATA)} "
            "(at the root, or in each split's folder such as train/ and test/) with columns file_name and text"
        )
    return datasets.DatasetDict(
        {
            split: read_manifest(_metadata_file(folder), columns, audio_fallback="file_name")
            for split, folder in split_dirs.items()
        }
    )


def _decode_utf8(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {str(path)!r} is not UTF-8: byte 0x{raw[err.start]:02x} on line {line} cannot be decoded. "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 old.csv > new.csv` (use the file's real encoding)"
        ) from err


def _parse_rows(path: Path, text: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows = []
        for row in reader:
            if None in row:
                raise ManifestError(
                    f"manifest {str(path)!r} line {reader.line_num} has more fields than the header; "
                    "quote fields that contain the delimiter"
                )
            rows.append(row)
        return rows
    if suffix in (".jsonl", ".json"):
        return _parse_json_lines(path, text)
    raise ManifestError(f"manifest {str(path)!r}: unsupported suffix {suffix!r}; use one of {MANIFEST_SUFFIXES}")


def _parse_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _parse_json_array(path, text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(
                f"manifest {str(path)!r} line {number} is not valid JSON ({err.msg}); "
                "write one JSON object per line (JSON Lines)"
            ) from err
        if not isinstance(row, dict):
            raise ManifestError(f"manifest {str(path)!r} line {number} is not a JSON object; write one object per line")
        rows.append(row)
    return rows


def _parse_json_array(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"manifest {str(path)!r} is not valid JSON ({err.msg} on line {err.lineno})") from err
    if not all(isinstance(row, dict) for row in rows):
        raise ManifestError(f"manifest {str(path)!r} must be a list of JSON objects, one per utterance")
    return rows


def _dataset_from_columns(table: dict[str, list[Any]], path: Path) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_dict(table)
    except (TypeError, ValueError):
        # Mixed types in an extra column (e.g. numbers and strings): keep it, as text.
        as_text = {name: [None if value is None else str(value) for value in values] for name, values in table.items()}
        return datasets.Dataset.from_dict(as_text)


def _resolve(folder: Path, written: str) -> str:
    if not written or "://" in written:
        return written
    audio = Path(written).expanduser()
    return str(audio if audio.is_absolute() else folder / audio)


def _metadata_file(folder: Path) -> Path | None:
    return next((folder / name for name in AUDIOFOLDER_METADATA if (folder / name).is_file()), None)

