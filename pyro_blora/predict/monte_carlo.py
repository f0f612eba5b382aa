"""Prediction from the posterior: the merged posterior mean, and Monte Carlo transcription.

Under the mean-field posterior A and B are independent, so E[B A] = E[B] E[A]: folding the
posterior means into W0 gives the exact posterior mean of dW. Monte Carlo draws whole adapter
samples from the guide with ``pyro.infer.Predictive``; each hypothesis is decoded with one sample
held fixed for all of its decoding steps (never one draw per forward call). The chosen hypothesis is
then scored under every sample (teacher-forced): the entropy of the averaged next-token distribution
splits into the expected entropy and the mutual information (BALD), the part due to the posterior.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Collection, Literal, Mapping

import torch
from pyro.infer import Predictive
from transformers import WhisperForConditionalGeneration

from pyro_blora.predict.confidence import DEFAULT_ENTROPY_ALPHA, entropy_confidence
from pyro_blora.predict.decoding import generate
from pyro_blora.model.adapters import StackedBatchError
from pyro_blora.model.guide import BLoRAGuide
# The teacher-forced cross-entropy lives with the objective; its names stay importable from here.
from pyro_blora.metrics import normalize_text, scoring_unit, utterance_error_counts
from pyro_blora.model.whisper import BLoRAWhisper

__all__ = [
    "MonteCarloTranscript",
    "PointTranscript",
    "minimum_bayes_risk",
    "pairwise_error_rate",
    "point_transcribe",
    "posterior_mean_model",
    "sample_posterior",
    "monte_carlo_transcribe",
    "widest_sites",
    "with_language",
]


def posterior_mean_model(model: BLoRAWhisper, guide: BLoRAGuide) -> WhisperForConditionalGeneration:
    """A plain transformers Whisper with E[dW] merged in; ``save_pretrained`` works on it."""
    return model.merged_whisper(guide.means())


def sample_posterior(guide: BLoRAGuide, num_samples: int, parallel: bool = True, temperature: float = 1.0,
                     sites: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """``num_samples`` joint draws of every adapter site, each of shape (S, *site_shape).

    ``parallel=True`` draws them in one vectorised pass (a plate over samples). ``temperature`` tau
    scales every posterior standard deviation (draws mean + tau (draw - mean)): a posterior too narrow
    for its samples to disagree can be widened at prediction time. ``sites`` samples only those sites
    and holds the others at their means (e.g. :func:`widest_sites`)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"the posterior temperature must be > 0 (1: the posterior as trained), got {temperature}")
    guide.setup()
    names = guide.blora.site_names()
    unknown = sorted(set(sites or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown sites {unknown[:3]}; choose among BLoRAWhisper.site_names()")
    predictive = Predictive(guide, num_samples=num_samples, return_sites=names, parallel=parallel)
    with torch.no_grad():
        samples = predictive()
    draws = {site: samples[site].detach().reshape(num_samples, *samples[site].shape[-2:]) for site in names}
    if temperature == 1.0 and sites is None:
        return draws
    means = guide.means()
    return {site: (means[site] + temperature * (draws[site] - means[site]) if sites is None or site in sites
                   else means[site].expand_as(draws[site]).clone()) for site in names}


def widest_sites(guide: BLoRAGuide, count: int) -> list[str]:
    """The ``count`` adapter sites (A or B matrices) with the largest mean posterior variance."""
    variances = {site: float(std.double().square().mean()) for site, std in guide.stddevs().items()}
    if not 1 <= count <= len(variances):
        raise ValueError(f"count must lie in [1, {len(variances)}] (the number of adapter sites), got {count}")
    return sorted(variances, key=variances.get, reverse=True)[:count]


def pairwise_error_rate(hypotheses: list[str], language: str | None = None) -> torch.Tensor:
    """S x S error rates between hypotheses (row i is the reference), after normalisation.

    The unit follows the language (mixed error rate for CJK text, words otherwise). An empty
    reference scores 0 against an empty hypothesis and 1 against anything else."""
    language = language or "und"
    texts = [normalize_text(text, language) for text in hypotheses]
    n = len(texts)
    rates = torch.zeros(n, n)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if not pairs:
        return rates
    counts = utterance_error_counts([texts[i] for i, _ in pairs], [texts[j] for _, j in pairs], scoring_unit(language, texts))
    for (i, j), c in zip(pairs, counts):
        rates[i, j] = c.errors / c.reference_length if c.reference_length else float(c.errors > 0)
    return rates


@dataclass
class MonteCarloTranscript:
    """One utterance decoded under S posterior samples."""

    chosen: str
    hypotheses: list[str]
    # Mean pairwise error rate between the sample hypotheses (0: all samples agree).
    disagreement: float
    # Mean entropy (nats) of the next-token distributions along the sampled hypotheses.
    mean_token_entropy: float
    mean_hypothesis: str | None = None
    # Mean log-probability (nats) of the tokens of the posterior-mean hypothesis under the
    # posterior-mean model (a deterministic confidence baseline); None unless choose="mean".
    mean_log_prob: float | None = None
    # The chosen hypothesis scored under every sample, means over its tokens (nats): entropy of the
    # averaged next-token distribution = expected entropy + mutual information.
    predictive_entropy: float | None = None
    expected_entropy: float | None = None
    mutual_information: float | None = None
    # The chosen hypothesis' text tokens and the entropy confidence of the averaged distribution at each.
    token_ids: list[int] | None = None
    token_confidences: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def with_language(model: BLoRAWhisper, generate_kwargs: Mapping | None, language: str | None) -> dict:
    """``generate`` keyword arguments with the language, for multilingual checkpoints only: English-only
    ones refuse a language argument (the language still selects the scoring unit)."""
    kwargs = dict(generate_kwargs or {})
    config = model.whisper.generation_config
    if language is not None and getattr(config, "is_multilingual", bool(getattr(config, "lang_to_id", None))):
        kwargs.setdefault("language", language)
    return kwargs


@dataclass(frozen=True)
class _Decoded:
    sequences: torch.Tensor  # (rows, length) token ids, the prompt first
    mean_entropy: torch.Tensor  # (rows,) mean next-token entropy (nats) along the hypothesis
    mean_log_prob: torch.Tensor  # (rows,) mean log-probability (nats) of the chosen tokens
    text_tokens: list[list[int]]  # per row: the generated text tokens (no end-of-text)
    token_confidences: list[list[float]]  # per row: entropy confidence at each text token
    scaled_mean_log_prob: torch.Tensor | None  # mean log-probability under logits / temperature
    prompt_length: int  # forced tokens before the first generated one


def _end_of_text(model: BLoRAWhisper) -> int:
    eos = model.whisper.generation_config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def _counted(generated: torch.Tensor, eos: int) -> torch.Tensor:
    """1 for the steps that count: up to and including the first end-of-text token."""
    finished_before = torch.cumsum((generated == eos).long(), dim=1) - (generated == eos).long()
    return (finished_before == 0).float()


def _decode(model: BLoRAWhisper, input_features: torch.Tensor, generate_kwargs: Mapping,
            temperature: float | None = None, entropy_alpha: float = DEFAULT_ENTROPY_ALPHA) -> _Decoded:
    """Greedy/beam decode with the adapters as currently held; per-row entropy and token log-probability
    (also under logits / ``temperature`` when given) and per-token entropy confidence."""
    out = generate(model.whisper, input_features, output_logits=True, return_dict_in_generate=True, **generate_kwargs)
    sequences = out.sequences
    logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)  # (rows, steps)
    generated = sequences[:, -logits.shape[1]:]
    eos = _end_of_text(model)
    valid = _counted(generated, eos)
    count = valid.sum(1).clamp(min=1)

    def mean_log_prob(log_probs: torch.Tensor) -> torch.Tensor:
        token_log_p = log_probs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # (rows, steps)
        return (token_log_p.nan_to_num(neginf=0.0) * valid).sum(1) / count

    confidence = entropy_confidence(log_p, entropy_alpha)
    text = (valid > 0) & (generated != eos)
    return _Decoded(
        sequences,
        (entropy * valid).sum(1) / count,
        mean_log_prob(log_p),
        [generated[r][text[r]].tolist() for r in range(len(generated))],
        [confidence[r][text[r]].tolist() for r in range(len(generated))],
        None if temperature is None else mean_log_prob(torch.log_softmax(logits / temperature, dim=-1)),
        sequences.shape[1] - logits.shape[1],
    )


@torch.no_grad()
def _ensemble_scores(model: BLoRAWhisper, samples: Mapping[str, torch.Tensor], input_features: torch.Tensor,
                     prompt: torch.Tensor, hypotheses: list[list[int]],
                     entropy_alpha: float = DEFAULT_ENTROPY_ALPHA) -> list[dict]:
    """Each row's hypothesis (text tokens after ``prompt``, then end-of-text) teacher-forced under every
    sample: mean predictive entropy, expected entropy and mutual information over its tokens, and the
    entropy confidence of the averaged distribution at each text token."""
    eos = _end_of_text(model)
    targets = [h + [eos] for h in hypotheses]
    width = max(len(t) for t in targets)
    rows = len(targets)
    padded = torch.full((rows, width), eos, dtype=torch.long, device=prompt.device)
    mask = torch.zeros(rows, width, dtype=torch.bool, device=prompt.device)
    for r, target in enumerate(targets):
        padded[r, :len(target)] = torch.tensor(target, device=prompt.device)
        mask[r, :len(target)] = True
    decoder_input = torch.cat([prompt, padded[:, :-1]], dim=1)
    num_samples = next(iter(samples.values())).shape[0]
    mean_p, expected = None, None
    for s in range(num_samples):
        with model.hold_adapters({site: value[s] for site, value in samples.items()}):
            logits = model.whisper(input_features=input_features, decoder_input_ids=decoder_input).logits
        log_p = torch.log_softmax(logits[:, prompt.shape[1] - 1:].float(), dim=-1)  # (rows, width, vocab)
        entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
        mean_p = log_p.exp() / num_samples if mean_p is None else mean_p + log_p.exp() / num_samples
        expected = entropy / num_samples if expected is None else expected + entropy / num_samples
    log_mean = mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny).log()
    predictive = -(mean_p * log_mean).sum(-1)
    confidence = entropy_confidence(log_mean, entropy_alpha)
    weights = mask.float() / mask.sum(1, keepdim=True)
    scores = []
    for r, hypothesis in enumerate(hypotheses):
        total, aleatoric = float((predictive[r] * weights[r]).sum()), float((expected[r] * weights[r]).sum())
        scores.append({"predictive_entropy": total, "expected_entropy": aleatoric,
                       "mutual_information": max(total - aleatoric, 0.0), "token_ids": list(hypothesis),
                       "token_confidences": confidence[r, :len(hypothesis)].tolist()})
    return scores


