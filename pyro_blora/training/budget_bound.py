"""What the forgetting budget constrains: the upper confidence bound of the retention CE's change.

:func:`retention_bound` is the one place where a budget meets measured losses. The dual ascent on
beta (blora, map), early stopping (lora, full), the scale chosen at the end of a run and the
post-hoc lambda of ``evaluate`` / ``export`` / ``frontier --retain-budget`` all call it, so they
agree on the same losses. It pairs every retention utterance's summed transcript-token CE with the
base model's on the same utterance (measured once per run, then cached) and bounds the change with
:func:`pyro_blora.metrics.retention_bound.ratio_upper_bound`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pyro_blora.config import RetentionBudget
from pyro_blora.metrics.retention_bound import ratio_upper_bound
from pyro_blora.model.objective import token_nll_per_utterance

__all__ = ["RetentionBound", "RetentionLosses", "far_above_limit", "far_from_limit", "retention_bound",
           "retention_losses", "retention_name"]


@dataclass
class RetentionLosses:
    """Summed transcript-token CE (nats) and transcript tokens of every retention utterance."""

    ids: list[str]
    ce_sum: list[float]
    tokens: list[int]
    # Whether each utterance's own language is the one detected; None for an English-only model (and in
    # losses cached before it was measured).
    language_kept: list[bool] | None = None

    @property
    def ce(self) -> float:
        return sum(self.ce_sum) / sum(self.tokens)

    @property
    def languages_kept(self) -> int | None:
        """How many utterances keep their language ID (None where it was not measured)."""
        return None if self.language_kept is None else sum(self.language_kept)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention_losses(whisper, batches: Sequence[Mapping], precision: str = "fp32") -> RetentionLosses:
    """One CE-only forward pass over the retention batches, per utterance (the prompt left out), in
    ``precision`` ("fp32", or "bf16" autocast; :attr:`RetentionBudget.precision`); the language ID of
    each utterance comes from the same logits, for the line (a CE budget does not constrain it)."""
    device = next(whisper.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = token_nll_per_utterance(whisper, batches)
    if sum(out.ce_tokens) == 0:
        raise ValueError("the retention batch has no transcript tokens (every label is prompt or padding); "
                         "give retention utterances with transcripts, or none so that the base model labels them")
    return RetentionLosses(list(out.ids), list(out.ce_sum), [int(t) for t in out.ce_tokens],
                           [bool(k) for k in out.language_kept] or None)


@dataclass(frozen=True)
class RetentionBound:
    """A model's retention CE against the base model's on the same utterances, and the budget's verdict."""

    budget: float
    kind: str
    confidence: float
    utterances: int
    base_ce: float
    ce: float              # point estimate, nats per transcript token
    ce_upper: float        # its one-sided upper confidence bound
    change: float          # relative change of the CE against the base model
    change_upper: float    # its upper bound: what the budget holds
    limit: float           # the highest CE (nats per token) allowed
    inside: bool
    name: str = "retention"
    # Utterances whose language the model detects, and the base model's (None: not measured). Reported,
    # not constrained: a budget on CE can keep the CE while language ID falls.
    language_kept: int | None = None
    base_language_kept: int | None = None

    def line(self) -> str:
        """The verdict in the user's words, e.g. "English CE +1.2% (95% upper bound +2.7%, 128
        utterances): inside the 3% budget; language ID right on 120 of 128 (base model 126)"."""
        if self.kind == "relative":
            measured = f"{self.name} CE {100 * self.change:+.1f}% ({100 * self.confidence:g}% upper bound " \
                       f"{100 * self.change_upper:+.1f}%, {self.utterances} utterances)"
            budget = f"the {100 * self.budget:g}% budget"
        else:
            measured = f"{self.name} CE {self.ce:.4f} nats per token ({100 * self.confidence:g}% upper bound " \
                       f"{self.ce_upper:.4f}, {self.utterances} utterances, base {self.base_ce:.4f})"
            budget = f"the budget of {self.budget:g} nats per token"
        verdict = f"{measured}: {'inside' if self.inside else 'OUTSIDE'} {budget}"
        if self.language_kept is None:
            return verdict
        base = "" if self.base_language_kept is None else f" (base model {self.base_language_kept})"
        return f"{verdict}; language ID right on {self.language_kept} of {self.utterances}{base}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def retention_bound(budget: RetentionBudget, losses: RetentionLosses, base: RetentionLosses,
                    name: str = "retention") -> RetentionBound:
    """The budget's verdict on ``losses`` against the base model's ``base`` on the same utterances:
    the relative change of the CE, its upper bound at ``budget.confidence`` (paired ratio estimator)
    and whether that bound is inside the budget (for an absolute budget: the CE's own upper bound)."""
    if losses.ids != base.ids or losses.tokens != base.tokens:
        raise ValueError("the retention losses and the base model's are not on the same utterances and labels; "
                         "measure both on one retention set (delete a stale retention-base-losses.json)")
    change = ratio_upper_bound(losses.ce_sum, base.ce_sum, budget.confidence)
    if budget.kind == "relative":
        ce_upper = base.ce * change.upper
    else:
        ce_upper = ratio_upper_bound(losses.ce_sum, base.tokens, budget.confidence).upper
    limit = budget.limit(base.ce)
    return RetentionBound(budget.budget, budget.kind, budget.confidence, len(losses.ids), base.ce, losses.ce,
                          ce_upper, change.estimate - 1, change.upper - 1, limit, ce_upper <= limit, name,
                          losses.languages_kept, base.languages_kept)


def far_from_limit(bound: RetentionBound, fraction: float) -> bool:
    """The upper bound has used less than ``fraction`` of the CE increase the budget allows."""
    allowed = bound.limit - bound.base_ce
    return allowed > 0 and bound.ce_upper - bound.base_ce < fraction * allowed


def far_above_limit(bound: RetentionBound, fraction: float) -> bool:
    """The upper bound has used more than ``1 / fraction`` times the CE increase the budget allows
    (twice it at 0.5): the mirror image of :func:`far_from_limit`."""
    allowed = bound.limit - bound.base_ce
    return allowed > 0 and bound.ce_upper - bound.base_ce > allowed / fraction


def retention_name(source: str | Path | None) -> str:
    """What the user calls the retention set: the language of a folder named by its code
    (``testbed/en``, ``en-spontaneous``: English), else the folder's name."""
    if source is None:
        return "retention"
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    stem = Path(str(source).rstrip("/")).name
    if stem in ("metadata.csv", "") or "." in stem:
        stem = Path(str(source).rstrip("/")).parent.name or stem
    head, _, rest = stem.partition("-")
    if head in LANGUAGES and rest not in LANGUAGES:
        return LANGUAGES[head].title()
    return stem or "retention"
