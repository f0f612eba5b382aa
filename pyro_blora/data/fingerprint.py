"""Content fingerprints that name a prepared dataset's cache folder.

`datasets` gives in-memory datasets (e.g. read from a manifest) a random fingerprint, so its own
map cache misses on every run. Hashing what the features depend on (rows, audio files, processor,
options) makes repeated runs hit the cache, and any change to them miss it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import datasets
from tqdm.auto import tqdm

__all__ = ["dataset_fingerprint", "processor_fingerprint", "combine_fingerprints"]

_ROWS_PER_READ = 512


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """Hash of every row; audio files count by path, size and modification time, bytes by content."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(dataset.column_names)).encode())
    batches = dataset.iter(batch_size=_ROWS_PER_READ)
    total = -(-len(dataset) // _ROWS_PER_READ)
    for batch in tqdm(batches, total=total, desc="Fingerprinting dataset", unit="batch", disable=total < 20):
        for name in sorted(batch):
            values = batch[name]
            if name == "audio":
                for value in values:
                    _update_with_audio(digest, value)
            else:
                digest.update(json.dumps(values, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()


def processor_fingerprint(processor) -> str:
    """Hash of the feature extractor's settings and the tokenizer's full definition."""
    digest = hashlib.sha256()
    digest.update(processor.feature_extractor.to_json_string().encode())
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def combine_fingerprints(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:24]


def _update_with_audio(digest, value: dict) -> None:
    if value.get("bytes"):
        digest.update(hashlib.sha256(value["bytes"]).digest())
        return
    path = value.get("path") or ""
    digest.update(path.encode())
    try:
        stat = os.stat(path)
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    except OSError:
        digest.update(b"missing")