def minimum_bayes_risk(hypotheses: list[str], language: str | None = None) -> tuple[int, float]:
    """Index of the hypothesis with the lowest expected error rate when the others are its references
    (each draw a pseudo-reference from the posterior), and the mean pairwise error rate (the samples'
    disagreement: 0 when all agree).

    The candidate is scored as the hypothesis, never as the reference: scored the other way round, a
    draw caught in a repetition loop pays only its deletions per own (long) length and wins."""
    if not hypotheses:
        raise ValueError("minimum_bayes_risk needs at least one hypothesis")
    if len(hypotheses) == 1:
        return 0, 0.0
    pairwise = pairwise_error_rate(hypotheses, language=language)  # row: reference, column: hypothesis
    return int(pairwise.mean(dim=0).argmin()), float(pairwise.mean())


@dataclass(frozen=True)
class PointTranscript:
    """A hypothesis of one deterministic model (e.g. the posterior mean or a plain LoRA)."""

    text: str
    # Mean log-probability (nats) of the hypothesis' tokens, end-of-text included.
    mean_log_prob: float
    mean_token_entropy: float
    # The text tokens and the entropy confidence of the next-token distribution at each.
    token_ids: tuple[int, ...] = ()
    token_confidences: tuple[float, ...] = ()
    # mean_log_prob under logits / temperature, when point_transcribe was given one.
    scaled_mean_log_prob: float | None = None


