import json
import math

import jiwer
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_blora.metrics import (
    ErrorCounts,
    adaptive_thresh_fraction,
    cer,
    contains_cjk,
    energy_curve,
    error_counts,
    error_rate,
    flatten_weights,
    hoyer_index,
    load_english_spelling_mapping,
    mer,
    mixed_error_rate,
    mixed_tokens,
    normalize_text,
    scoring_unit,
    sparsity_report,
    thresh_fraction,
    top_energy_share,
    utterance_error_counts,
    utterance_error_rates,
    wer,
)

LANGUAGES = ["en", "zh", "es", "ar", "ja"]

# Text mixing the scripts the project scores: Latin with accents, CJK, kana, Hangul, Arabic
# with harakat, digits, punctuation and odd whitespace.
script_text = st.text(
    alphabet=st.sampled_from(
        list("abcXYZ éñüß019 .,!?'-$%") + list("我喜欢你好世界，。") + list("コーヒーかな한국")
        + list("كتبالولدَُِّْ") + ["\t", "\n", "\u3000"]
    ),
    max_size=40,
)
# Tokens without whitespace, from which transcripts are built word by word.
words = st.text(alphabet=st.sampled_from(list("abcdefxyz我喜欢コー한")), min_size=1, max_size=6)
transcripts = st.lists(words, min_size=1, max_size=8).map(" ".join)
# (references, hypotheses) of equal length; hypotheses may be empty.
corpora = st.lists(st.tuples(transcripts, st.one_of(st.just(""), transcripts)), min_size=1, max_size=4).map(
    lambda pairs: ([reference for reference, _ in pairs], [hypothesis for _, hypothesis in pairs])
)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False)
# Magnitudes that stay normal floats after scaling by 2**±10.
entries = st.one_of(st.just(0.0), finite.filter(lambda value: abs(value) > 1e-6))
weight_vectors = hnp.arrays(np.float64, st.integers(1, 120), elements=entries)
nonzero_vectors = weight_vectors.filter(lambda w: np.any(w != 0))
power_of_two_scales = st.builds(
    lambda sign, exponent: sign * 2.0**exponent, st.sampled_from([-1.0, 1.0]), st.integers(-10, 10)
)
scales = st.floats(min_value=1e-3, max_value=1e3).flatmap(lambda c: st.sampled_from([c, -c]))


# --- normalisation -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(script_text, st.text(max_size=30)), language=st.sampled_from(LANGUAGES))
def test_normalisation_is_idempotent(text, language):
    once = normalize_text(text, language)
    assert normalize_text(once, language) == once


@pytest.mark.parametrize(
    "text, language, expected",
    [
        # CJK characters are kept, CJK punctuation becomes a space.
        ("我喜欢 Python，你呢？", "zh", "我喜欢 python 你呢"),
        ("日本語のテキスト、カタカナ。", "ja", "日本語のテキスト カタカナ"),
        ("한국어 문장입니다.", "ko", "한국어 문장입니다"),
        # Arabic words stay whole: the unmodified basic normaliser gives "ك ت ب الو ل د ...".
        ("كَتَبَ الوَلَدُ الدَّرْسَ", "ar", "كتب الولد الدرس"),
        ("مرحبا بالعالم، كيف حالك؟", "ar", "مرحبا بالعالم كيف حالك"),
        ("ـــكتـــب", "ar", "كتب"),
        # Accents and Devanagari vowel signs stay on their letters.
        ("¿Qué tal? Está bien, señor.", "es", "qué tal está bien señor"),
        ("नमस्ते दुनिया", "hi", "नमस्ते दुनिया"),
        # English follows Whisper's English normaliser.
        ("Hello, Mr. Smith! I won't go.", "en", "hello mister smith i will not go"),
        ("Twenty five dollars", "en-US", "$25"),
        ("Um, the [laughs] colour", "EN", "the colour"),
        ("0:1", "en", "one"),
    ],
)
def test_normalisation_examples(text, language, expected):
    assert normalize_text(text, language) == expected


def test_english_spelling_mapping_is_optional_and_loadable(tmp_path):
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}), encoding="utf-8")
    mapping = load_english_spelling_mapping(path)
    assert normalize_text("The colour", "en", english_spelling_mapping=mapping) == "the color"
    assert normalize_text("The colour", "zh", english_spelling_mapping=mapping) == "the colour"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="spelling table"):
        load_english_spelling_mapping(path)


