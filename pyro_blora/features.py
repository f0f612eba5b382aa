"""Log-mel features with the padding convention of openai-whisper and faster-whisper.

transformers' feature extractor pads the *waveform* to 30 s, so the padded frames hold the
log-mel of silence. openai-whisper and faster-whisper compute the log-mel of the clip (followed
by 30 s of zeros, which only matters for the last few frames' windows) and pad the *frames*
with 0.0. The two differ enough to change greedy transcripts of real checkpoints, so the
library uses the original convention everywhere: in training, evaluation and inference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SAMPLING_RATE = 16_000
HOP_LENGTH = 160
N_SAMPLES = 30 * SAMPLING_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH

__all__ = ["SAMPLING_RATE", "N_SAMPLES", "N_FRAMES", "log_mel_features", "long_form_features"]


def _mono(clip) -> np.ndarray:
    clip = np.asarray(clip, dtype=np.float32)
    if clip.ndim != 1:
        raise ValueError(
            f"expected a mono waveform (1-D array), got shape {clip.shape}; down-mix to mono first "
            "(pyro_blora.data.load_audio does this)"
        )
    return clip


def _content_frames(feature_extractor, clip: np.ndarray) -> np.ndarray:
    """Log-mel frames of the clip itself (computed with 30 s of zeros after it, as openai-whisper does)."""
    padded = np.concatenate([clip, np.zeros(N_SAMPLES, dtype=np.float32)])
    mel = feature_extractor(
        padded,
        sampling_rate=SAMPLING_RATE,
        padding="longest",
        truncation=False,
        return_tensors="np",
    ).input_features[0]
    return mel[:, : clip.shape[0] // HOP_LENGTH]


def log_mel_features(feature_extractor, audio: np.ndarray | Sequence[np.ndarray], n_frames: int = N_FRAMES) -> torch.Tensor:
    """Return log-mel features of shape (batch, n_mels, n_frames), zero-padded frame-wise.

    `audio` is one 16 kHz mono float waveform or a list of them, each at most 30 s long (at most
    ``n_frames`` / 100 s for a model whose encoder was cut to a shorter window).
    """
    clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
    rows = []
    for clip in clips:
        clip = _mono(clip)
        if clip.shape[0] > N_SAMPLES:
            raise ValueError(
                f"clip is {clip.shape[0] / SAMPLING_RATE:.1f} s long; one Whisper input takes at most 30 s. "
                "Transcribe it long-form (pyro_blora.predict.transcribe does, window by window), split it into "
                "segments of 30 s or less, or filter it out (pyro_blora.data does)."
            )
        mel = _content_frames(feature_extractor, clip)
        if mel.shape[1] > n_frames:
            raise ValueError(
                f"clip is {mel.shape[1] / 100:.2f} s long ({mel.shape[1]} frames); the model's encoder window takes "
                f"at most {n_frames / 100:.2f} s ({n_frames} frames). Use a model trained with the full window, or "
                "leave such clips out"
            )
        out = np.zeros((mel.shape[0], n_frames), dtype=np.float32)
        out[:, : mel.shape[1]] = mel
        rows.append(out)
    return torch.from_numpy(np.stack(rows))


def long_form_features(feature_extractor, audio: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of clips of any length for Whisper's long-form decoding, and their frame mask.

    Returns features of shape (batch, n_mels, frames) and a (batch, frames) mask of the content
    frames; frames after a clip are 0.0, as in :func:`log_mel_features`, and each 30 s window that
    long-form decoding cuts from them is zero-padded the same way. Nothing is padded beyond the
    longest clip: for a single clip transformers reads the length from the features, not the mask."""
    mels = [_content_frames(feature_extractor, _mono(clip)) for clip in audio]
    if not mels:
        raise ValueError("long_form_features needs at least one clip")
    frames = max(mel.shape[1] for mel in mels)
    features = np.zeros((len(mels), mels[0].shape[0], frames), dtype=np.float32)
    mask = np.zeros((len(mels), frames), dtype=np.int64)
    for row, mel in enumerate(mels):
        features[row, :, : mel.shape[1]] = mel
        mask[row, : mel.shape[1]] = 1
    return torch.from_numpy(features), torch.from_numpy(mask)
