"""Does the posterior's uncertainty pay? The study as an experiment: a finished BLoRA run, the LoRA baseline
trained to match it, the payoff study on a testbed (:func:`pyro_blora.evaluation.payoff.run_payoff_study`)
and its plots.

The baseline is ``run_training("lora")`` on the BLoRA run's base model, training data, adapters and
training options, so that it is the LoRA of every other table (not a LoRA of the study's own making).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyro_blora.base_models.loading import load_processor
from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.payoff import PayoffOptions, run_payoff_study
from pyro_blora.evaluation.uncertainty import UncertaintyReport
from pyro_blora.experiments.step import ensure_trained
from pyro_blora.report.plots import write_uncertainty_plots
from pyro_blora.runs import WEIGHT_FOLDERS, base_model_of, read_run_config
from pyro_blora.training.methods import run_training

__all__ = ["blora_run_folder", "train_matching_lora", "uncertainty_study"]

# Where uncertainty_study trains the LoRA baseline inside its output folder when no folder is named.
LORA_RUN = "lora-run"


def blora_run_folder(posterior: str | Path) -> Path:
    """The run folder of a blora run given as itself or as its ``posterior/`` folder."""
    posterior = Path(posterior)
    folder = posterior.parent if posterior.name == WEIGHT_FOLDERS["blora"] else posterior
    method = read_run_config(folder)["run"]["method"]
    if method != "blora":
        raise ValueError(f"{folder} is a {method!r} run; the LoRA baseline is matched to a finished blora run "
                         "(`pyro-blora train --method blora`)")
    return folder


def train_matching_lora(blora_run: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The LoRA baseline of a blora run, trained by ``run_training("lora")`` into ``out_dir``: the run's base
    model, training split and utterances, adapters (targets, rank, alpha) and training options. A finished
    run in ``out_dir`` is kept, an unfinished one resumed."""
    config = read_run_config(blora_run_folder(blora_run))
    run = config["run"]
    processor = load_processor(base_model_of(run["model_source"]))
    data = load_training_data(run["train_data"], processor, split=run["train_split"], cache_dir=cache_dir,
                              limit=run["train_utterances"], columns=run.get("train_columns"))
    adapter, train = BLoRAConfig.from_dict(config["blora"]), TrainConfig(**config["train"])
    ensure_trained(out_dir, lambda resume: run_training("lora", run["model_source"], data, out_dir, adapter, train,
                                                        resume=resume, cache_dir=cache_dir))
    return Path(out_dir)


def uncertainty_study(testbed: str | Path, posterior: str | Path, out: str | Path,
                      options: PayoffOptions = PayoffOptions(), *, lora: str | Path | None = None,
                      train_lora: bool = False, **study: Any) -> dict[str, Any]:
    """The payoff study of ``posterior`` against the LoRA run ``lora``, written into ``out`` with the largest
    S's selective-prediction and reliability plots. With ``train_lora`` that run is first trained to match
    the blora run (into ``lora``, default ``<out>/lora-run``). ``study`` goes to ``run_payoff_study``
    (model, domains, clips_per_domain, dev_clips, bootstrap_samples)."""
    out = Path(out)
    if train_lora:
        lora = train_matching_lora(posterior, lora or out / LORA_RUN, cache_dir=out / "cache")
    summary = run_payoff_study(testbed, posterior, out, options, lora=lora, **study)
    largest = options.samples[-1]
    write_uncertainty_plots(UncertaintyReport.from_dict(summary["uncertainty"][f"S={largest}"]), out,
                            prefix=f"S{largest}-")
    return summary
