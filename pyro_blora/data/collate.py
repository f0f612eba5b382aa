"""Batches for training: padded features, -100-padded labels, and each row's dataset position.

The position (`index`) lets a Pyro `plate(..., subsample=index)` scale the likelihood of a
mini-batch to the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pyro_blora.data.labels import decoder_start_token_id
from pyro_blora.features import N_FRAMES

__all__ = ["IGNORE_INDEX", "SpeechCollator", "PreparedSpeechDataset", "make_dataloader"]

IGNORE_INDEX = -100  # label value that cross-entropy skips


class PreparedSpeechDataset(Dataset):
    """A prepared split as a torch Dataset whose items carry their own position."""

    def __init__(self, prepared: datasets.Dataset):
        missing = [name for name in ("id", "input_features", "labels") if name not in prepared.column_names]
        if missing:
            raise ValueError(f"dataset lacks columns {missing}; pass the output of prepare_dataset")
        self.prepared = prepared.with_format("numpy", columns=["input_features", "labels"], output_all_columns=True)

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.prepared[int(index)]
        return {"index": int(index), "id": row["id"], "input_features": row["input_features"], "labels": row["labels"]}


@dataclass(frozen=True)
class SpeechCollator:
    """Pads stored frames (n_content, n_mels) with 0.0 to (n_mels, n_frames) and labels with -100.

    The leading decoder-start token is dropped when every row starts with it: the model puts it
    back when it shifts the labels right to make the decoder inputs.
    """

    decoder_start_token_id: int
    n_frames: int = N_FRAMES

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n_mels = np.asarray(items[0]["input_features"]).shape[-1]
        features = torch.zeros(len(items), n_mels, self.n_frames, dtype=torch.float32)
        for row, item in enumerate(items):
            frames = torch.as_tensor(np.asarray(item["input_features"], dtype=np.float32))
            if frames.shape[0] > self.n_frames:
                raise ValueError(
                    f"item {item.get('id')!r} is {frames.shape[0] / 100:.2f} s long ({frames.shape[0]} frames); the "
                    f"encoder window takes at most {self.n_frames / 100:.2f} s ({self.n_frames} frames). Train with a "
                    "longer encoder_window_seconds, or leave such clips out of the data"
                )
            features[row, :, : frames.shape[0]] = frames.T
        labels = [torch.as_tensor(np.asarray(item["labels"]), dtype=torch.long) for item in items]
        if all(len(row) > 0 and row[0] == self.decoder_start_token_id for row in labels):
            labels = [row[1:] for row in labels]
        padded = torch.full((len(items), max(len(row) for row in labels)), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, : len(ids)] = ids
        return {
            "input_features": features,
            "labels": padded,
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            "ids": [str(item["id"]) for item in items],
        }


def make_dataloader(
    prepared: datasets.Dataset,
    processor,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of a prepared split; `seed` fixes the shuffling order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        PreparedSpeechDataset(prepared),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=SpeechCollator(decoder_start_token_id(processor.tokenizer)),
    )
