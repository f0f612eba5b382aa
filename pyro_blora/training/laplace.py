"""A Laplace posterior: uncertainty for an adapter that is already trained, at no training cost.

Around the trained adapter of a finished run (LoRA, MAP or BLoRA's posterior mean), each entry gets
the Gaussian scale sigma* that the curvature of the likelihood and a Gaussian prior call for
(:mod:`pyro_blora.model.curvature`): 1 / sigma*^2 = likelihood-curvature / KL-weight + 1 / sigma_p^2,
the same objective and weights BLoRA trains with. It is a diagonal Laplace approximation with a
Fisher (generalised Gauss-Newton) Hessian, as Laplace-LoRA does with K-FAC (Yang et al., 2023).

The result is a run folder of method ``blora`` whose ``posterior/`` holds a mean-field guide: it loads
wherever a trained posterior does (``transcribe --posterior``, ``evaluate``, ``export``, ``inspect``,
``train --prior-from``). ``config.json`` names the run it came from under ``run.laplace_of``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.data.training_data import TrainingData
from pyro_blora.interop.peft import peft_site_values
from pyro_blora.metrics.scales import scale_quantiles
from pyro_blora.model.encoder_window import set_encoder_window, window_frames
from pyro_blora.model.guide import build_guide
from pyro_blora.model.objective import elbo_scaling
from pyro_blora.model.whisper import wrap_whisper
from pyro_blora.posterior import save_posterior
from pyro_blora.runs import RunFolder, finished, load_run_model, read_run_config, run_encoder_window, weights_folder
from pyro_blora.training.continual import start_at_posterior
from pyro_blora.training.convergence import curvature_batches, curvature_scales, pinned_by_data, site_prior_scales
from pyro_blora.training.loop import count_label_tokens

__all__ = ["LAPLACE_SOURCES", "laplace_posterior"]

# The runs whose trained adapter can be the Laplace posterior's mean.
LAPLACE_SOURCES = ("lora", "map", "blora")


def _prior_config(adapter: dict[str, Any], prior: BLoRAConfig) -> BLoRAConfig:
    """The source run's adapters (rank, alpha, targets) with ``prior``'s belief, KL weighting and scale
    parameterisation (a LoRA run has no scales of its own)."""
    return BLoRAConfig.from_dict(adapter).replace(
        prior_scale=prior.prior_scale, beta=prior.beta, kl_normalization=prior.kl_normalization,
        init_scale_A=prior.init_scale_A, init_scale_B=prior.init_scale_B, init_rho_range=prior.init_rho_range,
        scale_parameterization=prior.scale_parameterization)


def laplace_posterior(source: str | Path, data: TrainingData, out: str | Path, prior: BLoRAConfig = BLoRAConfig.paper(),
                      batches: int = 8, batch_size: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the Laplace posterior around ``source``'s trained adapter into the run folder ``out``.

    ``data`` is the data the adapter was trained on (the curvature is measured on its first ``batches``
    mini-batches of ``batch_size``); ``prior`` gives sigma_p, beta and the KL normalisation (the paper
    preset's by default); rank, alpha and targets are the source run's. Returns the result written."""
    source, out = Path(source), Path(out)
    if not finished(source):
        raise ValueError(f"{source} is not a finished run; a Laplace posterior needs a trained adapter "
                         "(train it first, or resume it with --resume)")
    config = read_run_config(source)
    method = config["run"]["method"]
    if method not in LAPLACE_SOURCES:
        raise ValueError(f"{source} is a {method} run; a Laplace posterior needs an adapter run of "
                         f"{', '.join(LAPLACE_SOURCES)}")
    base = config["run"]["model_source"]
    window = run_encoder_window(config)
    whisper, processor = load_run_model(base)[:2]
    set_encoder_window(whisper, window)
    blora = _prior_config(config["blora"], prior)
    model = wrap_whisper(whisper, blora)
    guide = build_guide(model, "normal", seed=seed)
    if method == "lora":
        guide.set_means(peft_site_values(weights_folder(source), model))
    else:
        start_at_posterior(model, guide, weights_folder(source), None)
    collate = replace(data.collate, n_frames=window_frames(window))
    num_tokens = count_label_tokens(data.dataset, collate)
    model.configure_objective(elbo_scaling(blora, len(data.dataset), num_tokens, model.num_adapter_parameters()))
    device = next(model.whisper.parameters()).device
    means = guide.means()
    sigma_star = curvature_scales(model, means, curvature_batches(data.dataset, collate, batch_size, seed, batches, device),
                                  num_tokens, seed=seed)
    guide.set_stddevs(sigma_star)
    train = TrainConfig(**{**config.get("train", {}), "curvature_batches": batches, "batch_size": batch_size,
                           "seed": seed, "encoder_window_seconds": window})
    fingerprint = {"blora": blora.to_dict(), "train": train.to_dict(),
                   "run": {"method": "blora", "model_source": base, "laplace_of": str(source),
                           "laplace_of_method": method, "train_data": data.source, "train_split": data.split,
                           "train_utterances": len(data.dataset), "seed": seed}}
    run = RunFolder(out, fingerprint, resume=False)
    priors = site_prior_scales(model)
    result = {"laplace": {"source": str(source), "source_method": method, "curvature_batches": batches,
                          "training_tokens": num_tokens, "pinned_by_data": pinned_by_data(sigma_star, priors),
                          **scale_quantiles(sigma_star)}}
    run.log({"step": 0, **result["laplace"]["pinned_by_data"], **scale_quantiles(sigma_star)})
    save_posterior(out / "posterior", model, guide, metadata={
        "base_model": str(base), "method": "blora", "laplace_of": str(source), "encoder_window_seconds": window})
    run.write_result(result)
    return result
