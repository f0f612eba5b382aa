"""The beta-scaled ELBO: how the likelihood and the KL are normalised, and both terms separately.

The textbook ELBO for N utterances with token sequences y_n is

    ELBO = sum_n sum_t log p(y_nt | x_n, W) - KL(q(A, B) || p(A, B)),

estimated on a mini-batch of B utterances by scaling the batch likelihood by N / B (the
``pyro.plate`` over utterances does that). With sigma_p = 0.01 and a million adapter entries the
KL is of order 1e6-1e7 nats against a few nats of likelihood per token, and the posterior
collapses onto the prior. The normalisation is therefore an explicit option; the loss minimised is

    "dataset":    sum-NLL(data) + beta * KL                       (the textbook ELBO)
    "token":      [sum-NLL(data) + beta * KL] / T                 (T = number of training tokens)
    "parameter":  sum-NLL(data) / T + beta * KL / P               (P = number of adapter entries)
    "matrix":     sum-NLL(data) / T + beta * sum_m KL_m / P_m      (m: adapter matrices, P_m their entries)

"matrix" is the normalisation of the paper's authors' code. With M matrices of equal size it is M
times "parameter" at the same beta: on Whisper base, q/k (M = 72 matrices of 16,384 entries) makes
the paper's beta = 0.5 equal to beta = 36 under "parameter"; all linear layers (M = 192, matrices of
16,384 or 65,536 entries, P = 4,325,376) put the equivalent between 33 and 132.

"token" has the same optimum as "dataset" (it only rescales the loss, which Adam all but ignores);
under it beta keeps its textbook meaning. Under "parameter" beta weighs the average KL per adapter
entry against the average NLL per token, which is far weaker. The model and the guide read the
two factors from one :class:`ElboScaling`; nothing else scales the objective.

The teacher-forced cross-entropy lives here too (:func:`token_cross_entropy`): it is the
likelihood term without the Pyro machinery, and training, evaluation, the forgetting budget and
pruning all score tokens through it, so they agree on which tokens count and how.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Protocol

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora.config import BLoRAConfig, ElboScaling
from pyro_blora.data.collate import IGNORE_INDEX  # the collator pads labels with it; no token is scored there

__all__ = [
    "IGNORE_INDEX",
    "ElboScaling",
    "ElboTerms",
    "KLWeights",
    "TokenScope",
    "UtteranceNLL",
    "analytic_kl",
    "elbo_scaling",
    "elbo_terms",
    "language_detected",
    "language_token_ids",
    "logits_cross_entropy",
    "prompt_token_mask",
    "teacher_forced_logits",
    "token_cross_entropy",
    "token_nll",
    "token_nll_per_utterance",
]



class AdapterModel(Protocol):
    """What the ELBO needs of the model (a :class:`~pyro_blora.model.whisper.BLoRAWhisper`):
    called on a batch it is the Pyro model; the rest names and weighs its adapter sites."""

    def __call__(self, batch: Mapping) -> torch.Tensor: ...

    def site_names(self) -> list[str]: ...

    def site_prior(self, site: str) -> dist.Distribution: ...

    def kl_weights(self) -> dict[str, float]: ...


class AdapterPosterior(Protocol):
    """What the ELBO needs of the guide (a :class:`~pyro_blora.model.guide.BLoRAGuide`)."""

    def __call__(self, batch: Mapping) -> object: ...

    def posterior(self, site: str) -> dist.Distribution: ...


class KLWeights(Messenger):
    """Scales each named adapter site's log-density by its KL weight.

    Used around the model's adapter draws and around the whole guide, so log p and log q of a site
    carry the same factor and the KL term of the ELBO is weighted site by site. The guide's
    ``<site>_unconstrained`` draw takes its site's weight."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = weights

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        weight = self.weights.get(msg["name"].removesuffix("_unconstrained"))
        if weight is not None:
            msg["scale"] = weight * msg["scale"]


def elbo_scaling(config: BLoRAConfig, num_utterances: int, num_tokens: int, num_parameters: int) -> ElboScaling:
    """The factors for ``config.kl_normalization`` on a training set of the given size."""
    if num_tokens <= 0:
        raise ValueError(f"the training set has {num_tokens} label tokens; it needs at least one transcript")
    norm = config.kl_normalization
    if norm == "dataset":
        likelihood, kl = 1.0, config.beta
    elif norm == "token":
        likelihood, kl = 1.0 / num_tokens, config.beta / num_tokens
    elif norm == "parameter":
        likelihood, kl = 1.0 / num_tokens, config.beta / num_parameters
    else:  # "matrix": the per-matrix division is ElboScaling.site_weight's
        likelihood, kl = 1.0 / num_tokens, config.beta
    return ElboScaling(num_utterances=num_utterances, likelihood=likelihood, kl=kl, normalization=norm,
                       per_matrix=norm == "matrix", beta=config.beta)