def test_normalisation_rejects_bad_input():
    with pytest.raises(ValueError, match="language code"):
        normalize_text("text", "")
    with pytest.raises(TypeError, match="string"):
        normalize_text(None, "en")


# --- error rates ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(transcripts, min_size=1, max_size=4))
def test_identical_transcripts_score_zero(texts):
    assert wer(texts, texts) == 0.0
    assert cer(texts, texts) == 0.0
    assert mer(texts, texts) == 0.0


@settings(max_examples=100, deadline=None)
@given(text=script_text, language=st.sampled_from(LANGUAGES))
def test_hypothesis_against_itself_scores_zero_after_normalisation(text, language):
    assume(normalize_text(text, language))
    assert error_rate(text, text, language) == 0.0
    # Formatting that normalisation removes is not an error either.
    assert error_rate(text, f" ¡{text}! ", language) == 0.0


@settings(max_examples=100, deadline=None)
@given(reference=transcripts, extra=st.lists(words, min_size=1, max_size=20))
def test_insertions_count_and_can_push_wer_above_one(reference, extra):
    hypothesis = f"{reference} {' '.join(extra)}"
    counts = error_counts(reference, hypothesis)
    assert counts == ErrorCounts(0, 0, len(extra), len(reference.split()))
    assert wer(reference, hypothesis) == pytest.approx(len(extra) / len(reference.split()))


def test_wer_can_exceed_one():
    assert wer("hello", "oh hello there you") == 3.0


@settings(max_examples=100, deadline=None)
@given(corpus=corpora)
def test_word_and_character_rates_agree_with_jiwer(corpus):
    references, hypotheses = corpus
    assert wer(references, hypotheses) == pytest.approx(jiwer.wer(references, hypotheses))
    assert cer(references, hypotheses) == pytest.approx(jiwer.cer(references, hypotheses))


@settings(max_examples=100, deadline=None)
@given(corpus=corpora)
def test_corpus_counts_are_sums_of_utterance_counts(corpus):
    references, hypotheses = corpus
    per_utterance = utterance_error_counts(references, hypotheses, "mixed")
    total = error_counts(references, hypotheses, "mixed")
    assert total == sum(per_utterance, ErrorCounts(0, 0, 0, 0))
    assert total.reference_length == sum(len(mixed_tokens(text)) for text in references)
    assert mixed_error_rate(references, hypotheses) == pytest.approx(total.errors / total.reference_length)
    rates = utterance_error_rates(references, hypotheses, "mixed")
    assert rates == [counts.rate for counts in per_utterance]


@settings(max_examples=100, deadline=None)
@given(
    han=st.text(alphabet=st.sampled_from(list("我喜欢你好世界吃饭")), min_size=1, max_size=10),
    english=st.lists(st.sampled_from(["python", "ok", "meeting"]), max_size=3),
    position=st.integers(0, 9),
)
def test_mixed_error_rate_scores_one_wrong_character_as_one_token(han, english, position):
    reference = " ".join([han, *english])
    position %= len(han)
    wrong = "猫" if han[position] != "猫" else "狗"
    hypothesis = " ".join([han[:position] + wrong + han[position + 1 :], *english])
    assert len(mixed_tokens(reference)) == len(han) + len(english)
    assert mer(reference, hypothesis) == pytest.approx(1 / (len(han) + len(english)))


def test_mixed_error_rate_counts_each_cjk_character():
    assert mixed_tokens("我喜欢 python") == ["我", "喜", "欢", "python"]
    assert mixed_tokens("我喜欢python") == ["我", "喜", "欢", "python"]
    assert mixed_tokens("コーヒー 한국 ok") == ["コ", "ー", "ヒ", "ー", "한", "국", "ok"]
    assert mer("我喜欢 python", "我喜换 python") == 0.25
    assert mixed_error_rate("我喜欢 python", "我 喜欢 python") == 0.0
    # WER sees two words and one wrong; jiwer's mer is the match error rate, a different number.
    assert wer("我喜欢 python", "我喜换 python") == 0.5
    assert mer("我喜欢 python", "我喜欢 java and") == 0.5
    assert jiwer.mer("我喜欢 python", "我喜欢 java and") != 0.5