@torch.no_grad()
def point_transcribe(
    model: BLoRAWhisper,
    adapter_values: Mapping[str, torch.Tensor],
    input_features: torch.Tensor,
    tokenizer,
    language: str | None = None,
    generate_kwargs: Mapping | None = None,
    temperature: float | None = None,
    entropy_alpha: float = DEFAULT_ENTROPY_ALPHA,
) -> list[PointTranscript]:
    """Decode with the adapters held at ``adapter_values`` (2-D tensors, e.g. ``guide.means()``);
    with a ``temperature`` (e.g. fitted on dev) the hypothesis is also scored under logits / T.
    ``entropy_alpha`` is the Tsallis alpha of the per-token entropy confidence."""
    return _point_records(_point_decode(model, adapter_values, input_features, language, generate_kwargs, temperature,
                                        entropy_alpha), tokenizer)


def _point_decode(model, adapter_values, input_features, language, generate_kwargs, temperature=None,
                  entropy_alpha: float = DEFAULT_ENTROPY_ALPHA) -> _Decoded:
    generate_kwargs = with_language(model, generate_kwargs, language)
    model.eval()
    with model.hold_adapters(adapter_values):
        return _decode(model, input_features, generate_kwargs, temperature, entropy_alpha)


def _point_records(decoded: _Decoded, tokenizer) -> list[PointTranscript]:
    texts = tokenizer.batch_decode(decoded.sequences, skip_special_tokens=True)
    scaled = decoded.scaled_mean_log_prob
    return [
        PointTranscript(text.strip(), float(decoded.mean_log_prob[r]), float(decoded.mean_entropy[r]),
                        tuple(decoded.text_tokens[r]), tuple(decoded.token_confidences[r]),
                        None if scaled is None else float(scaled[r]))
        for r, text in enumerate(texts)
    ]


