"""Saving and loading a trained posterior, independent of the process that trained it.

A posterior folder holds ``posterior.safetensors`` (the guide's parameters: for every adapter
site, the unconstrained location and scale, or the point value of a MAP guide), ``prior.safetensors``
(only when the prior was not the default N(0, sigma_p), e.g. a previous posterior: ``<site>.loc`` and
``<site>.scale``, so the folder rebuilds the model's KL term as it was trained) and ``posterior.json`` (the adapter config, the scale
parameterisation, the site names and shapes, and free-form metadata such as the base model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperForConditionalGeneration

from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import BLoRAConfig
from pyro_blora.guide import BLoRAGuide, build_guide, guide_kind
from pyro_blora.model import BLoRAWhisper, wrap_whisper
from pyro_blora.objective import ElboScaling

__all__ = ["posterior_encoder_window", "save_posterior", "load_posterior", "read_posterior_config"]

FORMAT_VERSION = 1


def save_posterior(folder: str | Path, model: BLoRAWhisper, guide: BLoRAGuide, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the guide's parameters and everything needed to rebuild it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in guide.state_dict().items()}
    tmp = folder / ".posterior.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pyro-blora-posterior", "version": str(FORMAT_VERSION)})
    tmp.replace(folder / "posterior.safetensors")
    _save_prior(folder / "prior.safetensors", model)
    means = guide.means()
    atomic_write_json(
        folder / "posterior.json",
        {
            "format_version": FORMAT_VERSION,
            "blora_config": model.config.to_dict(),
            "guide": guide_kind(guide),
            "sites": {site: list(means[site].shape) for site in model.site_names()},
            "elbo_scaling": vars(model.elbo_scaling),
            "metadata": dict(metadata or {}),
        },
    )
    return folder


def _save_prior(path: Path, model: BLoRAWhisper) -> None:
    """Write a non-default prior; a default one is what ``posterior.json``'s config already says."""
    prior = model.site_prior_parameters()
    sigma_p = float(torch.tensor(model.config.prior_scale, dtype=torch.float32))  # as the buffers hold it
    default = all(
        value.dim() == 0 and float(value) == (0.0 if key.endswith(".loc") else sigma_p)
        for key, value in prior.items()
    )
    if default:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({key: value.detach().cpu().contiguous() for key, value in prior.items()}, str(tmp),
              metadata={"format": "pyro-blora-prior", "version": str(FORMAT_VERSION)})
    tmp.replace(path)


def read_posterior_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "posterior.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a posterior folder: it has no posterior.json (save one with save_posterior)")
    return json.loads(path.read_text())


def posterior_encoder_window(folder: str | Path) -> float:
    """Seconds of audio the encoder read in training: the posterior's metadata, else the config.json of
    the run folder holding it (``runs/x/posterior``), else Whisper's 30 s."""
    window = read_posterior_config(folder).get("metadata", {}).get("encoder_window_seconds")
    run_config = Path(folder).resolve().parent / "config.json"
    if window is None and run_config.is_file():
        window = (json.loads(run_config.read_text()).get("train") or {}).get("encoder_window_seconds")
    return float(window) if window is not None else 30.0


def load_posterior(folder: str | Path, whisper: WhisperForConditionalGeneration) -> tuple[BLoRAWhisper, BLoRAGuide]:
    """Rebuild the model around ``whisper`` (the same base model) and the trained guide."""
    info = read_posterior_config(folder)
    model = wrap_whisper(whisper, BLoRAConfig.from_dict(info["blora_config"]))
    expected = {site: list(shape) for site, shape in info["sites"].items()}
    actual = {site: list(model.site_prior(site).event_shape) for site in model.site_names()}
    if expected != actual:
        raise ValueError(
            f"the posterior in {folder} was trained on a different base model: its adapter sites or shapes do not match "
            "this Whisper model's. Load the base model it was trained on (see posterior.json metadata)."
        )
    guide = build_guide(model, info.get("guide", "normal"))
    state = load_file(str(Path(folder) / "posterior.safetensors"))
    guide.load_state_dict(state, strict=True)
    prior_file = Path(folder) / "prior.safetensors"
    if prior_file.is_file():
        prior = load_file(str(prior_file))
        sites = model.site_names()
        model.set_site_priors({s: prior[f"{s}.loc"] for s in sites}, {s: prior[f"{s}.scale"] for s in sites})
    model.configure_objective(ElboScaling(**info["elbo_scaling"]))
    return model, guide
