"""Prediction from the posterior: the merged posterior mean, and Monte Carlo transcription.

Under the mean-field posterior A and B are independent, so E[B A] = E[B] E[A]: folding the
posterior means into W0 gives the exact posterior mean of dW. Monte Carlo draws whole adapter
samples from the guide with ``pyro.infer.Predictive``; each hypothesis is decoded with one sample
held fixed for all of its decoding steps (never one draw per forward call).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Mapping

import torch
from pyro.infer import Predictive
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora.decoding import generate
from pyro_blora.guide import BLoRAGuide
from pyro_blora.metrics import normalize_text, scoring_unit, utterance_error_counts
from pyro_blora.model import BLoRAWhisper

__all__ = [
    "MonteCarloTranscript",
    "PointTranscript",
    "minimum_bayes_risk",
    "pairwise_error_rate",
    "point_transcribe",
    "posterior_mean_model",
    "sample_posterior",
    "monte_carlo_transcribe",
    "UtteranceNLL",
    "token_nll",
    "token_nll_per_utterance",
]


def posterior_mean_model(model: BLoRAWhisper, guide: BLoRAGuide) -> WhisperForConditionalGeneration:
    """A plain transformers Whisper with E[dW] merged in; ``save_pretrained`` works on it."""
    return model.merged_whisper(guide.means())


def sample_posterior(guide: BLoRAGuide, num_samples: int, parallel: bool = True) -> dict[str, torch.Tensor]:
    """``num_samples`` joint draws of every adapter site, each of shape (S, *site_shape).

    ``parallel=True`` draws them in one vectorised pass (a plate over samples)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    guide.setup()
    sites = guide.blora.site_names()
    predictive = Predictive(guide, num_samples=num_samples, return_sites=sites, parallel=parallel)
    with torch.no_grad():
        samples = predictive()
    return {site: samples[site].detach().reshape(num_samples, *samples[site].shape[-2:]) for site in sites}


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

    def to_dict(self) -> dict:
        return asdict(self)


def _with_language(model: BLoRAWhisper, generate_kwargs: Mapping | None, language: str | None) -> dict:
    """``generate`` keyword arguments with the language, for multilingual checkpoints only: English-only
    ones refuse a language argument (the language still selects the scoring unit)."""
    kwargs = dict(generate_kwargs or {})
    config = model.whisper.generation_config
    if language is not None and getattr(config, "is_multilingual", bool(getattr(config, "lang_to_id", None))):
        kwargs.setdefault("language", language)
    return kwargs


@dataclass(frozen=True)
class _Decoded:
    sequences: torch.Tensor  # (rows, length) token ids
    mean_entropy: torch.Tensor  # (rows,) mean next-token entropy (nats) along the hypothesis
    mean_log_prob: torch.Tensor  # (rows,) mean log-probability (nats) of the chosen tokens


def _decode(model: BLoRAWhisper, input_features: torch.Tensor, generate_kwargs: Mapping) -> _Decoded:
    """Greedy/beam decode with the adapters as currently held; per-row entropy and token log-probability."""
    out = generate(model.whisper, input_features, output_logits=True, return_dict_in_generate=True, **generate_kwargs)
    sequences = out.sequences
    logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)  # (rows, steps)
    generated = sequences[:, -logits.shape[1]:]
    token_log_p = log_p.gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # (rows, steps)
    eos = model.whisper.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    # A step counts until (and including) the first end-of-text token.
    finished_before = torch.cumsum((generated == eos).long(), dim=1) - (generated == eos).long()
    valid = (finished_before == 0).float()
    count = valid.sum(1).clamp(min=1)
    return _Decoded(
        sequences,
        (entropy * valid).sum(1) / count,
        (token_log_p.nan_to_num(neginf=0.0) * valid).sum(1) / count,
    )


def minimum_bayes_risk(hypotheses: list[str], language: str | None = None) -> tuple[int, float]:
    """Index of the hypothesis with the lowest mean error rate against the others, and the mean
    pairwise error rate (the samples' disagreement: 0 when all agree)."""
    if not hypotheses:
        raise ValueError("minimum_bayes_risk needs at least one hypothesis")
    if len(hypotheses) == 1:
        return 0, 0.0
    pairwise = pairwise_error_rate(hypotheses, language=language)
    return int(pairwise.mean(dim=1).argmin()), float(pairwise.mean())


@dataclass(frozen=True)
class PointTranscript:
    """A hypothesis of one deterministic model (e.g. the posterior mean or a plain LoRA)."""

    text: str
    # Mean log-probability (nats) of the hypothesis' tokens, end-of-text included.
    mean_log_prob: float
    mean_token_entropy: float