def test_error_counts_classify_edits():
    counts = utterance_error_counts(["a b c", "x", "", ""], ["a c d", "", "y z", ""])
    assert counts == [
        ErrorCounts(substitutions=2, deletions=0, insertions=0, reference_length=3),
        ErrorCounts(substitutions=0, deletions=1, insertions=0, reference_length=1),
        ErrorCounts(substitutions=0, deletions=0, insertions=2, reference_length=0),
        ErrorCounts(substitutions=0, deletions=0, insertions=0, reference_length=0),
    ]
    rates = utterance_error_rates(["a b c", "x", "", ""], ["a c d", "", "y z", ""])
    assert rates[:2] == [2 / 3, 1.0] and math.isnan(rates[2]) and rates[3] == 0.0


def test_empty_references():
    # Among others, an empty reference adds its hypothesis words as insertions.
    assert wer(["a b", ""], ["a b", "c"]) == 0.5
    with pytest.raises(ValueError, match="every reference is empty"):
        wer(["", " "], ["a", ""])
    assert error_counts(["", ""], ["a", ""]) == ErrorCounts(0, 0, 1, 0)
    with pytest.raises(ValueError, match="every reference is empty"):
        error_rate("[music]", "hello", "en")


def test_error_rates_reject_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no utterances"):
        wer([], [])
    with pytest.raises(TypeError, match=r"hypotheses\[1\]"):
        wer(["a", "b"], ["a", None])
    with pytest.raises(ValueError, match="unit must be one of"):
        error_counts("a", "a", "phoneme")


def test_language_picks_the_metric():
    assert scoring_unit("zh") == scoring_unit("ja") == scoring_unit("ko") == scoring_unit("yue") == "mixed"
    assert scoring_unit("en") == scoring_unit("es", ["hola amigo"]) == "word"
    assert scoring_unit("en", ["we had 火锅 tonight"]) == "mixed"
    assert contains_cjk("한") and not contains_cjk("hola")
    assert error_rate("我喜欢Python！", "我喜欢 python", "zh") == 0.0
    assert error_rate("我喜欢 Python", "我喜换 python", "zh") == 0.25
    assert error_rate("Hello, world!", "hello world", "en") == 0.0
    assert error_rate("Hello, world!", "hello world", "en", normalize=False) == 1.0


# --- sparsity ------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(w=nonzero_vectors, c=scales)
def test_hoyer_is_in_unit_interval_and_scale_invariant(w, c):
    assume(w.size > 1)
    index = hoyer_index(w)
    assert 0.0 <= index <= 1.0
    assert hoyer_index(c * w) == pytest.approx(index, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 500), position=st.integers(0, 499), value=finite.filter(lambda v: v != 0))
def test_hoyer_extremes(n, position, value):
    one_hot = np.zeros(n)
    one_hot[position % n] = value
    assert hoyer_index(one_hot) == 1.0
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0)
    assert hoyer_index(value * signs) == pytest.approx(0.0, abs=1e-9)


def test_squared_statistics_survive_tiny_and_huge_weights():
    assert hoyer_index([1e-200, 0.0, 0.0]) == 1.0
    assert hoyer_index([1e200, -1e200]) == pytest.approx(0.0, abs=1e-12)
    assert top_energy_share([1e-200, 1e-200], 0.5) == pytest.approx(0.5)
    assert energy_curve([1e200, 1e200])[1].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_hoyer_undefined_cases_are_nan():
    assert math.isnan(hoyer_index(torch.zeros(4, 4)))
    assert math.isnan(hoyer_index([3.0]))


@settings(max_examples=50, deadline=None)
@given(w=weight_vectors, thresholds=st.lists(st.floats(1e-8, 1e4), min_size=2, max_size=2))
def test_thresh_fraction_is_monotone_in_threshold(w, thresholds):
    low, high = sorted(thresholds)
    assert 0.0 <= thresh_fraction(w, low) <= thresh_fraction(w, high) <= 1.0


