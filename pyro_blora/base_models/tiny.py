"""A tiny randomly initialised Whisper and a small memorisation task, for tests and demos.

Not a speech model: its weights are random and its vocabulary is 64 made-up tokens. It has Whisper's
architecture, so adapters, the guide, the objective and the training loop run on it in milliseconds
per step, which is what tests, notebooks and objective measurements need.

The encoder takes 2 * max_source_positions frames; a short window (100 frames, 16 mel bins) keeps a
training step at a few milliseconds. Real checkpoints take 3000 frames of 80 or 128 bins.
"""

from __future__ import annotations

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

__all__ = ["EOT", "FRAMES", "MELS", "PAD", "SOT", "VOCAB", "TinyTask", "collate", "tiny_config", "tiny_whisper"]

VOCAB = 64
MELS = 16
FRAMES = 100
SOT, EOT, PAD = 1, 2, 0


def tiny_config(**overrides) -> WhisperConfig:
    """Two encoder and two decoder layers of width 64; ``overrides`` change any WhisperConfig field."""
    values = dict(
        vocab_size=VOCAB,
        num_mel_bins=MELS,
        encoder_layers=2,
        decoder_layers=2,
        d_model=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=FRAMES // 2,
        max_target_positions=32,
        decoder_start_token_id=SOT,
        pad_token_id=PAD,
        eos_token_id=EOT,
        bos_token_id=SOT,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    values.update(overrides)
    return WhisperConfig(**values)


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """The tiny model with weights drawn from torch's generator seeded with ``seed`` (it reseeds the
    global generator, so the same seed gives the same model), generating without forced or suppressed tokens."""
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config()).eval()
    model.generation_config.decoder_start_token_id = SOT
    model.generation_config.eos_token_id = EOT
    model.generation_config.pad_token_id = PAD
    model.generation_config.forced_decoder_ids = None
    model.generation_config.suppress_tokens = []
    model.generation_config.begin_suppress_tokens = []
    return model


class TinyTask(torch.utils.data.Dataset):
    """``n`` utterances of a new "domain": fixed random features, and transcripts drawn from a
    small phrase book (tokens 10-17 in a few fixed orders) that the random base model has no
    reason to predict. Adapting to it lowers the token NLL far below the base model's."""

    PHRASES = ((10, 11, 12, 13), (14, 15, 16, 17), (10, 15, 12, 17))

    def __init__(self, n: int = 8, length: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, MELS, FRAMES, generator=generator)
        self.labels = [
            torch.tensor(list(self.PHRASES[i % len(self.PHRASES)][:length]) + [EOT]) for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_features": self.features[i], "labels": self.labels[i]}


def collate(examples: list[dict]) -> dict:
    """A batch of :class:`TinyTask` items: stacked features, labels padded with -100 (ignored by the loss)."""
    labels = torch.nn.utils.rnn.pad_sequence([e["labels"] for e in examples], batch_first=True, padding_value=-100)
    return {"input_features": torch.stack([e["input_features"] for e in examples]), "labels": labels}