@torch.no_grad()
def monte_carlo_transcribe(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    input_features: torch.Tensor,
    tokenizer,
    num_samples: int = 8,
    choose: Literal["mean", "mbr"] = "mean",
    vectorized: bool = True,
    language: str | None = None,
    generate_kwargs: Mapping | None = None,
    posterior_temperature: float = 1.0,
    sampled_sites: Collection[str] | None = None,
    entropy_alpha: float = DEFAULT_ENTROPY_ALPHA,
) -> list[MonteCarloTranscript]:
    """Transcribe a batch of log-mel features under ``num_samples`` posterior draws.

    ``choose="mean"`` returns the posterior-mean hypothesis; ``"mbr"`` the sample hypothesis with the
    lowest expected error rate with the others as its references (minimum Bayes risk). ``vectorized`` decodes all S
    samples in one batched pass (batch S * B, each slice with its own adapter sample): the same
    hypotheses as S passes; it pays on accelerators, while on a CPU it costs about what S passes cost
    (BENCHMARKS.md). ``posterior_temperature`` and ``sampled_sites`` change the draws (see
    :func:`sample_posterior`). The chosen hypothesis is then scored under every draw (mutual information).
    ``entropy_alpha`` is the Tsallis alpha of the per-token entropy confidences.
    """
    if choose not in ("mean", "mbr"):
        raise ValueError(f"choose must be 'mean' or 'mbr', got {choose!r}")
    generate_kwargs = with_language(model, generate_kwargs, language)
    model.eval()
    samples = sample_posterior(guide, num_samples, temperature=posterior_temperature, sites=sampled_sites)
    batch = input_features.shape[0]
    decoded = None
    if vectorized:
        try:
            with model.hold_adapters(samples):
                decoded = _decode(model, input_features.repeat(num_samples, 1, 1), generate_kwargs)
        except StackedBatchError:  # generation ran part of the batch on its own: decode sample by sample
            decoded = None
    if decoded is not None:
        entropies = decoded.mean_entropy.reshape(num_samples, batch)
        tokens = [decoded.text_tokens[s * batch:(s + 1) * batch] for s in range(num_samples)]
        prompts = [decoded.sequences[s * batch:(s + 1) * batch, :decoded.prompt_length] for s in range(num_samples)]
    else:
        per_sample = [_decode_held(model, {site: value[s] for site, value in samples.items()}, input_features,
                                   generate_kwargs) for s in range(num_samples)]
        entropies = torch.stack([d.mean_entropy for d in per_sample])
        tokens = [d.text_tokens for d in per_sample]
        prompts = [d.sequences[:, :d.prompt_length] for d in per_sample]
    texts = [tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in tokens]  # [S][B]
    means: list[PointTranscript | None] = [None] * batch
    if choose == "mean":
        mean_decoded = _decode_held(model, guide.means(), input_features, generate_kwargs, entropy_alpha)
        means = _point_records(mean_decoded, tokenizer)
    chosen_tokens, chosen_prompts, picks = [], [], []
    for b in range(batch):
        hyps = [texts[s][b].strip() for s in range(num_samples)]
        best, disagreement = minimum_bayes_risk(hyps, language=language)
        picks.append((hyps, best, disagreement))
        if means[b] is not None:
            chosen_tokens.append(list(means[b].token_ids))
            chosen_prompts.append(mean_decoded.sequences[b, :mean_decoded.prompt_length])
        else:
            chosen_tokens.append(tokens[best][b])
            chosen_prompts.append(prompts[best][b])
    prompt_ids = torch.stack(chosen_prompts)
    ensemble = _ensemble_scores(model, samples, input_features, prompt_ids, chosen_tokens, entropy_alpha)
    results = []
    for b, (hyps, best, disagreement) in enumerate(picks):
        mean = means[b]
        results.append(
            MonteCarloTranscript(
                chosen=hyps[best] if mean is None else mean.text,
                hypotheses=hyps,
                disagreement=disagreement,
                mean_token_entropy=float(entropies[:, b].mean()),
                mean_hypothesis=None if mean is None else mean.text,
                mean_log_prob=None if mean is None else mean.mean_log_prob,
                **ensemble[b],
            )
        )
    return results


def _decode_held(model: BLoRAWhisper, values: Mapping[str, torch.Tensor], input_features: torch.Tensor,
                 generate_kwargs: Mapping, entropy_alpha: float = DEFAULT_ENTROPY_ALPHA) -> _Decoded:
    with model.hold_adapters(values):
        return _decode(model, input_features, generate_kwargs, entropy_alpha=entropy_alpha)
