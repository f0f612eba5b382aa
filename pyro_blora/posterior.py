"""A trained posterior on disk: the posterior folder Pyro reloads, and the plain-tensor export any reader can use.

The posterior folder
--------------------

A posterior folder holds ``posterior.safetensors`` (the guide's parameters: for every adapter
site, the unconstrained location and scale, or the point value of a MAP guide), ``prior.safetensors``
(only when the prior was not the default N(0, sigma_p), e.g. a previous posterior: ``<site>.loc`` and
``<site>.scale``, so the folder rebuilds the model's KL term as it was trained) and ``posterior.json`` (the adapter config, the scale
parameterisation, the site names and shapes, and free-form metadata such as the base model).

The plain-tensor export
-----------------------
The posterior folder stores the guide's *unconstrained* parameters,
which only Pyro can interpret. This module writes the same posterior in a layout any
safetensors reader understands, so the posterior can be used without Pyro (or torch).

Layout of ``posterior_tensors.safetensors`` (format ``pyro-blora-posterior-tensors``, version 1)
------------------------------------------------------------------------------------------------
Tensors, float32, four per adapted linear layer; ``<module>`` is the layer's path inside the
transformers Whisper model (``model.encoder.layers.0.self_attn.q_proj``), the same path peft and
``save_pretrained`` use::

    <module>.lora_A.mean   (r, d_in)    posterior mean of A
    <module>.lora_A.std    (r, d_in)    posterior standard deviation of A (> 0)
    <module>.lora_B.mean   (d_out, r)   posterior mean of B
    <module>.lora_B.std    (d_out, r)   posterior standard deviation of B (> 0)

Every entry is an independent Gaussian (mean-field). The adapted weight is
``W0 + scaling * B @ A``; its posterior mean is ``W0 + scaling * B.mean @ A.mean``.

Metadata (the safetensors header, every value a string):

    format              "pyro-blora-posterior-tensors"
    format_version      "1"
    rank                r
    lora_alpha          alpha (scaling = alpha / r)
    scaling             alpha / r
    prior_scale         standard deviation of the zero-mean Gaussian prior on every entry
    beta                KL weight of the training objective
    kl_normalization    "dataset" | "token" | "parameter" | "matrix"
    target_modules      JSON list of the regular expressions that chose the layers
    modules             JSON list of the adapted module paths
    metadata            JSON object of free-form run information (e.g. base_model)

Reading it needs only ``safetensors`` and ``numpy``::

    from safetensors import safe_open
    from safetensors.numpy import load_file
    tensors = load_file("posterior_tensors.safetensors")
    with safe_open("posterior_tensors.safetensors", framework="numpy") as f:
        header = f.metadata()
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy_file
from safetensors.torch import load_file
from transformers import WhisperForConditionalGeneration

from pyro_blora.checkpoint import atomic_write_json, atomic_write_safetensors
from pyro_blora.config import BLoRAConfig
from pyro_blora.model.guide import BLoRAGuide, build_guide, guide_kind
from pyro_blora.model.whisper import BLoRAWhisper, adapted_modules, lora_alpha, module_path, wrap_whisper
from pyro_blora.model.objective import ElboScaling

__all__ = [
    "POSTERIOR_TENSORS_FILE",
    "POSTERIOR_TENSORS_FORMAT",
    "export_posterior_tensors",
    "load_posterior",
    "read_posterior_config",
    "read_posterior_tensors",
    "save_posterior",
]

FORMAT_VERSION = 1


def save_posterior(folder: str | Path, model: BLoRAWhisper, guide: BLoRAGuide, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the guide's parameters and everything needed to rebuild it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in guide.state_dict().items()}
    atomic_write_safetensors(folder / "posterior.safetensors", state,
                             {"format": "pyro-blora-posterior", "version": str(FORMAT_VERSION)})
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
    atomic_write_safetensors(path, {key: value.detach().cpu().contiguous() for key, value in prior.items()},
                             {"format": "pyro-blora-prior", "version": str(FORMAT_VERSION)})


def read_posterior_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "posterior.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a posterior folder: it has no posterior.json (save one with save_posterior)")
    return json.loads(path.read_text())


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


POSTERIOR_TENSORS_FILE = "posterior_tensors.safetensors"
POSTERIOR_TENSORS_FORMAT = "pyro-blora-posterior-tensors"
TENSORS_FORMAT_VERSION = 1


def export_posterior_tensors(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write means and standard deviations of every adapter in the layout above.

    ``path`` is a file, or a folder that gets ``posterior_tensors.safetensors``."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / POSTERIOR_TENSORS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    means, stddevs = guide.means(), guide.stddevs()
    tensors: dict[str, torch.Tensor] = {}
    for site in model.site_names():
        path_in_model, leaf = module_path(site)
        tensors[f"{path_in_model}.{leaf}.mean"] = means[site].float().cpu().contiguous()
        tensors[f"{path_in_model}.{leaf}.std"] = stddevs[site].float().cpu().contiguous()
    config = model.config
    header = {
        "format": POSTERIOR_TENSORS_FORMAT,
        "format_version": str(TENSORS_FORMAT_VERSION),
        "rank": str(config.rank),
        "lora_alpha": str(lora_alpha(model)),
        "scaling": repr(config.scaling),
        "prior_scale": repr(config.prior_scale),
        "beta": repr(config.beta),
        "kl_normalization": config.kl_normalization,
        "target_modules": json.dumps(list(config.target_modules)),
        "modules": json.dumps(adapted_modules(model)),
        "metadata": json.dumps(dict(metadata or {}), default=str),
    }
    atomic_write_safetensors(path, tensors, header)
    return path


def read_posterior_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as NumPy arrays, header with JSON fields decoded) of a file in the layout above."""
    path = Path(path)
    if path.is_dir():
        path = path / POSTERIOR_TENSORS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; write it with export_posterior_tensors (pyro-blora export-posterior)")
    with safe_open(str(path), framework="numpy") as handle:
        header = dict(handle.metadata() or {})
    if header.get("format") != POSTERIOR_TENSORS_FORMAT:
        raise ValueError(
            f"{path} is not a {POSTERIOR_TENSORS_FORMAT} file (its format is {header.get('format')!r}); "
            "a posterior folder's posterior.safetensors holds Pyro's unconstrained parameters, use load_posterior for it"
        )
    for key in ("target_modules", "modules", "metadata"):
        header[key] = json.loads(header[key])
    for key in ("rank", "format_version"):
        header[key] = int(header[key])
    for key in ("scaling", "prior_scale", "beta"):
        header[key] = float(header[key])
    header["lora_alpha"] = float(header["lora_alpha"])
    return load_numpy_file(str(path)), header
