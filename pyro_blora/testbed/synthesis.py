"""Turning sentences into 16 kHz WAV rows, one chunk of sentences at a time.

Each chunk has its own seed, derived from (build seed, domain, split, chunk), and its own Piper session
(onnxruntime seeds Piper's noise generator when a session is created); eSpeak audio is a pure function
of text, voice and seed. So the audio of a chunk does not depend on what was synthesised before it.

Code-switched sentences are spoken segment by segment, each with the eSpeak voice of its language and
the same voice variant, rate and pitch; segments are trimmed and joined with short random gaps. (eSpeak's
own language switching inside one voice works for Chinese and Arabic with Latin words, but not where both
languages use the Latin script, so the testbed switches voices explicitly for every pair.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pyro_blora.testbed.audio import TARGET_SAMPLING_RATE, add_noise, resample, silence, trim_silence, wav_bytes
from pyro_blora.testbed.grammar import GeneratedSentence
from pyro_blora.testbed.languages import LanguagePair
from pyro_blora.testbed.tts import EspeakVoice, PiperEngine, espeak_engine

__all__ = ["Voicing", "SynthesisJob", "run_job", "job_seed"]

_ESPEAK_DEFAULT_WPM = 175.0


@dataclass(frozen=True)
class Voicing:
    """How sentences are spoken: engine and the ranges that speaker, rate, pitch and noise are drawn from."""

    engine: str  # "piper" or "espeak"
    piper_length_scales: tuple[float, ...]
    espeak_variants: tuple[str, ...]
    espeak_rate_wpm: tuple[int, int]
    espeak_pitch: tuple[int, int]
    segment_gap_s: tuple[float, float]
    noise_fraction: float
    noise_snr_db: tuple[float, ...]


@dataclass(frozen=True)
class SynthesisJob:
    domain: str
    split: str
    chunk: int
    seed: int
    pair: LanguagePair
    voicing: Voicing
    sentences: tuple[GeneratedSentence, ...]
    first_index: int


def job_seed(seed: int, *parts: object) -> int:
    """A stable 32-bit seed from the build seed and names (no Python hash randomisation)."""
    keys = [int(seed)] + [zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def _pad(audio: np.ndarray, rate: int) -> np.ndarray:
    return np.concatenate([silence(0.15, rate), audio, silence(0.2, rate)])


def _speak_espeak(sentence: GeneratedSentence, job: SynthesisJob, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    engine = espeak_engine()
    v = job.voicing
    variant = v.espeak_variants[int(rng.integers(len(v.espeak_variants)))] if v.espeak_variants else None
    rate = int(rng.integers(v.espeak_rate_wpm[0], v.espeak_rate_wpm[1] + 1))
    pitch = int(rng.integers(v.espeak_pitch[0], v.espeak_pitch[1] + 1))
    pieces: list[np.ndarray] = []
    voices: list[str] = []
    for segment in sentence.segments:
        voice = EspeakVoice(job.pair.voice_of(segment.language), variant, rate, pitch)
        audio = trim_silence(engine.synthesize(segment.text, voice, seed=int(rng.integers(2**31))), engine.sampling_rate)
        if pieces:
            pieces.append(silence(rng.uniform(*v.segment_gap_s), engine.sampling_rate))
        pieces.append(audio)
        if voice.name not in voices:
            voices.append(voice.name)
    audio = _pad(np.concatenate(pieces), engine.sampling_rate)
    meta = {"voice": "|".join(voices), "rate": rate / _ESPEAK_DEFAULT_WPM, "pitch": float(pitch)}
    return resample(audio, engine.sampling_rate), meta


def run_job(job: SynthesisJob, progress: Callable[[int], object] | None = None) -> list[dict]:
    """Rows of the testbed schema for one chunk; `progress(1)` is called after each utterance."""
    rng = np.random.default_rng(job.seed)
    piper = PiperEngine(seed=job.seed) if job.voicing.engine == "piper" else None
    rows = []
    for offset, sentence in enumerate(job.sentences):
        if piper is not None:
            scales = job.voicing.piper_length_scales
            length_scale = scales[int(rng.integers(len(scales)))]
            audio = resample(trim_silence(piper.synthesize(sentence.text, length_scale), piper.sampling_rate), piper.sampling_rate)
            audio = _pad(audio, TARGET_SAMPLING_RATE)
            meta = {"voice": piper.name, "rate": 1.0 / length_scale, "pitch": None}
        else:
            audio, meta = _speak_espeak(sentence, job, rng)
        snr = None
        if job.voicing.noise_fraction > 0 and rng.random() < job.voicing.noise_fraction:
            snr = float(job.voicing.noise_snr_db[int(rng.integers(len(job.voicing.noise_snr_db)))])
            audio = add_noise(audio, snr, rng)
        rows.append({
            "id": f"{job.domain}-{job.split}-{job.first_index + offset:05d}",
            "audio": {"bytes": wav_bytes(audio, TARGET_SAMPLING_RATE), "path": None},
            "text": sentence.text,
            "language": job.pair.matrix,
            "languages": job.pair.languages,
            "domain": job.domain,
            **meta,
            "noise_snr_db": snr,
            "n_switches": sentence.stats.n_switches,
            "embedded_fraction": sentence.stats.embedded_fraction,
            "template_id": sentence.template_id,
            "duration_s": audio.size / TARGET_SAMPLING_RATE,
            "embedded_runs": list(sentence.stats.embedded_runs),
            "n_tokens": sentence.stats.n_tokens,
        })
        if progress is not None:
            progress(1)
    return rows
