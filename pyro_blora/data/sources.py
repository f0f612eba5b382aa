"""One entry point for every kind of speech data, all brought to the canonical schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import datasets

from pyro_blora.data.columns import canonicalize
from pyro_blora.data.manifest import AUDIOFOLDER_METADATA, MANIFEST_SUFFIXES, read_audiofolder, read_manifest
from pyro_blora.offline import HubUnavailableError

__all__ = ["load_speech_dataset"]

_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
_LOCAL_ALTERNATIVES = (
    "Use a local source instead: a CSV/TSV/JSONL manifest (columns audio, text, optional language, speaker), "
    "an audiofolder directory with metadata.csv (file_name, text), or a dataset saved with save_to_disk. "
    "To use the Hub, go online and unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE"
)


def load_speech_dataset(
    source: str | Path | datasets.Dataset | datasets.DatasetDict,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    default_language: str = "en",
    hub_config: str | None = None,
    **hub_kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict:
    """Load speech data into the canonical schema: id, audio (undecoded), text, language[, speaker].

    `source` is a manifest file (.csv/.tsv/.jsonl/.json; an audiofolder's metadata file is read as
    that audiofolder reads it, `file_name` naming the audio), an audiofolder directory, a directory
    written by `save_to_disk`, an in-memory Dataset/DatasetDict, or a Hugging Face Hub id
    (`hub_config` and `hub_kwargs` go to `datasets.load_dataset`). `columns` maps canonical names
    to yours, e.g. `{"audio": "path", "text": "sentence"}`. Rows without a language get
    `default_language`. Returns a DatasetDict when the source has named splits and `split` is None.
    """
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        loaded, origin = source, "the dataset"
    else:
        loaded, origin, columns_applied = _load_source(source, split, columns, hub_config, hub_kwargs)
        if columns_applied:
            columns = None
    if isinstance(loaded, datasets.DatasetDict) and split is not None:
        if split not in loaded:
            raise KeyError(f"{origin} has no split {split!r}; available: {list(loaded)}")
        loaded = loaded[split]
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                name: canonicalize(part, columns, default_language, f"{origin} [{name}]", f"{name}-")
                for name, part in loaded.items()
            }
        )
    return canonicalize(loaded, columns, default_language, origin, f"{split or 'row'}-")


def _load_source(source, split, columns, hub_config, hub_kwargs):
    """The raw data, a name for messages, and whether the reader already applied `columns`."""
    path = Path(source).expanduser()
    origin = repr(str(source))
    if path.is_file():
        if not _is_manifest(source):
            raise ValueError(f"{origin} is a file but not a manifest; manifests end in {', '.join(MANIFEST_SUFFIXES)}")
        if path.name in AUDIOFOLDER_METADATA:  # an audiofolder's metadata file: file_name names the audio
            return read_manifest(path, columns, audio_fallback="file_name"), f"audiofolder metadata {origin}", True
        return read_manifest(path, columns), f"manifest {origin}", True
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return datasets.load_from_disk(str(path)), f"saved dataset {origin}", False
        return read_audiofolder(path, columns), f"audiofolder {origin}", True
    if _looks_like_local_path(str(source)):
        raise FileNotFoundError(f"{origin} does not exist; give an existing manifest file or dataset directory")
    return _load_from_hub(str(source), split, hub_config, hub_kwargs), f"Hub dataset {origin}", False


def _load_from_hub(repo_id: str, split, hub_config, hub_kwargs):
    try:
        return datasets.load_dataset(repo_id, hub_config, split=split, **hub_kwargs)
    except (ConnectionError, OSError) as err:  # offline, no network, or no such dataset
        raise HubUnavailableError(
            f"cannot load {repo_id!r} from the Hugging Face Hub ({err}). {_LOCAL_ALTERNATIVES}"
        ) from err


def _is_manifest(source) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in MANIFEST_SUFFIXES


def _looks_like_local_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or Path(text).suffix.lower() in MANIFEST_SUFFIXES
        or text.count("/") > 1
        or "\\" in text
    )
