"""Data pipeline: sources, audio decoding, bad-input reporting, labels, collation and caching.

Audio is synthesised into tmp_path with numpy + soundfile; processors are the bundled ones.
"""

import io
import json

import datasets
import numpy as np
import pytest
import soundfile
import torch

import pyro_blora.data.prepare as prepare_module
from pyro_blora.data import (
    AudioDecodeError,
    DataReport,
    ManifestError,
    MissingColumnError,
    NoUsableRowsError,
    PrepareOptions,
    SpeechCollator,
    load_audio,
    load_speech_dataset,
    make_dataloader,
    prepare_dataset,
)
from pyro_blora.features import N_FRAMES, log_mel_features
from pyro_blora.base_models.loading import HubUnavailableError

RATE = 16_000


def tone(seconds, rate=RATE, frequency=440.0, channels=1, seed=0):
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.3 * np.sin(2 * np.pi * frequency * t) + 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    wave = wave.astype(np.float32)
    return wave if channels == 1 else np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def write_audio(path, seconds=0.5, rate=RATE, seed=0, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone(seconds, rate, seed=seed, **kwargs), rate)
    return path


def write_csv(path, header, rows, encoding="utf-8"):
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def good_manifest(tmp_path, n=3, languages=("en", "zh", "es")):
    for i in range(n):
        write_audio(tmp_path / "clips" / f"c{i}.wav", seconds=0.4 + 0.1 * i, seed=i)
    rows = [(f"clips/c{i}.wav", f"sentence number {i}", languages[i % len(languages)]) for i in range(n)]
    return write_csv(tmp_path / "manifest.csv", ["audio", "text", "language"], rows)


# ---------------------------------------------------------------- audio decoding


