"""Speech engines and the testbed builder end to end (tiny sizes)."""

import io
import json

import datasets
import numpy as np
import pytest
import soundfile as sf

from pyro_blora.testbed import EspeakVoice, PiperEngine, TestbedConfig, build_from_text, build_testbed, espeak_engine
from pyro_blora.testbed.audio import TARGET_SAMPLING_RATE, add_noise, resample, rms_dbfs

TINY = TestbedConfig.small(
    codeswitch_sizes=(2, 1, 1), english_sizes=(1, 1, 2), backward_languages=("es",), backward_size=1,
    english_noise_fraction=0.5,
)


def _load(folder):
    """A saved DatasetDict with audio as raw bytes (no torchcodec needed)."""
    loaded = datasets.load_from_disk(str(folder))
    return {split: ds.cast_column("audio", datasets.Audio(decode=False)) for split, ds in loaded.items()}


def _check_speech(audio: np.ndarray, rate: int, text: str, snr_db: float | None = None) -> None:
    assert rate == TARGET_SAMPLING_RATE and audio.ndim == 1
    seconds = audio.size / rate
    n_words = max(1, len(text.split()))
    assert 0.15 * n_words < seconds < 1.5 * n_words + 2.0, (text, seconds)
    assert rms_dbfs(audio) > -35.0, text
    if snr_db is not None and snr_db < 15:
        return
    # Speech has pauses and loud parts, unlike a constant tone or noise.
    frames = audio[: audio.size // 320 * 320].reshape(-1, 320)
    energy = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)
    assert energy.max() - np.percentile(energy, 10) > 20.0, text


@pytest.mark.parametrize(
    "voice, text",
    [
        ("cmn", "我们明天下午在办公室开会。"),
        ("ar", "أنا عندي اجتماع بكرة الصبح في الشغل."),
        ("es", "Voy a terminar el proyecto mañana por la tarde."),
        ("en-us", "the final presentation"),
        ("de", "Ich muss den Bericht morgen prüfen."),
    ],
)
def test_espeak_speaks_each_language_at_16k(voice, text):
    engine = espeak_engine()
    audio = engine.synthesize(text, EspeakVoice(voice, "f2", 170, 50), seed=1)
    _check_speech(resample(audio, engine.sampling_rate), TARGET_SAMPLING_RATE, text)


def test_espeak_audio_depends_only_on_text_voice_and_seed():
    engine = espeak_engine()
    voice = EspeakVoice("es", "m1", 160, 45)
    first = engine.synthesize("Voy a la reunión mañana.", voice, seed=4)
    engine.synthesize("Otra frase distinta en medio.", EspeakVoice("fr", "f3", 190, 60), seed=9)
    assert np.array_equal(first, engine.synthesize("Voy a la reunión mañana.", voice, seed=4))
    slower = engine.synthesize("Voy a la reunión mañana.", EspeakVoice("es", "m1", 120, 45), seed=4)
    assert slower.size > first.size * 1.15
    with pytest.raises(ValueError, match="no voice"):
        engine.synthesize("hola", EspeakVoice("no-such-voice"), seed=0)


def test_piper_speaks_english_and_is_reproducible_per_seed():
    text = "The old bridge near the station was painted yesterday."
    first = PiperEngine(seed=3)
    audio = first.synthesize(text, length_scale=1.0)
    _check_speech(resample(audio, first.sampling_rate), TARGET_SAMPLING_RATE, text)
    assert np.array_equal(audio, PiperEngine(seed=3).synthesize(text, length_scale=1.0))
    slow = first.synthesize(text, length_scale=1.3)
    assert slow.size > audio.size * 1.15


def test_noise_is_added_at_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = (0.3 * np.sin(np.linspace(0, 2000, 32000))).astype(np.float32)
    noisy = add_noise(clean, 10.0, rng)
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 0.1


@pytest.mark.slow
def test_build_is_deterministic_loadable_and_held_out(tmp_path):
    paths = build_testbed(tmp_path / "a", TINY, seed=7)
    again = build_testbed(tmp_path / "b", TINY, seed=7)
    assert set(paths) == {"zh-en", "es-en", "ar-en", "en", "backward-es"}
    for domain, folder in paths.items():
        first, second = _load(folder), _load(again[domain])
        assert set(first) == set(second)
        for split in first:
            assert first[split]["text"] == second[split]["text"]
            assert [a["bytes"] for a in first[split]["audio"]] == [a["bytes"] for a in second[split]["audio"]]
        if "train" in first:
            assert set(first["train"]["template_id"]).isdisjoint(first["test"]["template_id"])
        for split, ds in first.items():
            for row in ds:
                audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
                _check_speech(audio, rate, row["text"], row["noise_snr_db"])
                assert row["domain"] == domain and row["id"].startswith(f"{domain}-{split}-")
                if domain in ("zh-en", "es-en", "ar-en"):
                    assert row["languages"] == f"{row['language']}+en" and row["n_switches"] >= 1
                    assert 0 < row["embedded_fraction"] < 1 and "|" in row["voice"] or row["voice"].startswith("en-us")
                else:
                    assert row["n_switches"] == 0 and row["languages"] == row["language"]
    english = _load(paths["en"])["test"]
    assert set(english["voice"]) == {"piper:en_US-joe-medium"} and all(p is None for p in english["pitch"])
    assert _load(paths["backward-es"])["test"][0]["language"] == "es"
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["statistics"]["zh-en"]["train"]["switches_per_utterance"] > 0
    assert {"espeak", "piper"} <= set(manifest["synthesis_speed"])
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| zh-en | train |" in card and "Limits" in card
    other = build_testbed(tmp_path / "c", TINY, seed=8)
    assert _load(other["zh-en"])["train"]["text"] != _load(paths["zh-en"])["train"]["text"]
    with pytest.raises(FileExistsError, match="overwrite"):
        build_testbed(tmp_path / "a", TINY, seed=7)


