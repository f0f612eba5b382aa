"""Has the posterior learnt? Its scales against the curvature optimum, and a settled KL.

A mean-field posterior whose scales still sit where they started has not been fitted, whatever its
means did: Adam moves each raw scale by about the learning rate per step, so at 1e-3 for 150 steps a
scale changes by at most ~16%. This module measures the curvature of the likelihood at the posterior
mean (:mod:`pyro_blora.model.curvature`), the scales sigma* it calls for, and judges convergence by a
stated rule (:data:`RULE`), written into the run's ``result.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import load_for_transcription, read_log, read_run_config, weights_folder
from pyro_blora.metrics.scales import log_ratio_summary, scale_group
from pyro_blora.model.curvature import diagonal_fisher, optimal_scales
from pyro_blora.model.encoder_window import encoder_input_frames
from pyro_blora.model.objective import analytic_kl
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.training.loop import batch_order, count_label_tokens, make_batch

__all__ = [
    "HISTOGRAM_EDGES",
    "RULE",
    "curvature_batches",
    "curvature_scales",
    "kl_change",
    "pinned_by_data",
    "posterior_convergence",
    "site_prior_scales",
    "RunCurvature",
    "run_convergence",
    "run_curvature",
    "weighted_kl",
    "weighted_kl_of_means",
]

# The rule, in words (also written into result.json). 90% of the entries, not the median: the
# authors' start (softplus(rho), rho ~ U(-5.5, -4.5)) already has a median within 1.5x of sigma_p,
# which is sigma* wherever the data do not pin an entry.
RULE = ("converged if 90% of posterior scales lie within a factor 1.5 of sigma* (the curvature optimum at "
        "the posterior mean) and the analytic KL term changed by less than 2% over the last fifth of training")
WITHIN = 1.5
KL_TOLERANCE = 0.02
# Bins of log10(sigma / sigma*) for the histograms kept in result.json (the end bins take the tails).
HISTOGRAM_EDGES: tuple[float, ...] = tuple(round(-1.5 + 0.1 * i, 1) for i in range(31))


def weighted_kl(model: BLoRAWhisper, guide) -> float:
    """The KL term of the objective as it is weighted now, in closed form (no Monte Carlo noise)."""
    weights = model.kl_weights()
    with torch.no_grad():
        return float(sum(weights[site] * value for site, value in analytic_kl(model, guide).items()))


def weighted_kl_of_means(model: BLoRAWhisper, guide) -> float:
    """The part of :func:`weighted_kl` that the means alone make, sum w (mu - m)^2 / (2 sigma_p^2); the rest is
    the scales'. Early in training it is dominated by A's Kaiming-uniform start, several sigma_p wide,
    which the prior pulls in slowly: a KL still falling may be the means, not the scales."""
    weights = model.kl_weights()
    total = 0.0
    with torch.no_grad():
        for site, mean in guide.means().items():
            prior = model.site_prior(site).base_dist
            total += weights[site] * float(((mean - prior.loc) ** 2 / (2 * prior.scale**2)).sum())
    return total


def curvature_batches(dataset, collate_fn: Callable, batch_size: int, seed: int, count: int,
                      device: torch.device) -> list[dict[str, Any]]:
    """The first ``count`` mini-batches of the training order: what the curvature is measured on."""
    return [make_batch(dataset, collate_fn, batch_order(len(dataset), batch_size, seed, k), device)
            for k in range(count)]


def curvature_scales(model: BLoRAWhisper, means: Mapping[str, torch.Tensor], batches: Sequence[Mapping],
                     num_training_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """sigma* of every adapter entry around ``means``, from the Fisher diagonal on ``batches``."""
    generator = torch.Generator(device=next(model.whisper.parameters()).device).manual_seed(seed)
    fisher = diagonal_fisher(model, means, batches, generator=generator)
    return optimal_scales(model, fisher.per_token, num_training_tokens)


def kl_change(history: Sequence[Mapping[str, Any]], steps: int) -> float | None:
    """Relative change of the logged analytic KL over the last fifth of training (None: fewer than
    two dev points in it to judge by)."""
    points = [(r["step"], r["kl_analytic"]) for r in history if "kl_analytic" in r and r["step"] >= 0.8 * steps]
    if len(points) < 2:
        return None
    first, last = points[0][1], points[-1][1]
    return abs(last - first) / max(abs(last), 1e-12)


def _histograms(stddevs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    edges = torch.tensor(HISTOGRAM_EDGES, dtype=torch.float64)
    counts: dict[str, torch.Tensor] = {}
    for site, sigma in stddevs.items():
        ratio = (sigma.double().flatten().cpu() / targets[site].double().flatten().cpu()).log10()
        ratio = ratio.clamp(edges[0], edges[-1] - 1e-9)
        binned = torch.bucketize(ratio, edges, right=True) - 1
        group = scale_group(site)
        counts[group] = counts.get(group, torch.zeros(len(edges) - 1, dtype=torch.long)) + \
            torch.bincount(binned, minlength=len(edges) - 1)
    return {group: value.tolist() for group, value in sorted(counts.items())}


def site_prior_scales(model: BLoRAWhisper) -> dict[str, torch.Tensor]:
    """The prior's sigma_p of every adapter site (a scalar, or per entry after a previous posterior became the prior)."""
    return {site: model.site_prior(site).base_dist.scale for site in model.site_names()}


