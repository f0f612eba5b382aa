"""Token- and word-level confidence from next-token distributions, and temperature scaling.

Entropy confidence (Laptev & Ginsburg, arXiv 2212.08703): a token's confidence is its next-token
distribution's Tsallis entropy H_a = (1 - sum p^a) / (a - 1), mapped to [0, 1] by the exponential
normalisation (exp(-H_a) - exp(-H_max)) / (1 - exp(-H_max)), H_max the entropy of the uniform
distribution over the vocabulary (a = 1: Gibbs entropy). It sees the whole distribution, not just the
chosen token's probability, which is why that work finds it flags errors better than max-probability.
A word's confidence aggregates those of the tokens that spell it (minimum by default).

Temperature scaling: one scalar T, fitted on a dev set by minimising the teacher-forced NLL of the
references under softmax(logits / T); the temperature-scaled baselines score test hypotheses under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from pyro_blora.predict.transcripts import word_keys

__all__ = [
    "DEFAULT_TEMPERATURES",
    "TemperatureFit",
    "entropy_confidence",
    "fit_temperature",
    "temperature_nll",
    "word_entropy_confidences",
    "word_token_groups",
]

# Candidate temperatures of the dev fit (about 3% apart; the minimum is refined between grid points).
DEFAULT_TEMPERATURES = tuple(np.geomspace(0.25, 4.0, 97).tolist())


# Gibbs entropy. arXiv 2212.08703 found Tsallis alpha 1/3 best, on vocabularies of about a thousand
# tokens; on Whisper's 51,865 the tail's sum of p^(1/3) makes H_1/3 tens to hundreds, so exp(-H)
# underflows and every word scores 0 (RESULTS "Monte Carlo uncertainty": AUROC 0.50 at 1/3, 0.92 at 1).
DEFAULT_ENTROPY_ALPHA = 1.0


def entropy_confidence(log_probs: torch.Tensor, alpha: float = DEFAULT_ENTROPY_ALPHA) -> torch.Tensor:
    """Exponentially normalised Tsallis-entropy confidence of each distribution (last dim: vocabulary):
    1 for a one-hot distribution, 0 for the uniform one."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (1: Gibbs entropy, the default; 1/3: the paper's Tsallis), got {alpha}")
    log_probs = log_probs.float()
    vocab = log_probs.shape[-1]
    if alpha == 1.0:
        entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1)
        largest = math.log(vocab)
    else:
        entropy = (1 - (log_probs * alpha).exp().sum(-1)) / (alpha - 1)
        largest = (vocab ** (1 - alpha) - 1) / (1 - alpha)
    floor = math.exp(-largest)
    return ((torch.exp(-entropy) - floor) / (1 - floor)).clamp(0.0, 1.0)


def word_token_groups(tokenizer, token_ids: Sequence[int], language: str | None = None) -> tuple[list[str], list[list[int]]]:
    """The words of the decoded text (as :func:`~pyro_blora.predict.transcripts.word_keys` splits it) and, for
    each, the positions of the tokens that spell it. A token ending inside a multi-byte character, or
    holding only a space, belongs with the token after it."""
    ids = [int(i) for i in token_ids]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    ends = []
    for position in range(len(ids)):
        prefix = tokenizer.decode(ids[:position + 1], skip_special_tokens=True)
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        ends.append(common)
    offset = len(full) - len(full.lstrip())
    words, _ = word_keys(full.strip(), language)
    spans, cursor = [], 0
    for word in words:
        start = full.find(word, offset + cursor)
        if start < 0:
            raise ValueError(f"word {word!r} not found in the decoded text {full!r}")
        spans.append((start, start + len(word)))
        cursor = start + len(word) - offset
    groups: list[list[int]] = [[] for _ in words]
    pending: list[int] = []
    previous_end = 0
    for position, end in enumerate(ends):
        if not full[previous_end:end].strip():  # no complete character yet, or only a space: goes with the next
            pending.append(position)
            previous_end = max(previous_end, end)
            continue
        for index, (start, stop) in enumerate(spans):
            if start < end and previous_end < stop:
                groups[index].extend(pending + [position])
                pending = []
        pending, previous_end = [], end
    if pending and groups:  # trailing spaces or an unfinished character: the last word
        groups[-1].extend(pending)
    return words, groups


def word_entropy_confidences(tokenizer, token_ids: Sequence[int], token_confidences: Sequence[float],
                             language: str | None = None,
                             aggregate: Literal["min", "mean", "prod"] = "min") -> list[float]:
    """One confidence per word of the decoded ``token_ids``: ``aggregate`` of its tokens' confidences."""
    if len(token_ids) != len(token_confidences):
        raise ValueError(f"got {len(token_ids)} tokens but {len(token_confidences)} confidences")
    reduce = {"min": min, "mean": lambda v: sum(v) / len(v), "prod": math.prod}
    if aggregate not in reduce:
        raise ValueError(f"aggregate must be one of {sorted(reduce)}, got {aggregate!r}")
    _, groups = word_token_groups(tokenizer, token_ids, language)
    return [reduce[aggregate]([float(token_confidences[i]) for i in group]) if group else 0.0 for group in groups]


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """Summed NLL of ``labels`` (N,) under softmax(logits / T), logits (N, V), for each T: shape (K,)."""
    logits = logits.float()
    chosen = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return torch.stack([(torch.logsumexp(logits / t, dim=-1) - chosen / t).sum() for t in temperatures])


@dataclass(frozen=True)
class TemperatureFit:
    """The fitted temperature and what it does to the dev NLL (nats per token)."""

    temperature: float
    # Dev NLL at the best grid point, and unscaled.
    nll: float
    nll_at_one: float
    tokens: int


def fit_temperature(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> TemperatureFit:
    """The T minimising the dev NLL, from (logits (N, V), labels (N,)) batches of transcript tokens.

    One pass: the NLL is summed at every candidate T (the grid must contain 1), and the best grid
    point is refined by a parabola through it and its neighbours in log T (the NLL is smooth there)."""
    grid = sorted(float(t) for t in temperatures)
    if 1.0 not in grid or any(t <= 0 for t in grid):
        raise ValueError("temperatures must be positive and contain 1.0 (the unscaled model)")
    total, tokens = torch.zeros(len(grid), dtype=torch.float64), 0
    for logits, labels in batches:
        total += temperature_nll(logits, labels, grid).double().cpu()
        tokens += int(labels.numel())
    if tokens == 0:
        raise ValueError("no dev tokens to fit a temperature on; give dev utterances with transcripts")
    nll = (total / tokens).numpy()
    best = int(nll.argmin())
    temperature = grid[best]
    if 0 < best < len(grid) - 1:
        x = np.log(grid[best - 1:best + 2])
        a, b, _ = np.polyfit(x, nll[best - 1:best + 2], 2)
        if a > 0:
            temperature = float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))
    return TemperatureFit(temperature, float(nll[best]), float(nll[grid.index(1.0)]), tokens)
