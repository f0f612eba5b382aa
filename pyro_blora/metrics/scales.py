"""Summaries of posterior standard deviations: quantiles per group, and distance to a target.

A mean-field posterior over adapter matrices has millions of scales; what tells whether it learnt
is how their distribution moves (per group: A or B, encoder or decoder) and how far it lies from
the scales the curvature says it should have (:mod:`pyro_blora.model.curvature`). Both work on
plain ``{site name: tensor}`` dictionaries, so they read a guide, a saved posterior or a checkpoint.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

__all__ = ["QUANTILES", "scale_group", "scale_quantiles", "log_ratio_summary"]

# The quantiles logged per group: the bulk and both tails.
QUANTILES: tuple[float, ...] = (0.05, 0.5, 0.95)


def scale_group(site: str) -> str:
    """``encoder.A``, ``decoder.B``, ...: where an adapter site sits and which matrix it is."""
    part = "encoder" if ".encoder." in site else "decoder" if ".decoder." in site else "other"
    return f"{part}.{site.rsplit('_', 1)[-1]}"


def _grouped(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for site, value in values.items():
        groups.setdefault(scale_group(site), []).append(value.detach().float().flatten().cpu())
    return {name: torch.cat(parts) for name, parts in sorted(groups.items())}


def _quantiles(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[float]:
    # torch.quantile refuses tensors above 2**24 entries; a sorted copy has no such limit.
    ordered = values.sort().values
    last = ordered.numel() - 1
    return [float(ordered[round(q * last)]) for q in quantiles]


def scale_quantiles(stddevs: Mapping[str, torch.Tensor], quantiles: tuple[float, ...] = QUANTILES,
                    prefix: str = "sigma") -> dict[str, float]:
    """``{"sigma/encoder.A/q50": ..., ...}``: the quantiles of the scales of every group, flat,
    ready for a training log record."""
    out = {}
    for group, values in _grouped(stddevs).items():
        for q, value in zip(quantiles, _quantiles(values, quantiles)):
            out[f"{prefix}/{group}/q{round(100 * q):02d}"] = value
    return out


def log_ratio_summary(stddevs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                      within: float = 1.5) -> dict[str, float]:
    """How far the scales lie from their targets, over every entry: the median and 90th percentile
    of |log(sigma / target)|, the median ratio, and the share of entries within a factor ``within``."""
    missing = [site for site in stddevs if site not in targets]
    if missing:
        raise KeyError(f"no target scale for {len(missing)} sites, e.g. {missing[0]!r}")
    ratio = torch.cat([(stddevs[s].detach().double().flatten().cpu() / targets[s].detach().double().flatten().cpu())
                       for s in stddevs])
    distance = ratio.log().abs()
    median, p90 = _quantiles(distance, (0.5, 0.9))
    return {
        "median_abs_log_ratio": median,
        "p90_abs_log_ratio": p90,
        "median_ratio": _quantiles(ratio, (0.5,))[0],
        "share_within": float((distance <= math.log(within)).double().mean()),
        "within": within,
    }
