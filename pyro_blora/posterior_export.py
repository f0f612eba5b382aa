"""The posterior as plain tensors: means and standard deviations under module-path names.

A posterior folder (:mod:`pyro_blora.posterior`) stores the guide's *unconstrained* parameters,
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
    kl_normalization    "dataset" | "token" | "parameter"
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
from safetensors.torch import save_file

from pyro_blora.guide import BLoRAGuide
from pyro_blora.model import BLoRAWhisper

__all__ = [
    "POSTERIOR_TENSORS_FILE",
    "POSTERIOR_TENSORS_FORMAT",
    "adapted_modules",
    "export_posterior_tensors",
    "lora_alpha",
    "module_path",
    "read_posterior_tensors",
    "site_name",
]

POSTERIOR_TENSORS_FILE = "posterior_tensors.safetensors"
POSTERIOR_TENSORS_FORMAT = "pyro-blora-posterior-tensors"
FORMAT_VERSION = 1
_MODEL_PREFIX = "whisper."


def module_path(site: str) -> tuple[str, str]:
    """(path inside the Whisper model, "lora_A" | "lora_B") of a Pyro adapter site."""
    path, _, leaf = site.rpartition(".")
    return path.removeprefix(_MODEL_PREFIX), leaf


def site_name(path: str, leaf: str) -> str:
    """The Pyro site of matrix ``leaf`` of the layer at ``path`` inside the Whisper model."""
    return f"{_MODEL_PREFIX}{path}.{leaf}"


def adapted_modules(model: BLoRAWhisper) -> list[str]:
    """Paths of the adapted layers inside the Whisper model, in model order."""
    return [path.removeprefix(_MODEL_PREFIX) for path in model.adapters()]


def lora_alpha(model: BLoRAWhisper) -> float | int:
    """alpha as peft writes it: an int when it is one."""
    alpha = model.config.scaling * model.config.rank
    return int(alpha) if float(alpha).is_integer() else alpha


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
        "format_version": str(FORMAT_VERSION),
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
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
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
