"""Monte Carlo transcription: vectorised = sequential, word confidences, the JSON lines schema, the CLI."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace

import numpy as np
import pyro
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from pyro_blora import BLoRAConfig, build_guide, monte_carlo_transcribe, save_posterior, wrap_whisper
from pyro_blora.predict.monte_carlo import minimum_bayes_risk
from pyro_blora.predict.transcribe import TranscribeOptions, transcribe
from pyro_blora.predict.transcripts import (
    JSONL_KEYS,
    SCHEMA_VERSION,
    SegmentTranscript,
    UtteranceTranscript,
    WordConfidence,
    read_jsonl,
    render_table,
    word_confidences,
    write_jsonl,
)
from tests.tiny import EOT, FRAMES, MELS, tiny_config, tiny_whisper

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class WordTokenizer:
    """Token k >= 3 decodes to the word "w<k>"; 0-2 are special."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"w{int(t)}" for t in row if int(t) > 2) for row in rows]


def noisy_posterior(seed: int = 0, stddev: float = 0.3):
    model = wrap_whisper(tiny_whisper(seed), BLoRAConfig(rank=4))
    pyro.set_rng_seed(seed)
    guide = build_guide(model)
    guide.set_stddevs(stddev)  # wide enough that samples decode differently
    return model, guide


def test_vectorized_and_sequential_give_the_same_hypotheses():
    model, guide = noisy_posterior()
    features = torch.randn(3, MELS, FRAMES, generator=torch.Generator().manual_seed(1))
    runs = {}
    for vectorized in (True, False):
        pyro.set_rng_seed(5)
        runs[vectorized] = monte_carlo_transcribe(
            model, guide, features, WordTokenizer(), num_samples=4, choose="mbr", vectorized=vectorized,
            generate_kwargs={"max_new_tokens": 6},
        )
    for fast, slow in zip(runs[True], runs[False]):
        assert fast.hypotheses == slow.hypotheses
        assert fast.chosen == slow.chosen
        assert fast.disagreement == pytest.approx(slow.disagreement)
        assert fast.mean_token_entropy == pytest.approx(slow.mean_token_entropy, rel=1e-4)
    # Not vacuous: the samples disagree somewhere.
    assert any(len(set(r.hypotheses)) > 1 for r in runs[True])


def test_a_batch_split_by_generation_falls_back_to_one_sample_at_a_time(monkeypatch):
    """When generation runs the encoder on part of a stacked batch, the draws are decoded one by one."""
    import pyro_blora.predict.monte_carlo as monte_carlo
    from pyro_blora.model.adapters import StackedBatchError

    model, guide = noisy_posterior()
    features = torch.randn(2, MELS, FRAMES, generator=torch.Generator().manual_seed(1))
    pyro.set_rng_seed(5)
    expected = monte_carlo_transcribe(model, guide, features, WordTokenizer(), num_samples=3, choose="mbr",
                                      vectorized=False, generate_kwargs={"max_new_tokens": 6})
    decode = monte_carlo._decode

    def splitting(model_, input_features, *args, **kwargs):
        if input_features.shape[0] > features.shape[0]:  # the stacked batch: split as generation may do
            decode(model_, input_features[:1], *args, **kwargs)
        return decode(model_, input_features, *args, **kwargs)
    monkeypatch.setattr(monte_carlo, "_decode", splitting)
    pyro.set_rng_seed(5)
    fallen_back = monte_carlo_transcribe(model, guide, features, WordTokenizer(), num_samples=3, choose="mbr",
                                         vectorized=True, generate_kwargs={"max_new_tokens": 6})
    assert [r.hypotheses for r in fallen_back] == [r.hypotheses for r in expected]
    with pytest.raises(StackedBatchError), model.hold_adapters(monte_carlo.sample_posterior(guide, 3)):
        decode(model, features[:1], {"max_new_tokens": 2})


def test_mean_chooser_reports_the_mean_models_log_prob():
    model, guide = noisy_posterior()
    features = torch.randn(2, MELS, FRAMES)
    results = monte_carlo_transcribe(model, guide, features, WordTokenizer(), num_samples=2, generate_kwargs={"max_new_tokens": 4})
    assert all(r.mean_log_prob is not None and r.mean_log_prob <= 0 for r in results)
    assert all(r.chosen == r.mean_hypothesis for r in results)


def test_minimum_bayes_risk_picks_the_consensus():
    index, disagreement = minimum_bayes_risk(["a b c", "a b d", "a b c", "x y z"])
    assert index in (0, 2)
    assert disagreement > 0
    assert minimum_bayes_risk(["same words"] * 3) == (0, 0.0)