@torch.no_grad()
def point_transcribe(
    model: BLoRAWhisper,
    adapter_values: Mapping[str, torch.Tensor],
    input_features: torch.Tensor,
    tokenizer,
    language: str | None = None,
    generate_kwargs: Mapping | None = None,
) -> list[PointTranscript]:
    """Decode with the adapters held at ``adapter_values`` (2-D tensors, e.g. ``guide.means()``)."""
    generate_kwargs = _with_language(model, generate_kwargs, language)
    model.eval()
    with model.hold_adapters(adapter_values):
        decoded = _decode(model, input_features, generate_kwargs)
    texts = tokenizer.batch_decode(decoded.sequences, skip_special_tokens=True)
    return [
        PointTranscript(text.strip(), float(lp), float(h))
        for text, lp, h in zip(texts, decoded.mean_log_prob, decoded.mean_entropy)
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
) -> list[MonteCarloTranscript]:
    """Transcribe a batch of log-mel features under ``num_samples`` posterior draws.

    ``choose="mean"`` returns the posterior-mean hypothesis; ``"mbr"`` the sample hypothesis with the
    lowest mean error rate against the others (minimum Bayes risk). ``vectorized`` decodes all S
    samples in one batched pass (batch S * B, each slice with its own adapter sample): the same
    hypotheses as S passes; it pays on accelerators, while on a CPU it costs about what S passes cost
    (BENCHMARKS.md).
    """
    if choose not in ("mean", "mbr"):
        raise ValueError(f"choose must be 'mean' or 'mbr', got {choose!r}")
    generate_kwargs = _with_language(model, generate_kwargs, language)
    model.eval()
    samples = sample_posterior(guide, num_samples)
    batch = input_features.shape[0]
    if vectorized:
        with model.hold_adapters(samples):
            decoded = _decode(model, input_features.repeat(num_samples, 1, 1), generate_kwargs)
        rows = [decoded.sequences[s * batch:(s + 1) * batch] for s in range(num_samples)]
        entropies = decoded.mean_entropy.reshape(num_samples, batch)
    else:
        rows, ent = [], []
        for s in range(num_samples):
            with model.hold_adapters({site: value[s] for site, value in samples.items()}):
                decoded = _decode(model, input_features, generate_kwargs)
            rows.append(decoded.sequences)
            ent.append(decoded.mean_entropy)
        entropies = torch.stack(ent)
    texts = [tokenizer.batch_decode(r, skip_special_tokens=True) for r in rows]  # [S][B]
    means: list[PointTranscript | None] = [None] * batch
    if choose == "mean":
        means = point_transcribe(model, guide.means(), input_features, tokenizer, generate_kwargs=generate_kwargs)
    results = []
    for b in range(batch):
        hyps = [texts[s][b].strip() for s in range(num_samples)]
        best, disagreement = minimum_bayes_risk(hyps, language=language)
        mean = means[b]
        results.append(
            MonteCarloTranscript(
                chosen=hyps[best] if mean is None else mean.text,
                hypotheses=hyps,
                disagreement=disagreement,
                mean_token_entropy=float(entropies[:, b].mean()),
                mean_hypothesis=None if mean is None else mean.text,
                mean_log_prob=None if mean is None else mean.mean_log_prob,
            )
        )
    return results


@dataclass(frozen=True)
class UtteranceNLL:
    """Teacher-forced NLL per utterance, split into transcript and prompt tokens.

    Transcript tokens are the text and the end-of-text token; prompt tokens are the forced special
    tokens before the text (language, task, no-timestamps). Evaluation reports the transcript part,
    which adaptation and forgetting change; the prompt is near-certain and dilutes the mean."""

    ids: list[str]
    ce_sum: list[float]
    ce_tokens: list[int]
    prompt_ce_sum: list[float]
    prompt_tokens: list[int]


@torch.no_grad()
def token_nll_per_utterance(whisper: WhisperForConditionalGeneration, batches: Iterable[Mapping]) -> UtteranceNLL:
    """Summed cross-entropy (nats) and token counts of every label row, transcript and prompt apart.

    Prompt tokens are the label ids above the end-of-text id (Whisper's special tokens follow it in
    the vocabulary); ``-100`` is padding. Rows are named by the batch's ``ids`` (their positions
    when it has none)."""
    cfg = whisper.config
    device = next(whisper.parameters()).device
    out = UtteranceNLL([], [], [], [], [])
    for batch in batches:
        labels = batch["labels"].to(device)
        decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        logits = whisper(input_features=batch["input_features"].to(device), decoder_input_ids=decoder_input_ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        ).double()
        prompt = labels > cfg.eos_token_id
        transcript = (labels != -100) & ~prompt
        out.ids.extend(batch.get("ids") or [str(len(out.ids) + row) for row in range(labels.shape[0])])
        out.ce_sum.extend((loss * transcript).sum(1).tolist())
        out.ce_tokens.extend(transcript.sum(1).tolist())
        out.prompt_ce_sum.extend((loss * prompt).sum(1).tolist())
        out.prompt_tokens.extend(prompt.sum(1).tolist())
    return out


def token_nll(whisper: WhisperForConditionalGeneration, batches: Iterable[Mapping]) -> float:
    """Teacher-forced cross-entropy per label token (nats), every label token counted (prompt too)."""
    scored = token_nll_per_utterance(whisper, batches)
    count = sum(scored.ce_tokens) + sum(scored.prompt_tokens)
    if count == 0:
        raise ValueError("no label tokens to score: every label is padding (-100)")
    return (sum(scored.ce_sum) + sum(scored.prompt_ce_sum)) / count
