"""Continual learning: a run that starts where another ended.

A run can start where another ended, for sequential adaptation to several domains:

* ``model_source`` may be a finished run folder: its adapted model (e.g. the posterior mean merged
  into its base) is this run's base;
* ``init_from``: the previous run's trained adapter is the starting point (blora, map, lora), on the
  same base with the same adapters;
* ``prior_from`` (blora, map): the previous run's posterior becomes the prior, per entry, and the
  guide starts at it (variational continual learning; for map a weighted L2 penalty towards the
  previous point, with the previous posterior's per-entry scales, or BLoRA's sigma_p where the
  previous run was a point estimate: online Laplace when that posterior is a Laplace one).
  :class:`PriorTransfer` changes how: a floor on the copied scales (a posterior can be narrower than
  the original prior), or one isotropic scale at the same mean precision (``map-anchor``: anchored to
  the previous weights without their per-entry uncertainty).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from pyro_blora.config import BLoRAConfig
from pyro_blora.model.guide import build_guide, guide_kind
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.posterior import read_posterior_config
from pyro_blora.runs import finished, read_run_config

__all__ = ["INIT_FROM", "PRIOR_FROM", "PriorTransfer", "checked_transfer", "copied_prior", "previous_run", "start_at_posterior"]

# Which previous runs each method can start from (init_from) or take its prior from (prior_from).
INIT_FROM = {"blora": ("blora", "map"), "map": ("blora", "map"), "lora": ("lora",)}
PRIOR_FROM = {"blora": ("blora",), "map": ("blora", "map")}


@dataclass(frozen=True)
class PriorTransfer:
    """How ``prior_from``'s posterior becomes the prior; the default is VCL's per-entry copy."""

    # "posterior": each entry's N(mean, std) (a MAP guide: N(point, sigma_p)); "mean-precision": one
    # isotropic scale s with 1/s^2 = the mean over entries of 1/sigma^2 of ``precision_from``'s
    # posterior: as strong on average as the per-entry copy, without its per-entry uncertainty.
    scales: Literal["posterior", "mean-precision"] = "posterior"
    # Lower bound on every copied scale (None: none). A posterior can end narrower than the prior it
    # started from, and a copied narrow posterior freezes the adapters for the next domain.
    scale_floor: float | None = None
    # The blora run whose posterior standard deviations set the mean precision (None: prior_from).
    precision_from: Path | None = None

    def __post_init__(self) -> None:
        if self.scales not in ("posterior", "mean-precision"):
            raise ValueError(f"scales must be 'posterior' or 'mean-precision', got {self.scales!r}")
        if self.scale_floor is not None and not self.scale_floor > 0:
            raise ValueError(f"scale_floor must be > 0 (or None for no floor), got {self.scale_floor!r}")
        if self.precision_from is not None:
            if self.scales != "mean-precision":
                raise ValueError("precision_from only sets the strength of scales='mean-precision'; drop it or "
                                 "set scales='mean-precision'")
            object.__setattr__(self, "precision_from", Path(self.precision_from))

    @property
    def is_default(self) -> bool:
        return self == PriorTransfer()

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@torch.no_grad()
def copied_prior(locs: Mapping[str, torch.Tensor], stddevs: Mapping[str, torch.Tensor] | float,
                 transfer: PriorTransfer = PriorTransfer()) -> tuple[dict[str, torch.Tensor] | float, dict[str, Any]]:
    """The prior scales under ``transfer``, per site or one number (``stddevs``: the previous
    posterior's, or one number such as sigma_p), and a summary that makes the choice measurable: the
    share of entries the floor raised and the mean precision before and after it."""
    entries = sum(loc.numel() for loc in locs.values())
    if isinstance(stddevs, Mapping):
        flat = torch.cat([stddevs[site].detach().double().flatten() for site in locs])
    else:
        flat = torch.tensor([float(stddevs)], dtype=torch.float64)
    mean_precision = float((1.0 / flat.square()).mean())
    floor = transfer.scale_floor
    if transfer.scales == "mean-precision" or not isinstance(stddevs, Mapping):
        one = mean_precision ** -0.5
        scales: dict[str, torch.Tensor] | float = max(one, floor) if floor is not None else one
        floored_fraction = float(floor is not None and one < floor)
        kept = torch.tensor([float(scales)], dtype=torch.float64)
    else:
        scales = {site: (stddevs[site].clamp(min=floor) if floor is not None else stddevs[site]).to(locs[site])
                  for site in locs}
        floored_fraction = float((flat < floor).double().mean()) if floor is not None else 0.0
        kept = flat.clamp(min=floor) if floor is not None else flat
    subsample = kept[torch.randperm(kept.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    quantiles = torch.quantile(subsample, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    summary = {**transfer.to_dict(), "entries": entries, "floored_fraction": floored_fraction,
               "mean_precision_copied": mean_precision, "mean_precision": float((1.0 / kept.square()).mean()),
               "scale_quantiles": dict(zip(("q05", "median", "q95"), quantiles))}
    if not isinstance(scales, Mapping):
        summary["isotropic_scale"] = float(scales)
    return scales, summary


def checked_transfer(transfer: PriorTransfer, prior_from: Path | None, model_source, blora_config: BLoRAConfig) -> PriorTransfer:
    """``transfer`` with its precision run named and checked: finished blora, same base and adapters."""
    if prior_from is None:
        if not transfer.is_default:
            raise ValueError("prior_transfer changes how prior_from's posterior becomes the prior; give prior_from too")
        return transfer
    if transfer.scales != "mean-precision":
        return transfer
    source = transfer.precision_from or prior_from
    _checked_run(source, "precision_from" if transfer.precision_from else "prior_from (mean-precision)",
                 ("blora",), model_source, blora_config)
    return replace(transfer, precision_from=source)


def _same_source(a: str | Path, b: str | Path) -> bool:
    """Two model sources name the same model: the same folder, or the same name."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() if a.exists() and b.exists() else str(a) == str(b)


def previous_run(method: str, model_source: str | Path, blora_config: BLoRAConfig,
                  init_from: str | Path | None, prior_from: str | Path | None) -> Path | None:
    """The run ``init_from`` or ``prior_from`` names, checked: finished, of a method this one can
    start from, on the same base and with the same adapters (so every site means the same)."""
    if init_from is not None and prior_from is not None:
        raise ValueError("give init_from or prior_from, not both: prior_from already starts at the previous posterior")
    folder, option, allowed = ((init_from, "init_from", INIT_FROM) if prior_from is None
                               else (prior_from, "prior_from", PRIOR_FROM))
    if folder is None:
        return None
    if method not in allowed:
        raise ValueError(f"{option} works with the methods {', '.join(allowed)}, not {method!r}")
    return _checked_run(Path(folder), option, allowed[method], model_source, blora_config)


def _checked_run(folder: Path, option: str, kinds: tuple[str, ...], model_source: str | Path,
                 blora_config: BLoRAConfig) -> Path:
    """``folder``, checked: a finished run of one of ``kinds`` on the same base with the same adapters."""
    folder = Path(folder)
    names = "/".join(kinds)
    if not finished(folder):
        raise ValueError(f"{option} {folder} is not a finished {names} run (it needs config.json, result.json "
                         "and its trained weights); train it first, or resume it with --resume")
    config = read_run_config(folder)
    previous_method, previous_base = config["run"]["method"], config["run"]["model_source"]
    if previous_method not in kinds:
        raise ValueError(f"{option} {folder} is a {previous_method} run; this run needs a finished {names} run")
    if not _same_source(previous_base, model_source):
        raise ValueError(f"{option} {folder} was trained on the base model {previous_base!r}, this run on "
                         f"{str(model_source)!r}; both runs must share their base model")
    mine, theirs = blora_config.to_dict(), config["blora"]
    differing = [k for k in ("rank", "alpha", "target_modules", "scale_parameterization")
                 if json.dumps(mine[k]) != json.dumps(theirs[k])]
    if differing:
        raise ValueError(f"{option} {folder} used other adapters: " + ", ".join(
            f"{k} {theirs[k]!r} there, {mine[k]!r} here" for k in differing) + "; give the same adapter options")
    return folder


@torch.no_grad()
def start_at_posterior(model: BLoRAWhisper, guide, folder: Path, transfer: PriorTransfer | None) -> dict[str, Any] | None:
    """Start ``guide`` at the posterior saved in ``folder`` and, given a ``transfer``, make that
    posterior the prior (see :class:`PriorTransfer`); returns the prior's summary then. A guide of the
    same kind takes the saved parameters bit for bit, so the KL against a copied prior starts at 0."""
    from safetensors.torch import load_file

    if read_posterior_config(folder).get("guide", "normal") == guide_kind(guide):
        guide.load_state_dict(load_file(str(folder / "posterior.safetensors")), strict=True)
        saved = guide
    else:  # the other kind: only the means carry over
        saved = _saved_guide(model, folder)
        guide.set_means(saved.means())
    if transfer is None:
        return None
    if transfer.scales == "mean-precision":
        stddevs = _saved_guide(model, transfer.precision_from / "posterior").stddevs()
    elif guide_kind(guide) == "normal":
        stddevs = guide.stddevs()
    elif guide_kind(saved) == "normal":  # a point estimate under a saved posterior: its scales
        stddevs = saved.stddevs()
    else:  # a point estimate under another point estimate: the prior's own width around it
        stddevs = model.config.prior_scale
    scales, summary = copied_prior(guide.means(), stddevs, transfer)
    model.set_site_priors(guide.means(), scales)
    return summary


def _saved_guide(model: BLoRAWhisper, folder: Path):
    """The guide saved in the posterior folder ``folder``, rebuilt over ``model``'s sites."""
    from safetensors.torch import load_file

    guide = build_guide(model, read_posterior_config(folder).get("guide", "normal"))
    guide.load_state_dict(load_file(str(folder / "posterior.safetensors")), strict=True)
    return guide
