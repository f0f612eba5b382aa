"""Real Whisper checkpoints offline: processors, conversion, cache, export, hub fallback."""

from __future__ import annotations

import pytest

from pyro_blora.ctranslate2_io import restore_missing_merges
from pyro_blora.weights import load_processor


@pytest.fixture(scope="module")
def base_processor():
    return load_processor("base")


@pytest.fixture(scope="module")
def tiny_en_processor():
    return load_processor("tiny.en")


def test_restore_missing_merges_recovers_dropped_first_merge():
    vocab = {c: i for i, c in enumerate("abcĠt")}
    vocab.update({"Ġt": 5, "he": 6, "Ġthe": 7, "Ġthec": 8})
    full = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġthe", "c")]
    assert restore_missing_merges(vocab, full[1:]) == full
    assert restore_missing_merges(vocab, full[:2] + full[3:]) == full
    assert restore_missing_merges(vocab, full) == full


@pytest.mark.parametrize("name, the_id", [("base", 264), ("tiny.en", 262)])
def test_the_is_one_token(name, the_id, request):
    processor = request.getfixturevalue(name.replace(".", "_") + "_processor")
    assert processor.tokenizer(" the", add_special_tokens=False).input_ids == [the_id]
    ids = processor.tokenizer(" the cat sat on the mat.", add_special_tokens=False).input_ids
    assert processor.tokenizer.decode(ids) == " the cat sat on the mat."


def test_base_vocabulary_and_prompt_ids_match_hub(base_processor):
    tokenizer = base_processor.tokenizer
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
    assert base_processor.get_decoder_prompt_ids(language="french", task="transcribe") == [
        (1, 50265),
        (2, 50359),
        (3, 50363),
    ]


def test_tiny_en_vocabulary_and_prompt_ids_match_hub(tiny_en_processor):
    tokenizer = tiny_en_processor.tokenizer
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]) == [
        50256,
        50257,
        50362,
    ]
    assert tokenizer("Hello world").input_ids == [50257, 50362, 15496, 995, 50256]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert tiny_en_processor.feature_extractor.feature_size == 80


def test_timestamps_decode(base_processor):
    tokenizer = base_processor.tokenizer
    ids = [50364, *tokenizer(" Hello", add_special_tokens=False).input_ids, 50400]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " Hello"
    assert tokenizer.decode(ids, decode_with_timestamps=True) == "<|0.00|> Hello<|0.72|>"