def test_minimum_bayes_risk_does_not_choose_a_repetition_loop():
    """Two of eight draws loop; as references they would make every other draw look bad."""
    loop = "tengo que arreglar el trabajo antes de " + "mis " * 40
    draws = [loop, "tengo que arreglar el trabajo antes de mis jueces del trabajo", loop,
             "tengo que arreglar el trabajo antes de las dos", "tengo que arreglar el tamajo antes de mis jueces",
             "tengo que arreglar el trabajo antes de mis boys", "tengo que arreglar el trabajo antes del trabajo",
             "tengo que arreglar el trabajo antes de mis jueces del tamajo"]
    index, _ = minimum_bayes_risk(draws)
    assert draws[index] != loop


def test_word_confidence_is_the_fraction_of_agreeing_samples():
    words = word_confidences("The cat sat.", ["the cat sat", "the hat sat", "cat sat"])
    assert [w.word for w in words] == ["The", "cat", "sat."]
    assert [w.confidence for w in words] == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_cjk_words_are_characters():
    words = word_confidences("我喜欢 python", ["我喜欢 python", "我爱 Python"], language="zh")
    assert [w.word for w in words] == ["我", "喜", "欢", "python"]
    assert [w.confidence for w in words] == pytest.approx([1.0, 0.5, 0.5, 1.0])


@settings(max_examples=40, deadline=None)
@given(
    chosen=st.lists(st.sampled_from(["a", "b", "c", "喜", "Hi,"]), max_size=6).map(" ".join),
    samples=st.lists(st.lists(st.sampled_from(["a", "b", "c", "喜", "hi", ""]), max_size=6).map(" ".join), min_size=1, max_size=5),
)
def test_confidences_lie_in_unit_interval(chosen, samples):
    for word in word_confidences(chosen, samples):
        assert 0.0 <= word.confidence <= 1.0


def example_transcript(**overrides) -> UtteranceTranscript:
    values = dict(
        id="u1", source="a.wav", language="en", text="hello world", chooser="mean", num_samples=2,
        samples=["hello world", "hello word"], uncertainty=0.25, mean_token_entropy=0.4, mean_log_prob=-0.2,
        words=[WordConfidence("hello", 1.0), WordConfidence("world", 0.5)], reference="hello world", duration=1.5,
    )
    values["segments"] = [SegmentTranscript(0.0, 1.5, "hello world", values["words"])]
    values.update(overrides)
    return UtteranceTranscript(**values)


def test_json_schema_is_pinned_and_round_trips(tmp_path):
    assert SCHEMA_VERSION == 2
    assert JSONL_KEYS == (
        "schema_version", "id", "source", "language", "text", "chooser", "num_samples", "samples",
        "uncertainty", "mean_token_entropy", "mean_log_prob", "words", "duration", "segments", "reference",
    )
    record = example_transcript().to_json_dict()
    assert tuple(record) == JSONL_KEYS
    assert record["words"] == [{"word": "hello", "confidence": 1.0}, {"word": "world", "confidence": 0.5}]
    path = tmp_path / "out.jsonl"
    with path.open("w") as handle:
        assert write_jsonl([example_transcript(), example_transcript(id="u2")], handle) == 2
    assert [t.id for t in read_jsonl(path)] == ["u1", "u2"]
    assert read_jsonl(path)[0] == example_transcript()
    assert record["segments"][0] == {"start": 0.0, "end": 1.5, "text": "hello world", "words": record["words"]}


def test_version_1_lines_are_still_read(tmp_path):
    """Version 2 only added keys: a version 1 line reads with duration and segments null."""
    record = example_transcript().to_json_dict()
    old = {key: value for key, value in record.items() if key not in ("duration", "segments")} | {"schema_version": 1}
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(old) + "\n")
    [transcript] = read_jsonl(path)
    assert transcript == example_transcript(duration=None, segments=None)


def test_other_schema_versions_are_refused():
    record = example_transcript().to_json_dict() | {"schema_version": 99}
    with pytest.raises(ValueError, match="schema_version 99"):
        UtteranceTranscript.from_json_dict(record)


def test_table_brackets_low_confidence_words():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_table([example_transcript()], low_confidence=0.6))
    output = console.file.getvalue()
    assert "hello [world]" in output
    assert "[hello]" not in output


def test_table_prints_brackets_in_its_title_and_in_file_names_as_written():
    """Rich reads "[...]" as markup and drops it unless escaped."""
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_table([example_transcript(id="take[bold].wav"), example_transcript(id="[u2]")]))
    output = console.file.getvalue()
    assert "words below 0.50 confidence in [brackets])" in " ".join(output.split())  # the title wraps
    assert "take[bold].wav" in output and "[u2]" in output


def test_options_are_validated():
    with pytest.raises(ValueError, match="num_samples"):
        TranscribeOptions(num_samples=0)
    with pytest.raises(ValueError, match="choose"):
        TranscribeOptions(choose="best")


