"""Waveform helpers shared by both speech engines: resampling, silence trimming, noise, WAV bytes.

Everything works on float32 mono waveforms in [-1, 1]; the testbed stores 16 kHz int16 WAV.
"""

from __future__ import annotations

import io
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

TARGET_SAMPLING_RATE = 16_000

__all__ = [
    "TARGET_SAMPLING_RATE",
    "resample",
    "trim_silence",
    "silence",
    "add_noise",
    "wav_bytes",
    "rms_dbfs",
]


def resample(audio: np.ndarray, source_rate: int, target_rate: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Polyphase resampling; exact and deterministic (22.05 kHz -> 16 kHz is 320/441)."""
    if source_rate == target_rate:
        return audio.astype(np.float32)
    divisor = gcd(source_rate, target_rate)
    out = resample_poly(audio.astype(np.float64), target_rate // divisor, source_rate // divisor)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def trim_silence(audio: np.ndarray, sampling_rate: int, threshold: float = 0.01, margin_s: float = 0.02) -> np.ndarray:
    """Cut leading and trailing near-silence, keeping a short margin so onsets are not clipped."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio[:0]
    margin = int(margin_s * sampling_rate)
    return audio[max(0, loud[0] - margin) : loud[-1] + margin + 1]


def silence(seconds: float, sampling_rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * sampling_rate)), dtype=np.float32)


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise shaped to a 1/f power spectrum: closer to room and street noise than white noise."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    return noise / (np.std(noise) + 1e-12)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add pink noise so that speech power / noise power equals `snr_db` (powers over the whole clip)."""
    if audio.size == 0:
        return audio
    speech_power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = _pink_noise(audio.size, rng) * np.sqrt(speech_power / (10.0 ** (snr_db / 10.0)))
    mixed = audio + noise
    peak = float(np.max(np.abs(mixed)))
    if peak > 0.99:
        mixed = mixed * (0.99 / peak)
    return mixed.astype(np.float32)


def wav_bytes(audio: np.ndarray, sampling_rate: int = TARGET_SAMPLING_RATE) -> bytes:
    """Mono 16-bit PCM WAV; byte-identical for identical input."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def rms_dbfs(audio: np.ndarray) -> float:
    """Loudness in dB relative to full scale; silence gives -inf."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) if audio.size else 0.0
    return 10.0 * np.log10(power) if power > 0 else float("-inf")
