"""A prepared split ready for a training loop: the dataset of features and labels, and its collator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pyro_blora.data.collate import PreparedSpeechDataset, SpeechCollator
from pyro_blora.data.labels import decoder_start_token_id
from pyro_blora.data.prepare import prepare_dataset
from pyro_blora.data.sources import load_speech_dataset

__all__ = ["TrainingData", "load_training_data"]


@dataclass
class TrainingData:
    """A prepared training split and how to batch it."""

    dataset: PreparedSpeechDataset
    collate: SpeechCollator
    source: str
    split: str
    # The source's own column names (load_speech_dataset's columns=), kept so the run can read its data again.
    columns: Mapping[str, str] | None = None

    def __len__(self) -> int:
        return len(self.dataset)


def load_training_data(source: str | Path, processor, split: str = "train", cache_dir: str | Path | None = None,
                       limit: int | None = None, columns: Mapping[str, str] | None = None) -> TrainingData:
    """A split of any source :func:`~pyro_blora.data.load_speech_dataset` reads (e.g. a testbed domain folder);
    ``columns`` maps the canonical column names to the source's own."""
    rows = load_speech_dataset(source, split=split, columns=columns)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    prepared, _ = prepare_dataset(rows, processor, cache_dir=cache_dir)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    return TrainingData(PreparedSpeechDataset(prepared), collate, str(source), split, dict(columns) if columns else None)