# ------------------------------------------------------------ end to end, real tokenizer
@pytest.fixture(scope="module")
def real_sized_tiny(tmp_path_factory):
    """A tiny random model with tiny.en's vocabulary and input size, saved with tiny.en's processor."""
    from transformers import WhisperForConditionalGeneration

    from pyro_blora import load_processor

    try:
        processor = load_processor("tiny.en")
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(processor.tokenizer), num_mel_bins=80, max_source_positions=1500,
                         decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50257)
    whisper = WhisperForConditionalGeneration(config).eval()
    whisper.generation_config.update(decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256,
                                     forced_decoder_ids=None, suppress_tokens=[], begin_suppress_tokens=[], max_length=8)
    folder = tmp_path_factory.mktemp("tiny-real-vocab")
    whisper.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    model = wrap_whisper(whisper, BLoRAConfig(rank=2))
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    guide.set_stddevs(0.2)
    save_posterior(folder / "posterior", model, guide, {"base_model": str(folder / "model")})
    audio = folder / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav", "c.flac"):
        soundfile.write(audio / name, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    (folder / "manifest.csv").write_text(
        "audio,text,language\n" + "".join(f"{audio / n},hello there,en\n" for n in ("a.wav", "b.wav"))
    )
    return model, guide, processor, folder


@pytest.mark.slow
def test_transcribe_folder_and_dataset(real_sized_tiny):
    model, guide, processor, folder = real_sized_tiny
    options = TranscribeOptions(num_samples=3, batch_size=3, choose="mbr", generate_kwargs={"max_new_tokens": 4})
    from_folder = transcribe(model, guide, processor, folder / "audio", options, progress=False)
    assert [t.id for t in from_folder] == ["a.wav", "b.wav", "c.flac"]
    from_dataset = transcribe(model, guide, processor, folder / "manifest.csv", options, progress=False)
    assert [t.reference for t in from_dataset] == ["hello there", "hello there"]
    for t in from_folder + from_dataset:
        assert len(t.samples) == 3 and t.chooser == "mbr" and t.mean_log_prob is None
        assert all(0.0 <= w.confidence <= 1.0 for w in t.words)
        assert t.uncertainty >= 0
    # Same seed, same draws: the dataset's files decode as the folder's did.
    assert [t.samples for t in from_dataset] == [t.samples for t in from_folder[:2]]


def test_posterior_temperature_scales_the_draws(real_sized_tiny):
    """Draws shrunk onto the mean decode the mean's hypothesis; the posterior's own draws do not."""
    model, guide, processor, folder = real_sized_tiny
    options = TranscribeOptions(num_samples=4, batch_size=3, generate_kwargs={"max_new_tokens": 4})
    wide = transcribe(model, guide, processor, folder / "audio", options, progress=False)
    assert any(sample != t.text for t in wide for sample in t.samples)
    narrow = transcribe(model, guide, processor, folder / "audio", replace(options, posterior_temperature=1e-6),
                        progress=False)
    assert all(sample == t.text for t in narrow for sample in t.samples) and all(t.uncertainty == 0 for t in narrow)
    with pytest.raises(ValueError, match="posterior_temperature"):
        TranscribeOptions(posterior_temperature=0)


def test_missing_input_is_named(real_sized_tiny):
    model, guide, processor, folder = real_sized_tiny
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        transcribe(model, guide, processor, [folder / "nothere.wav"], progress=False)


def test_cli_writes_jsonl_and_table(real_sized_tiny, tmp_path):
    from pyro_blora.cli import app

    _, _, _, folder = real_sized_tiny
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app,
        ["transcribe", str(folder / "audio" / "a.wav"), str(folder / "audio" / "b.wav"),
         "--posterior", str(folder / "posterior"), "--samples", "2", "--choose", "mbr", "--jsonl", str(out)],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [tuple(line) for line in lines] == [JSONL_KEYS] * 2
    assert all(line["chooser"] == "mbr" and line["num_samples"] == 2 for line in lines)
    assert "Monte Carlo transcripts" in result.output


def test_cli_transcribes_every_readable_file_and_lists_the_others_at_the_end(real_sized_tiny, tmp_path):
    from pyro_blora.cli import app

    _, _, _, folder = real_sized_tiny
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC but not really audio")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app,
        ["transcribe", str(folder / "audio" / "a.wav"), str(broken), str(folder / "audio" / "b.wav"),
         "--posterior", str(folder / "posterior"), "--samples", "2", "--jsonl", str(out), "--srt", str(tmp_path / "srt")],
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a.wav", "b.wav"]
    assert sorted(p.name for p in (tmp_path / "srt").iterdir()) == ["a.srt", "b.srt"]
    ending = result.output[result.output.index("Monte Carlo transcripts"):]  # reported after the table
    assert "1 of 3 inputs could not be read" in ending
    [reason] = [line for line in ending.splitlines() if "broken.flac" in line]
    assert "cannot decode audio" in reason and "Re-encode it" in reason


def test_cli_reads_a_manifests_own_column_names(real_sized_tiny, tmp_path):
    from pyro_blora.cli import app

    _, _, _, folder = real_sized_tiny
    manifest = tmp_path / "mine.csv"
    manifest.write_text(f"path,sentence\n{folder / 'audio' / 'a.wav'},my own words\n")
    out = tmp_path / "out.jsonl"
    command = ["transcribe", str(manifest), "--posterior", str(folder / "posterior"), "--samples", "2", "--jsonl", str(out)]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "--audio-column path" in " ".join(refused.output.split())
    result = CliRunner().invoke(app, [*command, "--audio-column", "path", "--text-column", "sentence"])
    assert result.exit_code == 0, result.output
    [line] = [json.loads(text) for text in out.read_text().splitlines()]
    assert line["reference"] == "my own words" and line["source"] == str(folder / "audio" / "a.wav")
    files = CliRunner().invoke(app, ["transcribe", str(folder / "audio" / "b.wav"), *command[2:], "--text-column", "x"])
    assert files.exit_code == 2 and "describe a dataset input" in files.output  # not silently ignored


def test_an_unreadable_file_stops_the_python_api_unless_skipped_is_given(real_sized_tiny, tmp_path):
    from pyro_blora.data import AudioDecodeError
    from pyro_blora.predict.transcribe import UnreadableInput

    model, guide, processor, folder = real_sized_tiny
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    inputs = [folder / "audio" / "a.wav", broken]
    options = TranscribeOptions(num_samples=2, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        transcribe(model, guide, processor, inputs, options, progress=False)
    skipped: list[UnreadableInput] = []
    [transcript] = transcribe(model, guide, processor, inputs, options, progress=False, skipped=skipped)
    assert transcript.id == "a.wav"
    assert [entry.source for entry in skipped] == [str(broken)] and "cannot decode" in skipped[0].reason


def test_indexed_suppression_decodes_as_transformers_own_suppression(monkeypatch):
    """Monte Carlo decoding suppresses tokens by indexing, alone; transformers' processors give the same."""
    from transformers import LogitsProcessorList
    from transformers.generation import logits_process

    from pyro_blora.predict.monte_carlo import _decode

    calls = []
    original = logits_process.SuppressTokensLogitsProcessor.__call__

    def counted(self, input_ids, scores):
        calls.append(1)
        return original(self, input_ids, scores)

    monkeypatch.setattr(logits_process.SuppressTokensLogitsProcessor, "__call__", counted)

    model, guide = noisy_posterior(stddev=0.05)
    config = model.whisper.generation_config
    config.suppress_tokens = list(range(3, 40))
    config.begin_suppress_tokens = [EOT, 41, 42]
    features = torch.randn(3, MELS, FRAMES, generator=torch.Generator().manual_seed(2))
    with model.hold_adapters(guide.means()):
        fast = _decode(model, features, {"max_new_tokens": 6})
        assert not calls  # transformers' own suppression did not run as well
        assert config.suppress_tokens == list(range(3, 40))  # the model's config is left as it was
        slow = _decode(model, features, {"max_new_tokens": 6, "logits_processor": LogitsProcessorList()})
        free = _decode(model, features, {"max_new_tokens": 6, "logits_processor": LogitsProcessorList(),
                                          "suppress_tokens": None, "begin_suppress_tokens": None})
    assert calls  # the comparison ran transformers' suppression
    assert torch.equal(fast.sequences, slow.sequences)
    torch.testing.assert_close(fast.mean_log_prob, slow.mean_log_prob)
    generated = fast.sequences[:, 1:]
    assert not ((generated >= 3) & (generated < 40)).any()
    assert not torch.isin(generated[:, 0], torch.tensor([EOT, 41, 42])).any()
    # Not vacuous: without suppression the model picks some of those tokens.
    assert not torch.equal(free.sequences, fast.sequences)


def test_greedy_decoding_does_not_repeat_the_length_notice(caplog):
    """Our config sets max_new_tokens on purpose; transformers' notice about it is dropped for our calls only."""
    import logging

    from pyro_blora.predict.decoding import generate, greedy_generate_kwargs

    model, _ = noisy_posterior(stddev=0.05)
    features = torch.randn(2, MELS, FRAMES, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING):
        generate(model.whisper, features, **greedy_generate_kwargs(model.whisper, None, 5))
        assert not [r for r in caplog.records if "max_length" in r.getMessage()]
    logger = logging.getLogger("transformers.generation.utils")
    assert not logger.filters  # the filter is gone after the call
    logger.warning("Both `max_new_tokens` and `max_length` are set")
    assert [r for r in caplog.records if "max_length" in r.getMessage()]
