"""Continual-learning metrics of an error matrix: ``matrix[i][j]`` is the error on domain j after
step i of a sequence (row 0: the start model); ``learned_at[j]`` is the step domain j was learned at
(0 for domains the start model already knew)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["average_final", "backward_transfer", "forgetting", "sequence_metrics"]


def average_final(matrix: Sequence[Sequence[float]]) -> float:
    """Mean error over every evaluated domain after the last step."""
    return float(np.mean(matrix[-1]))


def backward_transfer(matrix: Sequence[Sequence[float]], learned_at: Sequence[int]) -> float:
    """BWT: the mean, over domains learned before the last step, of error after the last step minus
    error right after the domain was learned (original domains: minus the start model's error).

    Sign convention for error rates (and CE): positive = forgetting, negative = later steps helped.
    ``matrix[i][j]`` is the error on domain j after step i (row 0: the start model)."""
    last = len(matrix) - 1
    changes = [matrix[last][j] - matrix[t][j] for j, t in enumerate(learned_at) if t < last]
    return float(np.mean(changes)) if changes else math.nan


def forgetting(matrix: Sequence[Sequence[float]], learned_at: Sequence[int]) -> list[float | None]:
    """Per domain: error after the last step minus the best (lowest) error it had from the step it was
    learned up to the step before last; None for the domain learned at the last step. Positive = forgotten."""
    last = len(matrix) - 1
    return [None if t >= last else float(matrix[last][j] - min(matrix[i][j] for i in range(t, last)))
            for j, t in enumerate(learned_at)]


def sequence_metrics(matrix: Sequence[Sequence[float]], columns: Sequence[str], learned_at: Sequence[int]) -> dict[str, Any]:
    """Average final error, BWT and forgetting per domain of one matrix."""
    return {
        "average_final": average_final(matrix),
        "bwt": backward_transfer(matrix, learned_at),
        "forgetting": dict(zip(columns, forgetting(matrix, learned_at))),
    }
