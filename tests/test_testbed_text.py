"""Sentence generators, markup and switch statistics of the testbed (text only, fast)."""

import unicodedata

import pytest

from pyro_blora.testbed import (
    BUILTIN_PAIRS, CodeSwitchSpec, LanguagePair, builtin_spec, english_spec, generate_sentences, parse_marked_text,
    split_templates, switch_stats, tokens,
)
from pyro_blora.testbed.build import TestbedConfig, _generated_splits, _plan, user_sentences


def _letters_by_script(text: str) -> set[str]:
    """Unicode script names (first word of the character name) of the letters in `text`."""
    scripts = set()
    for char in text:
        if unicodedata.category(char).startswith("L"):
            name = unicodedata.name(char)
            scripts.add("HAN" if name.startswith("CJK") else name.split()[0])
    return scripts


@pytest.mark.parametrize("pair, matrix_script", [("zh-en", "HAN"), ("ar-en", "ARABIC"), ("es-en", "LATIN")])
def test_segments_are_written_in_their_languages_script(pair, matrix_script):
    spec = builtin_spec(pair)
    sentences = generate_sentences(spec, 60, seed=3)
    for sentence in sentences:
        for segment in sentence.segments:
            expected = matrix_script if segment.language == spec.pair.matrix else "LATIN"
            assert _letters_by_script(segment.text) == {expected}, (sentence.text, segment)
        # The transcript keeps every segment's words, in order.
        assert tokens(sentence.text) == [t for s in sentence.segments for t in tokens(s.text)]


def test_embedded_english_words_come_from_the_embedded_lists():
    spec = builtin_spec("es-en")
    english = {w for words in spec.embedded_words.values() for w in words}
    for sentence in generate_sentences(spec, 40, seed=1):
        embedded = [s.text.rstrip(".?!,") for s in sentence.segments if s.language == "en"]
        assert embedded, sentence.text
        # A segment is one fill or several adjacent fills.
        assert all(any(w in text for w in english) for text in embedded), sentence.text


@pytest.mark.parametrize("pair", sorted(BUILTIN_PAIRS))
def test_switch_statistics_stay_in_the_configured_ranges(pair):
    spec = builtin_spec(pair)
    low, high = spec.embedded_fraction_range
    for sentence in generate_sentences(spec, 80, seed=0):
        assert low <= sentence.stats.embedded_fraction <= high
        assert spec.switch_range[0] <= sentence.stats.n_switches <= spec.switch_range[1]
        assert sentence.stats == switch_stats(sentence.segments, spec.pair.matrix)


def test_narrow_ranges_are_respected_and_impossible_ones_fail_clearly():
    spec = builtin_spec("zh-en")
    narrow = CodeSwitchSpec(spec.pair, spec.templates, spec.matrix_words, spec.embedded_words,
                            embedded_fraction_range=(0.1, 0.3), switch_range=(2, 2))
    for sentence in generate_sentences(narrow, 30, seed=0):
        assert 0.1 <= sentence.stats.embedded_fraction <= 0.3 and sentence.stats.n_switches == 2
    impossible = CodeSwitchSpec(spec.pair, spec.templates, spec.matrix_words, spec.embedded_words, switch_range=(40, 50))
    with pytest.raises(ValueError, match="widen its switch ranges"):
        generate_sentences(impossible, 3, seed=0)


def test_monolingual_generation_has_no_switches():
    for sentence in generate_sentences(builtin_spec("zh-en"), 30, seed=0, monolingual=True):
        assert sentence.stats.n_switches == 0 and _letters_by_script(sentence.text) == {"HAN"}


def test_english_generator_gives_500_distinct_varied_sentences():
    sentences = generate_sentences(english_spec(), 600, seed=0)
    texts = [s.text for s in sentences]
    assert len(set(texts)) == 600
    assert len({s.template_id for s in sentences}) >= 50
    vocabulary = {t.lower() for text in texts for t in tokens(text)}
    assert len(vocabulary) > 400
    assert all(text[0].isupper() and text[-1] in ".?" for text in texts)


def test_same_seed_same_text_other_seed_other_text():
    spec = builtin_spec("ar-en")
    first = [s.text for s in generate_sentences(spec, 20, seed=5)]
    assert first == [s.text for s in generate_sentences(spec, 20, seed=5)]
    assert first != [s.text for s in generate_sentences(spec, 20, seed=6)]