def test_stereo_is_down_mixed_to_the_channel_mean(tmp_path):
    path = write_audio(tmp_path / "stereo.wav", channels=2)
    stereo, _ = soundfile.read(path, dtype="float32")
    audio = load_audio(path)
    assert audio.ndim == 1 and audio.dtype == np.float32
    np.testing.assert_allclose(audio, stereo.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_other_rates_are_resampled_to_16k_keeping_duration_and_pitch(tmp_path, rate):
    path = write_audio(tmp_path / f"r{rate}.wav", seconds=1.5, rate=rate, frequency=440.0)
    audio = load_audio(path)
    assert abs(audio.shape[0] - 1.5 * RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * RATE / audio.shape[0]
    assert abs(peak_hz - 440.0) < 2.0


def test_bytes_and_datasets_values_decode_like_paths(tmp_path):
    path = write_audio(tmp_path / "a.flac", seconds=0.3)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    np.testing.assert_array_equal(load_audio({"path": "ignored.flac", "bytes": path.read_bytes()}), from_path)
    np.testing.assert_array_equal(load_audio({"path": str(path), "bytes": None}), from_path)


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_truncated_audio_is_refused(tmp_path, suffix):
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(1.0), RATE, format=suffix.upper())
    with pytest.raises(AudioDecodeError, match="truncated|cannot decode"):
        load_audio(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_corrupt_and_missing_audio_raise_clear_errors(tmp_path):
    with pytest.raises(AudioDecodeError, match="Re-encode it as WAV"):
        load_audio(b"not audio at all" * 50)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio(tmp_path / "nowhere.wav")


def test_zero_length_audio_decodes_to_an_empty_array(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), RATE)
    assert load_audio(path).shape == (0,)


# ---------------------------------------------------------------- sources


def test_csv_manifest_resolves_relative_paths_and_fills_schema(tmp_path):
    for i in range(2):
        write_audio(tmp_path / "clips" / f"c{i}.wav")
    rows = [("clips/c0.wav", "hello", "x"), ("clips/c1.wav", "world", "y")]
    manifest = write_csv(tmp_path / "m.csv", ["audio", "text", "notes"], rows)
    ds = load_speech_dataset(manifest, default_language="es")
    assert isinstance(ds, datasets.Dataset)
    assert ds["id"] == ["clips/c0.wav", "clips/c1.wav"]
    assert ds["language"] == ["es", "es"] and ds["text"] == ["hello", "world"] and ds["notes"] == ["x", "y"]
    assert ds.features["audio"] == datasets.Audio(decode=False)
    assert ds[0]["audio"]["path"] == str(tmp_path / "clips" / "c0.wav")


def test_jsonl_manifest_with_column_mapping_keeps_language_speaker_and_extras(tmp_path):
    write_audio(tmp_path / "a.wav")
    rows = [{"path": "a.wav", "sentence": "hola world", "lang": "es", "speaker": 7, "utt": "u1", "score": 0.5}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    ds = load_speech_dataset(manifest, columns={"audio": "path", "text": "sentence", "language": "lang", "id": "utt"})
    assert ds[0]["id"] == "u1" and ds[0]["text"] == "hola world" and ds[0]["language"] == "es"
    assert ds[0]["speaker"] == "7" and ds[0]["score"] == 0.5
    assert load_audio(ds[0]["audio"]).shape[0] == 8000


def test_manifest_missing_column_is_refused_with_the_columns_fix(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["audio", "sentence"], [("a.wav", "hi")])
    with pytest.raises(MissingColumnError, match=r"no 'text' column.*columns=\{'text': 'sentence'\}"):
        load_speech_dataset(manifest)
    with pytest.raises(MissingColumnError, match="no column 'transcript'"):
        load_speech_dataset(manifest, columns={"text": "transcript"})


def test_non_utf8_manifest_is_refused_with_the_fix(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["audio", "text"], [("a.wav", "canción")], encoding="latin-1")
    with pytest.raises(ManifestError, match=r"not UTF-8.*line 2.*iconv"):
        load_speech_dataset(manifest)


def test_audiofolder_with_split_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_audio(tmp_path / "corpus" / split / f"{split}{i}.wav", seed=i)
        rows = [(f"{split}{i}.wav", f"text {i}") for i in range(n)]
        write_csv(tmp_path / "corpus" / split / "metadata.csv", ["file_name", "transcription"], rows)
    loaded = load_speech_dataset(tmp_path / "corpus", columns={"text": "transcription"})
    assert isinstance(loaded, datasets.DatasetDict)
    assert {name: len(split) for name, split in loaded.items()} == {"test": 2, "train": 3}
    test = load_speech_dataset(tmp_path / "corpus", split="test", columns={"text": "transcription"})
    assert test["id"] == ["test0.wav", "test1.wav"] and test["text"] == ["text 0", "text 1"]
    with pytest.raises(KeyError, match="no split 'dev'"):
        load_speech_dataset(tmp_path / "corpus", split="dev", columns={"text": "transcription"})


def test_an_audiofolders_metadata_file_is_read_as_its_audiofolder_and_other_csvs_name_the_flag(tmp_path):
    for i in range(2):
        write_audio(tmp_path / "mine" / f"c{i}.wav", seed=i)
    metadata = write_csv(tmp_path / "mine" / "metadata.csv", ["file_name", "text"], [("c0.wav", "one"), ("c1.wav", "two")])
    rows = load_speech_dataset(metadata)
    assert rows["id"] == ["c0.wav", "c1.wav"] and rows["text"] == ["one", "two"]
    assert rows[1]["audio"]["path"] == str(tmp_path / "mine" / "c1.wav")
    assert rows[:] == load_speech_dataset(tmp_path / "mine", split="train")[:]  # as the folder reads it
    other = write_csv(tmp_path / "mine" / "list.csv", ["file_name", "text"], [("c0.wav", "one")])
    with pytest.raises(MissingColumnError, match=r"no 'audio' column \(found: file_name, text\)\. Map yours with "
                                                 r"--audio-column file_name on the command line, or columns="):
        load_speech_dataset(other)


def test_audiofolder_without_metadata_is_refused(tmp_path):
    write_audio(tmp_path / "corpus" / "a.wav")
    with pytest.raises(ManifestError, match="no metadata file"):
        load_speech_dataset(tmp_path / "corpus")


def test_hub_id_fails_fast_offline_naming_local_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="manifest.*audiofolder.*save_to_disk"):
        load_speech_dataset("someone/some-speech-corpus", split="train")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_speech_dataset(tmp_path / "nothing.csv")


def test_in_memory_dataset_with_bytes_audio(tmp_path):
    wav = write_audio(tmp_path / "a.wav").read_bytes()
    raw = datasets.Dataset.from_dict({"audio": [wav], "sentence": ["hello"]})
    ds = load_speech_dataset(raw, columns={"text": "sentence"})
    assert ds["id"] == ["row-0"] and ds[0]["audio"]["bytes"] == wav
    decoding = raw.cast_column("audio", datasets.Audio())  # as Hub datasets come; decoding needs torchcodec
    assert load_speech_dataset(decoding, columns={"text": "sentence"})[0]["audio"]["bytes"] == wav


# ---------------------------------------------------------------- checks and report


def test_every_kind_of_bad_row_is_dropped_and_reported(tmp_path, processor):
    clips = tmp_path / "clips"
    write_audio(clips / "good.wav")
    write_audio(clips / "good8k.flac", rate=8000)
    (clips / "corrupt.wav").write_bytes(b"RIFF" + b"\x00" * 100)
    full = io.BytesIO()
    soundfile.write(full, tone(1.0), RATE, format="WAV")
    (clips / "truncated.wav").write_bytes(full.getvalue()[:20000])
    soundfile.write(clips / "zero.wav", np.zeros(0, dtype=np.float32), RATE)
    write_audio(clips / "long.wav", seconds=31.0, rate=8000)
    rows = [
        ("good", "clips/good.wav", "a fine sentence", "en"),
        ("good8k", "clips/good8k.flac", "otra frase", "es"),
        ("corrupt", "clips/corrupt.wav", "text", "en"),
        ("truncated", "clips/truncated.wav", "text", "en"),
        ("zero", "clips/zero.wav", "text", "en"),
        ("long", "clips/long.wav", "text", "en"),
        ("missing", "clips/missing.wav", "text", "en"),
        ("empty", "clips/good.wav", "", "en"),
        ("blank", "clips/good.wav", "   ", "en"),
        ("wordy", "clips/good.wav", " ".join(["word"] * 450), "en"),
        ("klingon", "clips/good.wav", "text", "tlh"),
    ]
    manifest = write_csv(tmp_path / "m.csv", ["id", "audio", "text", "language"], rows)
    prepared, report = prepare_dataset(load_speech_dataset(manifest), processor)
    assert prepared["id"] == ["good", "good8k"]
    assert (report.total, report.kept, report.dropped) == (11, 2, 9)
    assert report.counts == {
        "unreadable_audio": 2,
        "empty_audio": 1,
        "audio_too_long": 1,
        "missing_file": 1,
        "empty_text": 2,
        "text_too_long": 1,
        "unknown_language": 1,
    }
    assert report.ids["unreadable_audio"] == ["corrupt", "truncated"] and report.ids["empty_text"] == ["empty", "blank"]
    text = str(report)
    assert "2 of 11 rows usable, 9 dropped" in text and "split long recordings" in text and "re-encode" in text
    assert set(report.hints) == set(report.counts)


def test_a_dataset_with_no_usable_rows_is_refused(tmp_path, processor):
    manifest = write_csv(tmp_path / "m.csv", ["audio", "text"], [("gone.wav", "hi"), ("good.wav", " ")])
    write_audio(tmp_path / "good.wav")
    with pytest.raises(NoUsableRowsError, match=r"(?s)0 of 2 rows usable.*missing_file: 1.*empty_text: 1"):
        prepare_dataset(load_speech_dataset(manifest), processor)


def test_report_round_trips_through_json(tmp_path):
    report = DataReport(total=3, kept=2)
    report.add("missing_file", "x")
    report.to_json(tmp_path / "r.json")
    assert DataReport.from_json(tmp_path / "r.json") == report
    assert json.loads((tmp_path / "r.json").read_text())["hints"]["missing_file"].startswith("the audio path")
    with pytest.raises(KeyError, match="unknown filter reason"):
        report.add("bad_vibes", "y")


def test_options_are_validated_with_the_fix():
    with pytest.raises(ValueError, match="at most|Whisper's input is 30 s"):
        PrepareOptions(max_audio_seconds=40)
    with pytest.raises(ValueError, match="448 positions"):
        PrepareOptions(max_label_tokens=1000)


# ---------------------------------------------------------------- labels, features, collation


def test_labels_follow_whisper_prompt_per_language_with_leading_space(tmp_path, processor):
    tok = processor.tokenizer
    prepared, _ = prepare_dataset(load_speech_dataset(good_manifest(tmp_path)), processor)
    for labels, language, text in zip(prepared["labels"], prepared["language"], prepared["text"]):
        prompt = tok.convert_ids_to_tokens(labels[:4])
        assert prompt == ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
        assert tok.convert_ids_to_tokens(labels[4]).startswith("Ġ")
        assert labels[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
        assert tok.decode(labels[4:-1]) == " " + text
    assert [tok.convert_ids_to_tokens(labels[1]) for labels in prepared["labels"]] == ["<|en|>", "<|zh|>", "<|es|>"]


def test_language_override_and_english_only_prompt(tmp_path, processor, english_processor):
    ds = load_speech_dataset(good_manifest(tmp_path))
    forced, _ = prepare_dataset(ds, processor, language="Spanish")
    assert {processor.tokenizer.convert_ids_to_tokens(labels[1]) for labels in forced["labels"]} == {"<|es|>"}
    english, _ = prepare_dataset(ds, english_processor)
    tok = english_processor.tokenizer
    prompt = tok.convert_ids_to_tokens(english["labels"][0][:3])
    assert prompt == ["<|startoftranscript|>", "<|notimestamps|>", "Ġsentence"]


def test_collated_features_equal_log_mel_features_and_labels_are_padded(tmp_path, processor):
    manifest = good_manifest(tmp_path)
    prepared, _ = prepare_dataset(load_speech_dataset(manifest), processor)
    batch = next(iter(make_dataloader(prepared, processor, batch_size=3, shuffle=False)))
    assert batch["input_features"].shape == (3, 80, N_FRAMES) and batch["input_features"].dtype == torch.float32
    for row, row_id in enumerate(batch["ids"]):
        expected = log_mel_features(processor.feature_extractor, load_audio(tmp_path / row_id))[0]
        torch.testing.assert_close(batch["input_features"][row], expected)
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    lengths = [len(labels) - 1 for labels in prepared["labels"]]
    assert batch["labels"].shape == (3, max(lengths)) and (batch["labels"][:, 0] != start).all()
    for row, length in enumerate(lengths):
        assert batch["labels"][row, :length].tolist() == prepared["labels"][row][1:]
        assert (batch["labels"][row, length:] == -100).all()


def test_collator_keeps_decoder_start_unless_every_row_has_it():
    collate = SpeechCollator(decoder_start_token_id=9)
    items = [
        {"index": 4, "id": "a", "input_features": np.ones((5, 2), np.float32), "labels": [9, 1, 2]},
        {"index": 2, "id": "b", "input_features": np.ones((3, 2), np.float32), "labels": [7, 1]},
    ]
    batch = collate(items)
    assert batch["labels"].tolist() == [[9, 1, 2], [7, 1, -100]]
    assert batch["index"].tolist() == [4, 2] and batch["ids"] == ["a", "b"]
    assert batch["input_features"].shape == (2, 2, N_FRAMES)
    assert batch["input_features"][1, :, :3].eq(1).all() and batch["input_features"][1, :, 3:].eq(0).all()
    items[1]["labels"] = [9, 1]
    assert collate(items)["labels"].tolist() == [[1, 2], [1, -100]]


def test_dataloader_shuffles_reproducibly_and_index_points_at_the_row(tmp_path, processor):
    prepared, _ = prepare_dataset(load_speech_dataset(good_manifest(tmp_path, n=5)), processor)

    def order(seed):
        batches = make_dataloader(prepared, processor, batch_size=2, seed=seed)
        return [i for batch in batches for i in batch["index"].tolist()]

    assert order(3) == order(3) and sorted(order(3)) == list(range(5))
    for batch in make_dataloader(prepared, processor, batch_size=2, seed=1):
        assert batch["ids"] == [prepared[i]["id"] for i in batch["index"].tolist()]


# ---------------------------------------------------------------- caching and saved datasets


def test_second_prepare_is_a_cache_hit_and_changes_miss(tmp_path, processor, monkeypatch):
    ds = load_speech_dataset(good_manifest(tmp_path))
    first, report = prepare_dataset(ds, processor, cache_dir=tmp_path / "cache")
    [cached] = list((tmp_path / "cache").glob("prepared-*"))
    assert DataReport.from_json(cached / "report.json") == report

    def no_recompute(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(prepare_module, "log_mel_features", no_recompute)
    reloaded = load_speech_dataset(tmp_path / "manifest.csv")  # a fresh read, as in a new run
    second, second_report = prepare_dataset(reloaded, processor, cache_dir=tmp_path / "cache")
    assert second_report == report and second["labels"] == first["labels"]
    np.testing.assert_array_equal(
        second.with_format("numpy")["input_features"][0], first.with_format("numpy")["input_features"][0]
    )
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_dataset(reloaded, processor, cache_dir=tmp_path / "cache", language="zh")
    write_audio(tmp_path / "clips" / "c0.wav", seconds=0.9)  # edited audio must not hit the old cache
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_dataset(load_speech_dataset(tmp_path / "manifest.csv"), processor, cache_dir=tmp_path / "cache")


def test_saved_dataset_dict_loads_end_to_end_into_batches(tmp_path, processor):
    paths = [write_audio(tmp_path / f"a{i}.wav", seconds=0.3 + 0.2 * i, seed=i) for i in range(4)]
    train = {"audio": [str(p) for p in paths[:3]], "sentence": ["one", "two", "three"], "lang": ["en", "zh", "es"]}
    test = {"audio": [str(paths[3])], "sentence": ["four"], "lang": ["en"]}
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(train), "test": datasets.Dataset.from_dict(test)})
    raw = raw.cast_column("audio", datasets.Audio(decode=False))
    raw.save_to_disk(str(tmp_path / "saved"))
    loaded = load_speech_dataset(tmp_path / "saved", columns={"text": "sentence", "language": "lang"})
    assert set(loaded) == {"train", "test"}
    prepared, report = prepare_dataset(loaded["train"], processor, cache_dir=tmp_path / "cache")
    assert report.kept == 3
    batches = list(make_dataloader(prepared, processor, batch_size=2, shuffle=False))
    assert [b["input_features"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["ids"] == ["train-0", "train-1"]
    assert processor.tokenizer.convert_ids_to_tokens(int(batches[0]["labels"][1, 0])) == "<|zh|>"


def test_prepare_takes_one_split(tmp_path, processor):
    loaded = datasets.DatasetDict({"train": load_speech_dataset(good_manifest(tmp_path))})
    with pytest.raises(TypeError, match=r"pass e.g. dataset\['train'\]"):
        prepare_dataset(loaded, processor)


def test_two_worker_processes_give_the_same_result(tmp_path, processor):
    # Forked workers once hung in torch's OpenMP pool inherited from the parent.
    ds = load_speech_dataset(good_manifest(tmp_path, n=4))
    single, _ = prepare_dataset(ds, processor)
    parallel, _ = prepare_dataset(ds, processor, num_proc=2)
    assert parallel["labels"] == single["labels"] and parallel["id"] == single["id"]
    np.testing.assert_array_equal(
        parallel.with_format("numpy")["input_features"][3], single.with_format("numpy")["input_features"][3]
    )
