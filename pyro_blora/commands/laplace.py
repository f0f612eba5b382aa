"""``pyro-blora laplace``: a posterior around an adapter that is already trained, without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.commands.options import BetaOption, KLNormalizationOption, PriorScaleOption, preset_configs
from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import base_model_of, read_run_config
from pyro_blora.base_models.loading import load_processor
from pyro_blora.training.laplace import laplace_posterior


def laplace(
    run: Path = typer.Argument(..., exists=True, file_okay=False, help="a finished lora, map or blora run folder"),
    out: Path = typer.Option(..., help="the new run folder (its posterior/ loads wherever a trained posterior does)"),
    data: Optional[Path] = typer.Option(None, help="the data the adapter was trained on (default: the run's own, "
                                        "as its config.json names it)"),
    split: Optional[str] = typer.Option(None, help="split of --data (default: the run's training split)"),
    curvature_batches: int = typer.Option(8, min=1, help="training batches the curvature is measured on"),
    batch_size: int = typer.Option(4, min=1, help="utterances per curvature batch"),
    prior_scale: PriorScaleOption = None, beta: BetaOption = None, kl_normalization: KLNormalizationOption = None,
    seed: int = typer.Option(0, help="seed of the batch order and the sampled labels of the curvature pass"),
) -> None:
    """Laplace posterior: each adapter entry of RUN gets the Gaussian scale that the curvature of the
    likelihood and the prior call for (the paper preset's prior and KL weighting unless given)."""
    prior, _ = preset_configs("paper", dict(prior_scale=prior_scale, beta=beta, kl_normalization=kl_normalization), {})
    source = read_run_config(run)["run"]
    processor = load_processor(base_model_of(run))
    training = load_training_data(data or source["train_data"], processor, split=split or source.get("train_split", "train"))
    result = laplace_posterior(run, training, out, prior=prior, batches=curvature_batches, batch_size=batch_size,
                               seed=seed)
    pinned = result["laplace"]["pinned_by_data"]
    typer.echo(json.dumps({"pinned_by_data": pinned, **{k: v for k, v in result["laplace"].items()
                                                       if k.startswith("sigma/")}}, indent=1))
    typer.echo(f"Laplace posterior: {out / 'posterior'} (run folder {out})")


def register(app: typer.Typer) -> None:
    app.command("laplace")(laplace)