@dataclass
class ElboTerms:
    """One ELBO estimate: loss = nll + kl, each already scaled as the objective says."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    num_tokens: int
    # What the loss is an average over (utterances for the ELBO, label tokens for a mean
    # cross-entropy): data-parallel ranks weight their gradients by it (pyro_blora.training.distributed).
    weight: float = 1.0

    def detached(self) -> dict[str, float]:
        return {name: float(torch.as_tensor(getattr(self, name)).detach()) for name in ("loss", "nll", "kl")}


def analytic_kl(model: AdapterModel, guide: AdapterPosterior) -> dict[str, torch.Tensor]:
    """Closed-form KL(q || p) of every adapter site, summed over its entries, unscaled (nats)."""
    return {
        site: torch.distributions.kl_divergence(guide.posterior(site), model.site_prior(site))
        for site in model.site_names()
    }


def _scored(name: str, site: dict) -> bool:
    """Sites that carry a density: samples, but not the plate's record of which rows it drew."""
    return not site_is_subsample(site)


def _scored_in_guide(adapter_sites: set[str]) -> Callable[[str, dict], bool]:
    """The guide's sites that carry a density, less the Delta that AutoNormal and AutoDelta put at
    each adapter site. The adapters' priors are Gaussian (support: the real line, so no Jacobian),
    so that Delta scores exactly log 1 + 0 = 0 at its own draw; skipping it saves a pass over every
    matrix and about ten operator calls per site. (A NaN draw still shows: its Normal is NaN.)"""
    def scored(name: str, site: dict) -> bool:
        return _scored(name, site) and not (name in adapter_sites and isinstance(site["fn"], dist.Delta))
    return scored


def _one_particle(model: AdapterModel, guide: Callable, batch: Mapping, monte_carlo_kl: bool):
    """(NLL, KL) of one draw from the guide, each scaled as its sites are.

    The guide is traced, the model replayed on its draws, and both densities computed site by site
    with every ``scale`` applied (the plate's N / B, the likelihood factor, the KL weights). The
    model's only plate has its dimension given (-1), so ``max_plate_nesting`` has nothing to place."""
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    if not monte_carlo_kl:  # the likelihood alone
        model_trace.compute_log_prob(lambda name, site: _scored(name, site) and site["is_observed"])
        return -sum(site["log_prob_sum"] for site in model_trace.nodes.values() if "log_prob_sum" in site), 0.0
    guide_trace.compute_log_prob(_scored_in_guide(set(model.site_names())))
    model_trace.compute_log_prob(_scored)
    nll = 0.0
    log_q = {name: site["log_prob_sum"] for name, site in guide_trace.nodes.items()
             if site["type"] == "sample" and not site["is_observed"] and "log_prob_sum" in site}
    site_kl = []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not _scored(name, site):
            continue
        if site["is_observed"]:
            nll = nll - site["log_prob_sum"]
            continue
        # log q - log p site by site (AutoNormal's density sits at "<site>_unconstrained"), so a
        # prior equal to the posterior gives exactly 0 rather than a difference of large sums.
        q = [log_q.pop(key) for key in (name, f"{name}_unconstrained") if key in log_q]
        site_kl.append(sum(q[1:], q[0]) - site["log_prob_sum"] if q else -site["log_prob_sum"])
    site_kl.extend(log_q.values())
    return nll, torch.stack(site_kl).sum() if site_kl else 0.0


def elbo_terms(
    model: AdapterModel,
    guide: AdapterPosterior,
    batch: dict,
    estimator: Literal["trace", "analytic"] = "trace",
    num_particles: int = 1,
) -> ElboTerms:
    """Estimate the scaled negative ELBO and its two terms in one forward pass per particle.

    ``"trace"`` is exactly ``Trace_ELBO().differentiable_loss`` (a single-sample Monte Carlo KL);
    ``"analytic"`` keeps the sampled likelihood and uses the closed-form Gaussian KL, which is what a
    mean-field ELBO would do if AutoNormal exposed its Normal at the latent site (it exposes a
    Delta of the sampled value, so Pyro's TraceMeanField_ELBO can only make the entropy analytic).
    """
    if estimator not in ("trace", "analytic"):
        raise ValueError(f"estimator must be 'trace' or 'analytic', got {estimator!r}")
    nll = kl = 0.0
    for _ in range(num_particles):
        nll_particle, kl_particle = _one_particle(model, guide, batch, monte_carlo_kl=estimator == "trace")
        nll = nll + nll_particle / num_particles
        kl = kl + kl_particle / num_particles
    if estimator == "analytic":
        weights = model.kl_weights()
        kl = sum(weights[site] * value for site, value in analytic_kl(model, guide).items())
    num_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    return ElboTerms(loss=nll + kl, nll=nll, kl=kl, num_tokens=num_tokens, weight=float(batch["labels"].shape[0]))


# ------------------------------------------------------------- teacher-forced cross-entropy
def teacher_forced_logits(whisper, batch: Mapping) -> torch.Tensor:
    """Decoder logits with the labels, shifted right behind the start token, as decoder input."""
    config = whisper.config
    decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
    return whisper(input_features=batch["input_features"], decoder_input_ids=decoder_input_ids).logits


