"""``pyro-blora export-peft | import-peft | export-posterior | push``: PEFT adapters, plain tensors, the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyro
import typer
from transformers import WhisperForConditionalGeneration

from pyro_blora.base_models.loading import load_whisper
from pyro_blora.config import BLoRAConfig
from pyro_blora.interop.hub import KINDS, push_to_hub
from pyro_blora.interop.peft import blora_config_from_peft, export_peft, import_peft, read_peft_adapter
from pyro_blora.model.guide import build_guide
from pyro_blora.model.whisper import wrap_whisper
from pyro_blora.posterior import export_posterior_tensors, load_posterior, read_posterior_config, save_posterior

BASE_HELP = "base Whisper model: a local folder, a bundled short name or a hub id (default: the one recorded in the folder)"


def _load_base(source: str | None, folder: Path, recorded: str | None):
    """The base Whisper model (no processor needed to move adapters around)."""
    source = source or recorded
    if not source:
        raise typer.BadParameter(f"{folder} records no base model; name it with --base")
    if (Path(source) / "config.json").is_file():
        return WhisperForConditionalGeneration.from_pretrained(source).eval()
    return load_whisper(source)[0]


def _load_posterior(folder: Path, base: str | None):
    recorded = read_posterior_config(folder).get("metadata", {}).get("base_model")
    return load_posterior(folder, _load_base(base, folder, recorded)), base or recorded


def export_peft_command(
    posterior: Path = typer.Argument(..., exists=True, file_okay=False, help="posterior folder (posterior.json + posterior.safetensors)"),
    out: Path = typer.Option(..., help="output folder for adapter_config.json + adapter_model.safetensors"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    prune_threshold: Optional[float] = typer.Option(None, help="set posterior-mean entries with |w| below this to 0 first"),
) -> None:
    """Export the posterior mean as a PEFT LoRA adapter."""
    (model, guide), base_name = _load_posterior(posterior, base)
    report = export_peft(model, guide, out, prune_threshold=prune_threshold, base_model_name_or_path=base_name)
    typer.echo(f"wrote {out}")
    if report is not None:
        typer.echo(f"pruned {report.num_pruned} of {report.num_entries} entries ({report.pruned_fraction:.2%})")


def import_peft_command(
    adapter: Path = typer.Argument(..., exists=True, file_okay=False, help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)"),
    out: Path = typer.Option(..., help="output posterior folder"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    prior_scale: float = typer.Option(BLoRAConfig.prior_scale, help="standard deviation of the Gaussian prior on A and B"),
    beta: float = typer.Option(BLoRAConfig.beta, help="KL weight of the ELBO"),
    seed: int = typer.Option(0, help="seed of the guide's initialisation"),
) -> None:
    """Turn a PEFT LoRA adapter into a BLoRA posterior whose means are its A and B."""
    peft_adapter = read_peft_adapter(adapter)
    recorded = peft_adapter.config.get("base_model_name_or_path")
    model = wrap_whisper(_load_base(base, adapter, recorded), blora_config_from_peft(peft_adapter, prior_scale=prior_scale, beta=beta))
    pyro.set_rng_seed(seed)
    guide = build_guide(model)
    import_peft(adapter, model, guide)
    save_posterior(out, model, guide, metadata={"base_model": base or recorded, "imported_from": str(adapter)})
    typer.echo(f"wrote {out}")


def export_posterior_command(
    posterior: Path = typer.Argument(..., exists=True, file_okay=False, help="posterior folder (posterior.json + posterior.safetensors)"),
    out: Optional[Path] = typer.Option(None, help="output file or folder (default: the posterior folder)"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
) -> None:
    """Write means and standard deviations under plain names, readable without Pyro."""
    (model, guide), _ = _load_posterior(posterior, base)
    metadata = read_posterior_config(posterior).get("metadata", {})
    typer.echo(f"wrote {export_posterior_tensors(model, guide, out or posterior, metadata=metadata)}")


def push_command(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="exported folder to publish"),
    repo_id: str = typer.Argument(..., help="hub repository, owner/name"),
    kind: str = typer.Option("peft", help=f"what the folder holds: {' | '.join(KINDS)}"),
    run_dir: Optional[Path] = typer.Option(None, help="training run folder: its config.json, result.json, eval.json go into the card"),
    base_model: Optional[str] = typer.Option(None, help="base model id for the card (default: the one recorded)"),
    private: bool = typer.Option(False, help="create a private repository"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
) -> None:
    """Publish a merged model, a PEFT adapter or a posterior to the Hugging Face hub, with a model card."""
    url = push_to_hub(folder, repo_id, kind, run_dir=run_dir, base_model=base_model, private=private, commit_message=commit_message)
    typer.echo(json.dumps({"repo_id": repo_id, "commit": url}))


def register(app: typer.Typer) -> None:
    app.command("export-peft")(export_peft_command)
    app.command("import-peft")(import_peft_command)
    app.command("export-posterior")(export_posterior_command)
    app.command("push")(push_command)
