"""How concentrated adapter weights and weight updates (ΔW) are.

Every statistic takes one tensor or array, an iterable of them, or a mapping such as a state
dict (its values are used); all entries are flattened and pooled into one vector w of n values.

- `thresh_fraction`: fraction of entries with |w| < threshold (1e-3 by default, "Thresh@1e-3").
- `adaptive_thresh_fraction`: fraction of entries with |w| < factor · mean|w| (factor 0.5). It
  measures the same thing relative to the tensor's own scale, so it is scale invariant.
- `top_energy_share`: share of the squared energy Σw² held by the largest ⌈fraction · n⌉ entries
  by |w| (fraction 0.01, "top 1%"). It lies in [⌈fraction · n⌉ / n, 1].
- `hoyer_index`: (√n − ‖w‖₁/‖w‖₂) / (√n − 1), 0 for a constant-magnitude vector, 1 for a one-hot.
- `energy_curve`: the cumulative energy share against the fraction of entries, largest first.

Degenerate inputs: an empty input or a non-finite entry raises ValueError. The scale-free
statistics (adaptive fraction, top energy share, Hoyer index, energy curve) are undefined for an
all-zero input, such as ΔW of a LoRA layer whose B starts at zero, and return nan; the absolute
threshold fraction is then 1.0. The Hoyer index of a single entry is also nan (√n − 1 = 0).
Sums are accumulated in float64, and squared entries are taken after dividing by the largest
magnitude, so tiny or huge weights neither underflow nor overflow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Union

import numpy as np
import torch

__all__ = [
    "SparsityStats",
    "WeightsLike",
    "adaptive_thresh_fraction",
    "energy_curve",
    "flatten_weights",
    "hoyer_index",
    "sparsity_report",
    "thresh_fraction",
    "top_energy_share",
]

WeightsLike = Union[torch.Tensor, np.ndarray, Mapping[Any, Any], Iterable[Any]]


def flatten_weights(weights: WeightsLike) -> torch.Tensor:
    """Pool all entries into one detached 1-D floating tensor on the CPU."""
    if isinstance(weights, Mapping):
        parts = list(weights.values())
    elif isinstance(weights, (torch.Tensor, np.ndarray)):
        parts = [weights]
    elif isinstance(weights, Iterable) and not isinstance(weights, (str, bytes)):
        parts = list(weights)
    else:
        raise TypeError(
            f"expected a tensor, an array, or an iterable or mapping of them, got {type(weights).__name__}"
        )
    # Non-tensors go through numpy so that Python floats stay float64 (torch would pick float32).
    tensors = [part if isinstance(part, torch.Tensor) else torch.as_tensor(np.asarray(part)) for part in parts]
    flat = [tensor.detach().cpu().reshape(-1) for tensor in tensors]
    if not flat or sum(part.numel() for part in flat) == 0:
        raise ValueError("no weights to measure: the input holds no entries")
    values = torch.cat(flat)
    if not values.is_floating_point():
        values = values.to(torch.float64)
    elif values.dtype in (torch.float16, torch.bfloat16):
        values = values.to(torch.float32)
    if not torch.isfinite(values).all():
        raise ValueError("weights contain nan or inf; sparsity statistics need finite values")
    return values


def _check_positive(name: str, value: float, upper: float | None = None) -> None:
    if not (value > 0 and math.isfinite(value)) or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "positive and finite"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def thresh_fraction(weights: WeightsLike, threshold: float = 1e-3) -> float:
    """Fraction of entries whose magnitude is below an absolute threshold."""
    _check_positive("threshold", threshold)
    magnitudes = flatten_weights(weights).abs()
    return (magnitudes < threshold).to(torch.float64).mean().item()


def adaptive_thresh_fraction(weights: WeightsLike, factor: float = 0.5) -> float:
    """Fraction of entries with |w| < factor · mean|w|; nan when every entry is zero."""
    _check_positive("factor", factor)
    magnitudes = flatten_weights(weights).abs()
    mean_magnitude = magnitudes.sum(dtype=torch.float64) / magnitudes.numel()
    if mean_magnitude == 0:
        return math.nan
    return (magnitudes.to(torch.float64) < factor * mean_magnitude).to(torch.float64).mean().item()


def _top_count(n: int, fraction: float) -> int:
    # Rounding first keeps 0.01 · 300 (= 3.0000000000000004 in floating point) at 3 entries.
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def _scaled_to_unit_max(values: torch.Tensor) -> torch.Tensor | None:
    """Flattened entries in float64 divided by the largest magnitude, or None when all are zero.

    The statistics that square entries are scale invariant, so this changes none of them, and it
    keeps squares of very small or very large weights from underflowing to 0 or overflowing to inf.
    """
    values = values.to(torch.float64)
    largest = values.abs().max()
    return None if largest == 0 else values / largest


def top_energy_share(weights: WeightsLike, fraction: float = 0.01) -> float:
    """Share of Σw² held by the largest ⌈fraction · n⌉ entries; nan when every entry is zero."""
    _check_positive("fraction", fraction, upper=1.0)
    values = _scaled_to_unit_max(flatten_weights(weights))
    if values is None:
        return math.nan
    energy = values.square()
    total = energy.sum()
    top = torch.topk(energy, _top_count(energy.numel(), fraction), sorted=False).values
    return min(1.0, (top.sum() / total).item())


def hoyer_index(weights: WeightsLike) -> float:
    """Hoyer sparsity in [0, 1]; nan for an all-zero input or a single entry."""
    values = _scaled_to_unit_max(flatten_weights(weights))
    if values is None or values.numel() == 1:
        return math.nan
    n = values.numel()
    l1, l2 = values.abs().sum(), torch.linalg.vector_norm(values)
    root_n = math.sqrt(n)
    index = (root_n - (l1 / l2).item()) / (root_n - 1)
    return min(1.0, max(0.0, index))


def energy_curve(weights: WeightsLike, max_points: int | None = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of entries, cumulative share of Σw²), largest entries first, starting at (0, 0).

    With more than `max_points` entries the curve is thinned to about that many evenly spaced
    points (the end points are kept); None keeps all n + 1 points. Shares are nan when every
    entry is zero.
    """
    if max_points is not None and (not isinstance(max_points, int) or max_points < 2):
        raise ValueError(f"max_points must be an integer >= 2 or None, got {max_points!r}")
    flat = flatten_weights(weights)
    n = flat.numel()
    values = _scaled_to_unit_max(flat)
    if values is None:
        shares = np.full(n + 1, np.nan)
    else:
        energy = torch.sort(values.square(), descending=True).values
        cumulative = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
        shares = (cumulative / cumulative[-1]).numpy()
    fractions = np.arange(n + 1, dtype=np.float64) / n
    if max_points is not None and n + 1 > max_points:
        keep = np.unique(np.linspace(0, n, max_points).round().astype(np.int64))
        fractions, shares = fractions[keep], shares[keep]
    return fractions, shares


@dataclass(frozen=True)
class SparsityStats:
    """The four sparsity statistics of one pool of weights, with the settings they used."""

    n: int
    thresh_fraction: float
    adaptive_thresh_fraction: float
    top_energy_share: float
    hoyer_index: float
    threshold: float = 1e-3
    adaptive_factor: float = 0.5
    top_fraction: float = 0.01

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def sparsity_report(
    weights: WeightsLike,
    *,
    threshold: float = 1e-3,
    adaptive_factor: float = 0.5,
    top_fraction: float = 0.01,
) -> SparsityStats:
    """All sparsity statistics of the pooled entries of `weights`."""
    values = flatten_weights(weights)
    return SparsityStats(
        n=values.numel(),
        thresh_fraction=thresh_fraction(values, threshold),
        adaptive_thresh_fraction=adaptive_thresh_fraction(values, adaptive_factor),
        top_energy_share=top_energy_share(values, top_fraction),
        hoyer_index=hoyer_index(values),
        threshold=threshold,
        adaptive_factor=adaptive_factor,
        top_fraction=top_fraction,
    )
