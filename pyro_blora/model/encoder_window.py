"""A shorter encoder window: a speed option that changes the model.

Whisper's encoder always reads 30 s (3000 mel frames, 1500 positions); short utterances are padded
with silence, so most of the encoder's work is spent on padding. With a window of, say, 10 s the
encoder reads 1000 frames and keeps its first 500 positional embeddings: about a third of the
encoder's cost. The model then sees no padding after 10 s, which it never saw in pre-training,
so this is a different model from the base model (and from a 30 s run) and never the default.
Clips longer than the window are refused. A run records its window (``TrainConfig.
encoder_window_seconds``) and evaluation of the run uses the same window.
"""

from __future__ import annotations

import torch
from transformers import WhisperForConditionalGeneration

from pyro_blora.features import HOP_LENGTH, SAMPLING_RATE

__all__ = ["FULL_WINDOW_SECONDS", "encoder_input_frames", "encoder_window_seconds", "set_encoder_window", "window_frames"]

FULL_WINDOW_SECONDS = 30.0
# Two mel frames per encoder position (the second convolution has stride 2).
FRAMES_PER_POSITION = 2


def window_frames(seconds: float) -> int:
    """Mel frames of a window of ``seconds`` (100 frames per second)."""
    exact = seconds * SAMPLING_RATE / HOP_LENGTH
    frames = round(exact)
    if not 0 < seconds <= FULL_WINDOW_SECONDS or frames % FRAMES_PER_POSITION or abs(exact - frames) > 1e-6:
        raise ValueError(
            f"encoder_window_seconds must lie in (0, 30] and be a multiple of 0.02 s, got {seconds!r}; "
            "30 is Whisper's own window, 10 a common speed option"
        )
    return frames


def encoder_input_frames(whisper: WhisperForConditionalGeneration) -> int:
    """How many mel frames the model's encoder takes (3000 for Whisper as released)."""
    return int(whisper.config.max_source_positions) * FRAMES_PER_POSITION


def encoder_window_seconds(whisper: WhisperForConditionalGeneration) -> float:
    """Seconds of audio the model's encoder reads (30 for Whisper as released)."""
    return encoder_input_frames(whisper) * HOP_LENGTH / SAMPLING_RATE


@torch.no_grad()
def set_encoder_window(whisper: WhisperForConditionalGeneration, seconds: float) -> WhisperForConditionalGeneration:
    """Cut the encoder (in place) to a window of ``seconds``: its first positions are kept.

    Only shortening is possible; the full window (30 s) leaves the model as it is."""
    positions = window_frames(seconds) // FRAMES_PER_POSITION
    current = int(whisper.config.max_source_positions)
    if positions == current:
        return whisper
    if positions > current:
        raise ValueError(f"the encoder already takes {current * FRAMES_PER_POSITION} frames; a window can only shorten it")
    encoder = whisper.model.encoder
    old = encoder.embed_positions
    shorter = torch.nn.Embedding(positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    shorter.weight.copy_(old.weight[:positions])
    shorter.requires_grad_(False)
    encoder.embed_positions = shorter
    encoder.max_source_positions = positions
    whisper.config.max_source_positions = positions
    return whisper