def pinned_by_data(sigma_star: Mapping[str, torch.Tensor], prior_scales: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Entries whose data precision exceeds the prior's (sigma*^2 < sigma_p^2 / 2), counted by group
    (``encoder.A``, ...) and by layer kind (``q_proj``, ``fc1``, ...): where the data pin the posterior."""
    counts: dict[str, int] = {}
    for site, value in sigma_star.items():
        pinned = int((value.double() ** 2 < prior_scales[site].double().to(value.device) ** 2 / 2).sum())
        kind = site.rsplit(".", 2)[-2]
        for key in ("all", scale_group(site), kind):
            counts[key] = counts.get(key, 0) + pinned
    return dict(sorted(counts.items()))


def posterior_convergence(stddevs: Mapping[str, torch.Tensor], sigma_star: Mapping[str, torch.Tensor],
                          history: Sequence[Mapping[str, Any]], steps: int,
                          prior_scales: Mapping[str, torch.Tensor],
                          initial: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The verdict of :data:`RULE` with what it was judged on: distance of the scales to sigma*
    (overall and per group), the KL's change, histograms of log10(sigma / sigma*) per group, and,
    given the ``initial`` scales, how far the scales moved from their start."""
    overall = log_ratio_summary(stddevs, sigma_star, within=WITHIN)
    groups = {}
    for group in sorted({scale_group(site) for site in stddevs}):
        sites = [site for site in stddevs if scale_group(site) == group]
        groups[group] = log_ratio_summary({s: stddevs[s] for s in sites}, {s: sigma_star[s] for s in sites}, WITHIN)
    change = kl_change(history, steps)
    scales_ok = overall["p90_abs_log_ratio"] <= math.log(WITHIN)
    kl_ok = change is not None and change < KL_TOLERANCE
    summary = {
        "rule": RULE,
        "converged": bool(scales_ok and kl_ok),
        "scales_near_optimum": bool(scales_ok),
        "kl_settled": None if change is None else bool(kl_ok),
        "kl_change_last_fifth": change,
        **{f"sigma_vs_optimum/{k}": v for k, v in overall.items()},
        "by_group": groups,
        "pinned_by_data": pinned_by_data(sigma_star, prior_scales),
        "entries": sum(value.numel() for value in sigma_star.values()),
        "histogram_log10_edges": list(HISTOGRAM_EDGES),
        "histogram_log10_sigma_over_optimum": _histograms(stddevs, sigma_star),
    }
    if initial is not None:
        moved = log_ratio_summary(stddevs, initial, within=WITHIN)
        summary["sigma_vs_start/median_abs_log_ratio"] = moved["median_abs_log_ratio"]
        summary["sigma_vs_start/share_within"] = moved["share_within"]
    return summary



@dataclass
class RunCurvature:
    """What the curvature of a finished blora run is measured from: its posterior, its training data
    (at the run's window) and the mini-batches it is measured on."""

    config: dict[str, Any]
    model: BLoRAWhisper
    guide: Any
    data: Any  # TrainingData
    tokens: int  # label tokens of the whole training set
    batches: list


def run_curvature(run_dir: str | Path, batches: int = 8, data=None, seed: int = 0) -> RunCurvature:
    """A finished blora run's posterior with ``batches`` mini-batches of its training data (``data``, a
    :class:`~pyro_blora.data.training_data.TrainingData`, or else re-read from where its config says)."""
    config = read_run_config(run_dir)
    model, guide, processor = load_for_transcription(weights_folder(run_dir), keep_window=True)
    if not hasattr(guide, "stddevs"):
        raise ValueError(f"{run_dir} holds a point estimate ({config['run']['method']}); convergence is a question "
                         "for a mean-field posterior (a blora run)")
    if data is None:
        run = config["run"]
        data = load_training_data(run["train_data"], processor, split=run.get("train_split", "train"))
    collate = replace(data.collate, n_frames=encoder_input_frames(model.whisper))
    device = next(model.whisper.parameters()).device
    chosen = curvature_batches(data.dataset, collate, config.get("train", {}).get("batch_size", 4), seed, batches,
                               device)
    return RunCurvature(config, model, guide, data, count_label_tokens(data.dataset, collate), chosen)


def run_convergence(run_dir: str | Path, batches: int = 8, data=None, seed: int = 0) -> dict[str, Any]:
    """:func:`posterior_convergence` of a finished blora run, from its saved posterior and log: the
    curvature measured on ``batches`` mini-batches of its training data (:func:`run_curvature`)."""
    run = run_curvature(run_dir, batches, data, seed)
    sigma_star = curvature_scales(run.model, run.guide.means(), run.batches, run.tokens, seed)
    return posterior_convergence(run.guide.stddevs(), sigma_star, read_log(run_dir),
                                 run.config.get("train", {}).get("steps", 0), site_prior_scales(run.model))