def test_user_text_with_markup(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text(
        "# Spanish-English, switches marked\n"
        "Voy a la [en: meeting] mañana.\n"
        "Mi jefe dice que el [en: deadline] es el lunes.\n"
        "\n"
        "[en: So] le dije que no.\n"
        "Ya mandé el [en: email] a mi hermana.\n",
        encoding="utf-8",
    )
    config = TestbedConfig.small(codeswitch_sizes=(2, 1, 1))
    folder = build_from_text(lines, tmp_path / "out", "es-en", config, seed=0)
    splits = _load(folder)
    rows = [row for ds in splits.values() for row in ds]
    texts = sorted(row["text"] for row in rows)
    assert texts == sorted([
        "Voy a la meeting mañana.", "Mi jefe dice que el deadline es el lunes.", "So le dije que no.",
        "Ya mandé el email a mi hermana.",
    ])
    assert all("[" not in t for t in texts) and all(row["n_switches"] >= 1 for row in rows)
    assert sum(len(ds) for ds in splits.values()) == 4 and set(splits) == {"train", "dev", "test"}
    with pytest.raises(ValueError, match="markup"):
        bad = tmp_path / "bad.txt"
        bad.write_text("Voy a la [fr: réunion] mañana\n", encoding="utf-8")
        build_from_text(bad, tmp_path / "bad", "es-en", config)


def test_built_testbed_becomes_training_batches(tmp_path, processor):
    from pyro_blora.data import load_speech_dataset, make_dataloader, prepare_dataset

    paths = build_testbed(tmp_path / "tb", TINY, seed=3)
    rows = load_speech_dataset(paths["zh-en"], split="train")
    prepared, report = prepare_dataset(rows, processor, cache_dir=tmp_path / "cache")
    assert report.kept == len(rows) == 2
    batch = next(iter(make_dataloader(prepared, processor, batch_size=2, shuffle=False)))
    assert batch["input_features"].shape == (2, 80, 3000)
    zh = processor.tokenizer.convert_tokens_to_ids("<|zh|>")
    assert (batch["labels"][:, 0] == zh).all()  # the matrix language, after the dropped start token
    for row, labels in zip(rows, batch["labels"]):
        text = processor.tokenizer.decode([t for t in labels.tolist() if t != -100], skip_special_tokens=True)
        assert text.strip() == row["text"]


def _loading_snippet(text: str) -> str:
    """The python block that follows a '## Loading' heading or the testbed README section's marker."""
    start = text.index("```python\nimport datasets, io, soundfile")
    return text[start + len("```python\n"): text.index("```", start + 3)]


def test_documented_loading_reads_the_audio_without_torchcodec(tmp_path):
    """The card's and the README's two lines (cast to undecoded audio, then soundfile) read what the
    testbed stores, with plain `datasets`, whether or not torchcodec loads."""
    from pathlib import Path

    from pyro_blora.testbed.audio import wav_bytes
    from pyro_blora.testbed.manifest import _CARD_HEAD, DATASET_COLUMNS, save_domain

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32)
    row = {name: None for name in DATASET_COLUMNS} | {
        "id": "zh-en-test-0", "audio": {"bytes": wav_bytes(tone), "path": "zh-en-test-0.wav"}, "text": "你好 world",
        "language": "zh", "languages": "zh+en", "domain": "zh-en", "voice": "cmn+f2|en+f2", "rate": 1.0,
        "n_switches": 1, "embedded_fraction": 0.3, "template_id": "t0", "duration_s": 0.5,
    }
    save_domain(tmp_path / "zh-en", {"test": [row]})
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippets = {_loading_snippet(_CARD_HEAD), _loading_snippet(readme)}
    assert len(snippets) == 1  # the card and the README show the same lines
    scope: dict = {}
    exec(snippets.pop().replace("<this folder>", str(tmp_path)), scope)
    assert scope["rate"] == 16_000
    np.testing.assert_allclose(scope["audio"], tone, atol=1 / 32768)