def token_cross_entropy(whisper, batch: Mapping, reduction: Literal["none", "mean"] = "none") -> torch.Tensor:
    """Teacher-forced cross-entropy (nats) of the label tokens, computed in float32 whatever the
    model's dtype, padding (``IGNORE_INDEX``) skipped.

    ``"none"``: one value per label position (0 at padding); ``"mean"``: the mean over every label
    token of the batch, the loss of the methods without a prior. Differentiable."""
    return logits_cross_entropy(teacher_forced_logits(whisper, batch), batch["labels"], reduction)


def logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         reduction: Literal["none", "mean"] = "none") -> torch.Tensor:
    """:func:`token_cross_entropy` of logits already computed."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                             reduction=reduction)


def language_token_ids(whisper) -> torch.Tensor | None:
    """The language tokens of a multilingual model (None for an English-only one)."""
    lang_to_id = getattr(getattr(whisper, "generation_config", None), "lang_to_id", None)
    return torch.tensor(sorted(lang_to_id.values())) if lang_to_id else None


def language_detected(logits: torch.Tensor, labels: torch.Tensor, languages: torch.Tensor | None) -> list[bool]:
    """Per row, whether the language the model detects, the language token it ranks first after
    <|startoftranscript|> (what ``detect_language`` reads, here from teacher-forced logits), is the
    row's own (its first label). Empty when the model or the labels have no language tokens."""
    if languages is None or labels.shape[1] == 0:
        return []
    languages = languages.to(labels.device)
    first = labels[:, 0]
    if not torch.isin(first, languages).all():
        return []
    detected = languages[logits[:, 0, languages].argmax(-1)]
    return (detected == first).tolist()


def prompt_token_mask(labels: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The forced prompt tokens (language, task, no-timestamps) of the labels: Whisper's special
    tokens follow the end-of-text token in the vocabulary. Transcript tokens are the other
    non-padding ones: the text and the end-of-text token."""
    return labels > eos_token_id


TokenScope = Literal["all", "transcript", "prompt"]


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
    # Whether each utterance's language is the one detected (:func:`language_detected`); empty where the
    # model or the labels have no language tokens.
    language_kept: list[bool] = field(default_factory=list)

    def totals(self, tokens: TokenScope = "all") -> tuple[float, int]:
        """(summed cross-entropy, number of tokens) of one kind of token over every utterance."""
        transcript = (sum(self.ce_sum), sum(self.ce_tokens))
        prompt = (sum(self.prompt_ce_sum), sum(self.prompt_tokens))
        if tokens == "transcript":
            return transcript
        if tokens == "prompt":
            return prompt
        return transcript[0] + prompt[0], transcript[1] + prompt[1]

    def mean(self, tokens: TokenScope = "all") -> float:
        """Cross-entropy (nats) per token of one kind, over every utterance together."""
        total, count = self.totals(tokens)
        if count == 0:
            kind = "label tokens to score: every label is padding (-100)" if tokens == "all" else f"{tokens} tokens"
            raise ValueError(f"no {kind}")
        return total / count


@torch.no_grad()
def token_nll_per_utterance(whisper, batches: Iterable[Mapping]) -> UtteranceNLL:
    """Summed cross-entropy (nats, summed in float64) and token counts of every label row,
    transcript and prompt apart (:func:`prompt_token_mask`), and whether each utterance's language is
    detected, from the same logits; batches are moved to the model's device. Rows are named by the
    batch's ``ids`` (their positions when it has none)."""
    device = next(whisper.parameters()).device
    languages = language_token_ids(whisper)
    out = UtteranceNLL([], [], [], [], [])
    for batch in batches:
        labels = batch["labels"].to(device)
        logits = teacher_forced_logits(whisper, {"input_features": batch["input_features"].to(device),
                                                 "labels": labels})
        loss = logits_cross_entropy(logits, labels).double()
        out.language_kept.extend(language_detected(logits, labels, languages))
        prompt = prompt_token_mask(labels, whisper.config.eos_token_id)
        transcript = (labels != IGNORE_INDEX) & ~prompt
        out.ids.extend(batch.get("ids") or [str(len(out.ids) + row) for row in range(labels.shape[0])])
        out.ce_sum.extend((loss * transcript).sum(1).tolist())
        out.ce_tokens.extend(transcript.sum(1).tolist())
        out.prompt_ce_sum.extend((loss * prompt).sum(1).tolist())
        out.prompt_tokens.extend(prompt.sum(1).tolist())
    if len(out.language_kept) != len(out.ids):  # some rows without a language token: none is reported
        out.language_kept.clear()
    return out


def token_nll(whisper, batches: Iterable[Mapping], tokens: TokenScope = "all") -> float:
    """Teacher-forced cross-entropy per token (nats) of ``batches``: every label token counted
    (prompt too) by default, or only the ``"transcript"`` or ``"prompt"`` ones."""
    return token_nll_per_utterance(whisper, batches).mean(tokens)
