"""A tiny random Whisper and a small memorisation task, so core tests run in seconds."""

from __future__ import annotations

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

VOCAB = 64
SOT, EOT, PAD = 1, 2, 0


def tiny_config(**overrides) -> WhisperConfig:
    values = dict(
        vocab_size=VOCAB,
        num_mel_bins=80,
        encoder_layers=2,
        decoder_layers=2,
        d_model=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
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
    """``n`` utterances with fixed random features and a random token sequence each."""

    def __init__(self, n: int = 8, length: int = 5, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, 80, 3000, generator=generator)
        self.labels = [
            torch.cat([torch.randint(3, VOCAB, (length - (i % 2),), generator=generator), torch.tensor([EOT])])
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_features": self.features[i], "labels": self.labels[i]}


def collate(examples: list[dict]) -> dict:
    labels = torch.nn.utils.rnn.pad_sequence([e["labels"] for e in examples], batch_first=True, padding_value=-100)
    return {"input_features": torch.stack([e["input_features"] for e in examples]), "labels": labels}