@settings(max_examples=50, deadline=None)
@given(w=nonzero_vectors, fraction=st.floats(1e-4, 1.0), c=scales)
def test_top_energy_share_bounds_and_scale_invariance(w, fraction, c):
    share = top_energy_share(w, fraction)
    top_count = max(1, math.ceil(round(fraction * w.size, 9)))
    assert top_count / w.size >= fraction - 1e-12
    assert top_count / w.size - 1e-12 <= share <= 1.0
    assert top_energy_share(c * w, fraction) == pytest.approx(share, rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(w=nonzero_vectors, c=power_of_two_scales, factor=st.floats(0.01, 10.0))
def test_adaptive_thresh_fraction_is_scale_invariant(w, c, factor):
    # Powers of two scale exactly in floating point, so the comparison must not change at all.
    fraction = adaptive_thresh_fraction(w, factor)
    assert 0.0 <= fraction <= 1.0
    # The largest magnitude is at least the mean, so with factor <= 1 it is never counted.
    assert fraction < 1.0 or factor > 1.0
    assert adaptive_thresh_fraction(c * w, factor) == fraction


def test_sparsity_statistics_on_known_values():
    w = np.array([0.0, 1e-4, -2e-3, 0.5, -1.0, 4.0])
    assert thresh_fraction(w) == 2 / 6
    # mean |w| = 5.5021 / 6 ≈ 0.917; half of it ≈ 0.459: 0, 1e-4 and -2e-3 lie below.
    assert adaptive_thresh_fraction(w) == 3 / 6
    assert top_energy_share(w) == pytest.approx(16 / (16 + 1 + 0.25 + 4e-6 + 1e-8))
    assert top_energy_share(w, 0.5) == pytest.approx((16 + 1 + 0.25) / (16 + 1 + 0.25 + 4e-6 + 1e-8))
    l1, l2 = np.abs(w).sum(), np.sqrt((w**2).sum())
    assert hoyer_index(w) == pytest.approx((np.sqrt(6) - l1 / l2) / (np.sqrt(6) - 1))


def test_sparsity_report_pools_tensors_and_mappings():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 8, generator=generator), torch.randn(8, 30, generator=generator)
    pooled = torch.cat([a.reshape(-1), b.reshape(-1)])
    report = sparsity_report({"lora_A": a, "lora_B": b})
    assert report == sparsity_report([a, b.numpy()]) == sparsity_report(pooled)
    assert report.n == 400
    assert report.hoyer_index == hoyer_index(pooled)
    assert report.as_dict()["top_fraction"] == 0.01
    zeros = sparsity_report(torch.zeros(3, 3))
    assert zeros.thresh_fraction == 1.0
    undefined = (zeros.adaptive_thresh_fraction, zeros.top_energy_share, zeros.hoyer_index)
    assert all(math.isnan(value) for value in undefined)


def test_flatten_weights_handles_dtypes_and_rejects_bad_input():
    assert flatten_weights(torch.ones(2, 2, dtype=torch.bfloat16)).dtype == torch.float32
    assert flatten_weights(np.arange(3)).dtype == torch.float64
    assert flatten_weights([1e-200, 2]).tolist() == [1e-200, 2.0]
    assert flatten_weights(torch.ones(3, requires_grad=True)).requires_grad is False
    with pytest.raises(ValueError, match="no entries"):
        flatten_weights([])
    with pytest.raises(ValueError, match="nan or inf"):
        hoyer_index(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="expected a tensor"):
        flatten_weights("weights")
    with pytest.raises(ValueError, match="threshold must be"):
        thresh_fraction(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1.0\]"):
        top_energy_share(torch.ones(3), 1.5)


@settings(max_examples=50, deadline=None)
@given(w=nonzero_vectors, max_points=st.one_of(st.none(), st.integers(2, 50)))
def test_energy_curve_is_monotone_from_origin_to_one(w, max_points):
    fractions, shares = energy_curve(w, max_points)
    assert fractions[0] == 0.0 and shares[0] == 0.0
    assert fractions[-1] == 1.0 and shares[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fractions) > 0) and np.all(np.diff(shares) >= -1e-12)
    assert len(fractions) == (w.size + 1 if max_points is None else min(w.size + 1, max_points))
    # Largest entries first: the curve lies on or above the diagonal.
    assert np.all(shares >= fractions - 1e-12)


def test_energy_curve_of_zeros_is_nan_and_max_points_is_checked():
    fractions, shares = energy_curve(torch.zeros(4))
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and np.isnan(shares).all()
    with pytest.raises(ValueError, match="max_points"):
        energy_curve(torch.ones(4), max_points=1)


# ----------------------------------------------------------------------------------- paired bootstrap
from pyro_blora.metrics import (  # noqa: E402
    backward_gain,
    bootstrap_evals,
    compare_evals,
    degradation_reduction,
    paired_bootstrap,
)


