"""Publishing to the Hugging Face hub: a merged model, a PEFT adapter or a posterior, with a model card.

``push_to_hub`` stages the folder (hard links, no copies where the file system allows), adds a
generated ``README.md`` (YAML header + the run's config and measured results, from ``result.json``
and ``eval.json`` in the folder or the run folder) unless the folder has its own, then calls
``HfApi.create_repo`` and ``HfApi.upload_folder``: one commit with everything. Authentication is
huggingface_hub's (``token=`` or ``hf auth login``). Offline it fails before any upload.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pyro_blora.markdown import markdown_table
from pyro_blora.offline import HubUnavailableError

__all__ = ["KINDS", "REQUIRED_FILES", "model_card", "push_to_hub", "stage_folder"]

Kind = Literal["merged", "peft", "posterior"]
KINDS = ("merged", "peft", "posterior")
# Any one of the tuples must be present in the folder for it to be that kind.
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "merged": (("config.json", "model.safetensors"), ("config.json", "model.safetensors.index.json")),
    "peft": (("adapter_config.json", "adapter_model.safetensors"),),
    "posterior": (("posterior.json", "posterior.safetensors"), ("posterior_tensors.safetensors",)),
}
RESULT_FILES = ("result.json", "eval.json", "pruning.json")
_LIBRARY = {"merged": "transformers", "peft": "peft", "posterior": "pyro-blora"}
_USAGE = {
    "merged": """```python
from transformers import WhisperForConditionalGeneration
model = WhisperForConditionalGeneration.from_pretrained("{repo_id}")
```""",
    "peft": """```python
from peft import PeftModel
from transformers import WhisperForConditionalGeneration
base = WhisperForConditionalGeneration.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{repo_id}")  # the BLoRA posterior mean as a LoRA adapter
```""",
    "posterior": """```python
from huggingface_hub import snapshot_download
from pyro_blora import load_posterior, load_whisper
whisper, processor = load_whisper("{base_model}")
model, guide = load_posterior(snapshot_download("{repo_id}"), whisper)
```
`posterior_tensors.safetensors`, when present, holds the means and standard deviations under plain
names (`<module>.lora_A.mean`, `.lora_A.std`, ...), readable with safetensors and NumPy alone.""",
}


def _check_kind(folder: Path, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; export the model first (pyro-blora export-peft / export-posterior)")
    if not any(all((folder / name).exists() for name in group) for group in REQUIRED_FILES[kind]):
        options = " or ".join(" + ".join(group) for group in REQUIRED_FILES[kind])
        raise ValueError(f"{folder} is not a {kind!r} folder: it needs {options}")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_config(folder: Path, run_dir: Path | None) -> dict[str, Any]:
    """The most complete config found: the run folder's, else what the exported folder records."""
    for path in ([run_dir / "config.json"] if run_dir else []) + [folder / "posterior.json"]:
        data = _read_json(path)
        if data is not None:
            return {k: v for k, v in data.items() if k != "sites"}
    adapter = _read_json(folder / "adapter_config.json")
    if adapter is not None:
        return {k: adapter.get(k) for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")}
    return {}


def _results(folder: Path, run_dir: Path | None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name in RESULT_FILES:
        for place in ([folder] + ([run_dir] if run_dir else [])):
            data = _read_json(place / name)
            if data is not None and name not in found:
                found[name] = data
    return found


def _scalar_rows(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            rows.extend(_scalar_rows(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((f"{prefix}{key}", value))
    return rows


def _base_model(folder: Path, config: Mapping[str, Any], base_model: str | None) -> str | None:
    if base_model:
        return base_model
    adapter = _read_json(folder / "adapter_config.json") or {}
    merged = _read_json(folder / "config.json") or {}
    candidates = (
        adapter.get("base_model_name_or_path"),
        config.get("metadata", {}).get("base_model") if isinstance(config.get("metadata"), Mapping) else None,
        config.get("run", {}).get("base_model") if isinstance(config.get("run"), Mapping) else None,
        merged.get("_name_or_path"),
    )
    return next((c for c in candidates if c), None)


def model_card(
    folder: str | Path,
    kind: Kind,
    repo_id: str,
    run_dir: str | Path | None = None,
    base_model: str | None = None,
    language: list[str] | None = None,
) -> str:
    """README.md text: a YAML header for the hub, how to load it, the run config and the results."""
    folder = Path(folder)
    run_dir = Path(run_dir) if run_dir else None
    _check_kind(folder, kind)
    config = _run_config(folder, run_dir)
    results = _results(folder, run_dir)
    base = _base_model(folder, config, base_model)
    header: dict[str, Any] = {
        "library_name": _LIBRARY[kind],
        "tags": ["whisper", "lora", "bayesian-lora", "pyro-blora", "automatic-speech-recognition"],
        "pipeline_tag": "automatic-speech-recognition",
    }
    if base:
        header["base_model"] = base
    if language:
        header["language"] = list(language)
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo_id.rpartition('/')[2]}",
        "",
        f"Whisper adapted with Bayesian LoRA (pyro-blora); this repository holds the {_describe(kind)}.",
        "",
        "## Use",
        "",
        _USAGE[kind].format(repo_id=repo_id, base_model=base or "<base model>"),
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str) if config else "{}",
        "```",
        "",
        "## Results",
        "",
    ]
    if not results:
        lines.append("No measured results were found (result.json / eval.json).")
    for name, data in results.items():
        table = markdown_table([{"metric": key, "value": value} for key, value in _scalar_rows(data)])
        lines += [f"From `{name}`:", "", table, ""]
    return "\n".join(lines).rstrip() + "\n"


def _describe(kind: str) -> str:
    return {
        "merged": "posterior-mean model with the adapters merged into the weights (a plain transformers Whisper)",
        "peft": "posterior mean as a standard PEFT LoRA adapter",
        "posterior": "full Gaussian posterior over the adapters (means and standard deviations)",
    }[kind]


def stage_folder(folder: str | Path, staging: str | Path, card: str | None) -> Path:
    """Mirror ``folder`` into ``staging`` by hard links (copies across file systems), adding
    ``card`` as README.md when the folder has none."""
    folder, staging = Path(folder), Path(staging)
    for source in folder.rglob("*"):
        if source.is_dir() or any(part.startswith(".") for part in source.relative_to(folder).parts):
            continue
        target = staging / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    if card is not None and not (staging / "README.md").exists():
        (staging / "README.md").write_text(card)
    return staging


def _export(source: Any, kind: str, folder: Path) -> None:
    """Write a model object (a transformers model, a PeftModel, or a (BLoRAWhisper, guide) pair)."""
    if isinstance(source, tuple) and len(source) == 2:
        model, guide = source
        if kind == "merged":
            from pyro_blora.predict.monte_carlo import posterior_mean_model

            posterior_mean_model(model, guide).save_pretrained(folder)
        elif kind == "peft":
            from pyro_blora.interop.peft import export_peft

            export_peft(model, guide, folder)
        else:
            from pyro_blora.posterior import save_posterior
            from pyro_blora.posterior import export_posterior_tensors

            save_posterior(folder, model, guide)
            export_posterior_tensors(model, guide, folder)
    elif hasattr(source, "save_pretrained"):
        source.save_pretrained(folder)
    else:
        raise TypeError(
            f"cannot publish a {type(source).__name__}: give a folder, a transformers or peft model, "
            "or a (BLoRAWhisper, BLoRAGuide) pair"
        )


def push_to_hub(
    folder_or_model: str | Path | Any,
    repo_id: str,
    kind: Kind = "peft",
    *,
    run_dir: str | Path | None = None,
    base_model: str | None = None,
    language: list[str] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Create (or reuse) the hub repository ``repo_id`` and upload the folder with a model card.

    ``folder_or_model`` is an exported folder (save_pretrained, export_peft, save_posterior) or a
    model object, exported first. ``run_dir`` is the training run folder whose config.json,
    result.json and eval.json go into the card. Returns the URL of the commit.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if "/" not in repo_id:
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="pyro-blora-push-") as tmp:
        if isinstance(folder_or_model, (str, Path)):
            folder = Path(folder_or_model)
        else:
            folder = Path(tmp) / "export"
            _export(folder_or_model, kind, folder)
        card = model_card(folder, kind, repo_id, run_dir=run_dir, base_model=base_model, language=language)
        staging = stage_folder(folder, Path(tmp) / "upload", card)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(staging),
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"Upload BLoRA {kind} with pyro-blora",
            )
        except OfflineModeIsEnabled as error:
            raise HubUnavailableError(
                f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE). Unset it and log in "
                "(`hf auth login` or token=...) to publish"
            ) from error
    return str(getattr(commit, "commit_url", commit))
