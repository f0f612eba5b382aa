"""Bad inputs that tests/test_data.py does not already try: languages a model cannot take,
corrupt FLAC, non-finite samples, long 44.1 kHz audio, malformed manifests. Each is refused or
reported with a specific message (see docs/bad-inputs.md for the whole matrix)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from pyro_blora.data import AudioDecodeError, ManifestError, load_audio, load_speech_dataset, prepare_dataset
from pyro_blora.data.labels import EnglishOnlyModelError, UnknownLanguageError, check_language
from tests.test_data import tone, write_audio, write_csv


# ---------------------------------------------------------------- languages
@pytest.mark.parametrize("language, code", [("zh", "zh"), ("Chinese", "zh"), (" Mandarin ", "zh"), ("ES", "es")])
def test_language_names_and_codes_resolve_to_whisper_codes(processor, language, code):
    assert check_language(processor, language) == code
    assert check_language(processor.tokenizer, language) == code


@pytest.mark.parametrize("language", ["tlh", "klingon", ""])
def test_language_unknown_to_the_tokenizer_is_refused(processor, language):
    with pytest.raises(UnknownLanguageError, match=r"has no token in this tokenizer; use a Whisper code such as 'en'"):
        check_language(processor, language)


def test_english_only_model_takes_english_and_refuses_other_languages(english_processor):
    assert check_language(english_processor, "English") == "en"
    with pytest.raises(EnglishOnlyModelError, match=r"'zh' asked of an English-only model.*multilingual checkpoint"):
        check_language(english_processor, "zh")


def test_english_only_model_asked_for_another_language_is_refused_at_start_up(tmp_path, english_processor):
    write_audio(tmp_path / "a.wav")
    dataset = load_speech_dataset(write_csv(tmp_path / "m.csv", ["audio", "text"], [("a.wav", "hello")]))
    with pytest.raises(EnglishOnlyModelError, match="English-only"):
        prepare_dataset(dataset, english_processor, language="Spanish")


def test_non_english_rows_for_an_english_only_model_are_reported(tmp_path, english_processor):
    for name in ("a", "b"):
        write_audio(tmp_path / f"{name}.wav")
    rows = [("a.wav", "hello there", "en"), ("b.wav", "hola", "es")]
    prepared, report = prepare_dataset(
        load_speech_dataset(write_csv(tmp_path / "m.csv", ["audio", "text", "language"], rows)), english_processor
    )
    assert prepared["id"] == ["a.wav"]
    assert report.counts == {"non_english_for_english_only_model": 1} and report.ids["non_english_for_english_only_model"] == ["b.wav"]
    assert "use a multilingual checkpoint" in str(report)


# ---------------------------------------------------------------- audio
@pytest.mark.parametrize("damage", ["frames", "header"])
def test_corrupt_flac_is_refused(tmp_path, damage):
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(1.0), 16_000, format="FLAC")
    data = bytearray(buffer.getvalue())
    start = len(data) // 2 if damage == "frames" else 8  # zeroed audio frames, or a garbled STREAMINFO block
    data[start:start + 32] = bytes(32) if damage == "frames" else b"\xff" * 32
    path = tmp_path / "corrupt.flac"
    path.write_bytes(bytes(data))
    with pytest.raises(AudioDecodeError, match=r"cannot decode audio .*corrupt\.flac.*Re-encode it as WAV or FLAC"):
        load_audio(path)


def test_non_finite_samples_and_long_44k_audio_are_dropped(tmp_path, processor):
    nan_wave = tone(0.5)
    nan_wave[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", nan_wave, 16_000, subtype="FLOAT")
    write_audio(tmp_path / "long44k.wav", seconds=30.5, rate=44_100)
    write_audio(tmp_path / "ok44k.wav", seconds=1.0, rate=44_100, channels=2)
    rows = [("nan.wav", "a"), ("long44k.wav", "b"), ("ok44k.wav", "c")]
    prepared, report = prepare_dataset(load_speech_dataset(write_csv(tmp_path / "m.csv", ["audio", "text"], rows)), processor)
    assert prepared["id"] == ["ok44k.wav"]
    assert report.counts == {"non_finite_audio": 1, "audio_too_long": 1}
    assert "re-export the clip" in str(report) and "split long recordings" in str(report)


# ---------------------------------------------------------------- manifests
@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("empty.csv", "audio,text\n", ManifestError, r"has no rows; add at least one line"),
        ("extra.csv", "audio,text\na.wav,one,two\n", ManifestError, r"line 2 has more fields than the header; quote"),
        ("broken.jsonl", '{"audio": "a.wav", "text": "x"}\n{"audio": \n', ManifestError, r"line 2 is not valid JSON"),
        ("list.jsonl", '["a.wav", "x"]\n', ManifestError, r"line 1 is not a JSON object"),
        ("m.xlsx", "audio,text\n", ValueError, r"is a file but not a manifest; manifests end in \.csv"),
    ],
)
def test_malformed_manifests_are_refused_with_the_line(tmp_path, name, content, error, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        load_speech_dataset(tmp_path / name)