def _eval(ids, errors, ref_tokens, ce_sum=None, ce_tokens=None, domain="d"):
    """An eval result with per-utterance records, as evaluate_whisper writes them."""
    ce_sum = errors if ce_sum is None else ce_sum
    ce_tokens = ref_tokens if ce_tokens is None else ce_tokens
    records = {"ids": list(ids), "errors": list(errors), "ref_tokens": list(ref_tokens), "ce_sum": list(ce_sum),
               "ce_tokens": list(ce_tokens), "language_id_hit": [int(e == 0) for e in errors]}
    return {"results": {domain: {"per_utterance": records}}}


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    ref = rng.integers(5, 30, size=400)
    rate_a, rate_b = 0.2, 0.3
    a, b = rng.binomial(ref, rate_a), rng.binomial(ref, rate_b)
    interval = paired_bootstrap(a, ref, b, ref, samples=1000)
    assert interval.estimate == pytest.approx(b.sum() / ref.sum() - a.sum() / ref.sum())
    assert interval.contains(rate_b - rate_a) and interval.contains(interval.estimate)
    assert interval.low < interval.estimate < interval.high
    wider = paired_bootstrap(a, ref, b, ref, samples=1000, level=0.99)
    assert wider.low <= interval.low and wider.high >= interval.high


def test_identical_systems_give_a_degenerate_interval_at_zero():
    rng = np.random.default_rng(2)
    ref = rng.integers(1, 20, size=50)
    errors = rng.binomial(ref, 0.4)
    interval = paired_bootstrap(errors, ref, errors, ref)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    hits = rng.integers(0, 2, size=50)
    assert paired_bootstrap(hits, None, hits, None).high == 0.0


def test_eval_comparison_matches_utterances_by_id_and_refuses_other_sets():
    ids, errors, ref = ["u0", "u1", "u2", "u3"], [0, 2, 1, 3], [4, 5, 3, 6]
    a = _eval(ids, errors, ref)
    shuffled = _eval(ids[::-1], [e + 1 for e in errors][::-1], ref[::-1])
    interval = compare_evals(a, shuffled, "d", "error_rate", samples=200)
    assert interval.estimate == pytest.approx(len(ids) / sum(ref))
    with pytest.raises(ValueError, match="same utterances"):
        compare_evals(a, _eval(["u0", "u1", "u2", "x"], errors, ref), "d", "error_rate")
    with pytest.raises(ValueError, match="evaluate the model again"):
        compare_evals(a, {"results": {"d": {"error_rate": 0.1}}}, "d", "error_rate")


def test_degradation_reduction_and_backward_gain_point_estimates_follow_their_formulas():
    rng = np.random.default_rng(3)
    ids, ref = [f"u{i}" for i in range(60)], rng.integers(3, 15, size=60)
    base, lora, method = (rng.binomial(ref, p) for p in (0.1, 0.5, 0.25))
    evals = [_eval(ids, e, ref) for e in (base, lora, method)]
    rate = {name: e.sum() / ref.sum() for name, e in (("base", base), ("lora", lora), ("method", method))}
    reduction = bootstrap_evals([[e] for e in evals], ["d"], "error_rate", degradation_reduction, samples=300)
    assert reduction.estimate == pytest.approx(1 - (rate["method"] - rate["base"]) / (rate["lora"] - rate["base"]))
    assert reduction.low <= reduction.estimate <= reduction.high
    gain = bootstrap_evals([[evals[1]], [evals[2]]], ["d"], "error_rate", backward_gain, samples=300)
    assert gain.estimate == pytest.approx((rate["lora"] - rate["method"]) / rate["lora"])


def test_pooling_seeds_concatenates_their_utterances():
    rng = np.random.default_rng(4)
    ids, ref = [f"u{i}" for i in range(20)], rng.integers(3, 15, size=20)
    seeds = [[_eval(ids, rng.binomial(ref, p), ref) for p in (0.2, 0.3)] for _ in range(2)]  # [seed][system]
    pooled = bootstrap_evals([[s[0] for s in seeds], [s[1] for s in seeds]], ["d"], "error_rate",
                             lambda v: v[..., 1] - v[..., 0], samples=200)
    per_seed = [compare_evals(a, b, "d", "error_rate", samples=10).estimate for a, b in seeds]
    assert pooled.estimate == pytest.approx(sum(per_seed) / len(per_seed))  # same references in every seed
