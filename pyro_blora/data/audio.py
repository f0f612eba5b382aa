"""Audio decoding without torchcodec: soundfile reads, numpy down-mixes, scipy resamples.

`datasets` 5.x decodes `Audio` columns with torchcodec, whose PyPI wheel does not load beside a
CPU build of torch. The library therefore keeps audio columns undecoded (`{"path", "bytes"}`) and
decodes them here, so it works wherever `soundfile` (which bundles libsndfile) installs.
"""

from __future__ import annotations

import io
import os
import struct
from math import gcd
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import soundfile
from scipy.signal import resample_poly

from pyro_blora.features import SAMPLING_RATE

__all__ = ["AudioSource", "AudioDecodeError", "load_audio", "resample", "to_mono"]

AudioSource = Union[str, os.PathLike, bytes, bytearray, Mapping]

_STREAMING_SIZES = (0, 0xFFFFFFFF)  # placeholders that streaming writers leave in RIFF headers


class AudioDecodeError(ValueError):
    """The audio exists but cannot be decoded: corrupt, truncated or in an unsupported format."""


def load_audio(source: AudioSource) -> np.ndarray:
    """Decode audio to a 16 kHz mono float32 waveform.

    `source` is a file path, the file's bytes, or a `datasets` audio value `{"path", "bytes"}`
    (bytes win when both are given, as in `datasets`). A zero-length file gives an empty array.
    Raises FileNotFoundError for a missing file and AudioDecodeError for audio that cannot be read.
    """
    data, name = _read_bytes(source)
    _refuse_truncated_wav(data, name)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        detail = str(getattr(err, "error_string", err)).rstrip(".")
        raise AudioDecodeError(
            f"cannot decode audio {name}: {detail}. Re-encode it as WAV or FLAC (e.g. with ffmpeg) or remove it."
        ) from err
    return resample(to_mono(samples), rate, SAMPLING_RATE)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array, as Whisper expects one channel."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Polyphase resampling; exact rational ratio, so 44.1 kHz -> 16 kHz keeps the duration."""
    if rate <= 0:
        raise AudioDecodeError(f"audio reports a sampling rate of {rate} Hz; the file header is corrupt")
    if rate == target_rate or samples.size == 0:
        return np.ascontiguousarray(samples, dtype=np.float32)
    common = gcd(int(rate), int(target_rate))
    out = resample_poly(samples, target_rate // common, int(rate) // common)
    return out.astype(np.float32, copy=False)


def _read_bytes(source: AudioSource) -> tuple[bytes, str]:
    if isinstance(source, Mapping):
        if source.get("bytes"):
            return bytes(source["bytes"]), repr(source.get("path") or "<bytes>")
        if source.get("path"):
            return _read_bytes(source["path"])
        raise AudioDecodeError("audio value has neither 'bytes' nor 'path'; the dataset row is empty")
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), "<bytes>"
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist; fix the path or remove the row")
    return path.read_bytes(), repr(str(path))


def _refuse_truncated_wav(data: bytes, name: str) -> None:
    """libsndfile silently reads what is left of a cut-off WAV; compare with the declared size."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack("<I", data[offset + 4 : offset + 8])
        if chunk_id == b"data":
            if size not in _STREAMING_SIZES and offset + 8 + size > len(data):
                raise AudioDecodeError(
                    f"WAV {name} is truncated: its header declares {size} bytes of audio but only "
                    f"{len(data) - offset - 8} are present. Re-export or re-download the file, or remove it."
                )
            return
        offset += 8 + size + (size & 1)