def test_template_split_is_disjoint_and_proportional():
    split = split_templates(36, {"train": 400, "dev": 100, "test": 100}, seed=0)
    assert sorted(split["train"] + split["dev"] + split["test"]) == list(range(36))
    assert len(split["train"]) > len(split["dev"]) >= 1 and len(split["test"]) >= 1
    with pytest.raises(ValueError, match="add templates"):
        split_templates(2, {"train": 1, "dev": 1, "test": 1}, seed=0)


def test_planned_splits_never_share_a_template():
    config = TestbedConfig.small(codeswitch_sizes=(40, 10, 10), english_sizes=(20, 10, 40))
    for plan in _plan(config, seed=0):
        if "train" not in plan.sentences:
            continue
        train = {s.template_id for s in plan.sentences["train"]}
        for split in ("dev", "test"):
            assert train.isdisjoint(s.template_id for s in plan.sentences[split]), plan.name
    # Monolingual Chinese backward sentences use only the held-out (test) templates of zh-en.
    spec = builtin_spec("zh-en")
    _, templates = _generated_splits(spec, config.codeswitch_sizes, seed=0)
    plans = {p.name: p for p in _plan(config, seed=0)}
    assert {s.template_id for s in plans["backward-zh"].sentences["test"]} <= {
        spec.template_id(i) for i in templates["test"]
    }


def test_markup_marks_switches_and_is_stripped():
    pair = LanguagePair("es", "en")
    segments = parse_marked_text("Voy a la [en: meeting] mañana con [en: my boss].", pair)
    assert [(s.language, s.text) for s in segments] == [
        ("es", "Voy a la"), ("en", "meeting"), ("es", "mañana con"), ("en", "my boss."),
    ]
    sentence = user_sentences(["Voy a la [en: meeting] mañana con [en: my boss]."], pair)[0]
    assert sentence.text == "Voy a la meeting mañana con my boss."
    assert sentence.stats.n_switches == 3 and sentence.stats.embedded_runs == (1, 2)
    for bad in ("Voy a la [en meeting] mañana", "Voy a la [de: Sitzung] mañana", "Voy [en: a] la ]"):
        with pytest.raises(ValueError, match="markup"):
            parse_marked_text(bad, pair)


def test_unmarked_text_is_split_by_script_where_scripts_differ():
    segments = parse_marked_text("我们明天有meeting要讨论", LanguagePair("zh", "en"))
    assert [s.language for s in segments] == ["zh", "en", "zh"]
    assert switch_stats(segments, "zh").n_switches == 2
    arabic = parse_marked_text("أنا عندي meeting بكرة", LanguagePair("ar", "en"))
    assert [s.language for s in arabic] == ["ar", "en", "ar"]


def test_tokens_count_han_characters_and_words():
    assert tokens("我们有 meeting，好吗？") == ["我", "们", "有", "meeting", "好", "吗"]
    assert tokens("Voy a la meeting.") == ["Voy", "a", "la", "meeting"]


def test_user_pairs_by_name():
    from pyro_blora.testbed.build import _pair_from_name

    assert _pair_from_name("it-en") == LanguagePair("it", "en", "it", "en-us")
    assert _pair_from_name("zh-en").matrix_voice == "cmn" and _pair_from_name("en").embedded is None
    with pytest.raises(ValueError, match="matrix-embedded"):
        _pair_from_name("a-b-c")


def test_new_pairs_work_by_parameter():
    spec = CodeSwitchSpec(
        LanguagePair("it", "en"),
        templates=("Domani ho una {N} con {PERSON}.", "Il {N} era {ADJ}."),
        matrix_words={"N": ("riunione", "lezione"), "PERSON": ("il capo",), "ADJ": ("bello", "lungo")},
        embedded_words={"N": ("meeting", "call"), "ADJ": ("boring",)},
    )
    sentences = generate_sentences(spec, 6, seed=0)
    assert all(s.stats.n_switches >= 1 for s in sentences)
    assert spec.pair.voice_of("it") == "it" and spec.pair.voice_of("en") == "en-us"


def test_bad_specs_and_configs_fail_with_a_fix():
    pair = LanguagePair("es", "en")
    with pytest.raises(ValueError, match="add a word list"):
        CodeSwitchSpec(pair, ("Hola {X}.",), {"N": ("casa",)})
    with pytest.raises(ValueError, match="Whisper language code"):
        LanguagePair("Spanish", "en")
    with pytest.raises(ValueError, match="no built-in language pair"):
        TestbedConfig(pairs=("xx-en",))
    with pytest.raises(ValueError, match="three non-negative"):
        TestbedConfig(codeswitch_sizes=(1, 2))
    with pytest.raises(ValueError, match="test split of domain 'en'"):
        TestbedConfig(backward_languages=("en",))
