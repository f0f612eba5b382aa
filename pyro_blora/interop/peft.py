"""PEFT LoRA adapters in and out: the posterior mean as a standard adapter, and a LoRA as a start.

BLoRA and peft share the LoRA convention (``dW = (alpha / r) * B @ A``, A: (r, d_in), B: (d_out, r)),
so the posterior mean of A and B *is* a LoRA adapter: ``peft.PeftModel.from_pretrained(base, folder)``
reproduces the merged posterior-mean model. Under the mean-field posterior E[B A] = E[B] E[A], so
this is the exact posterior mean of every weight update.

Importing goes the other way: a trained LoRA adapter becomes the initial posterior means of a guide
(the scales keep their initial values), to turn a LoRA into a BLoRA or continue from it.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from pyro_blora.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_safetensors
from pyro_blora.config import BLoRAConfig
from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.model.objective import token_nll
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.model.whisper import adapted_modules, lora_alpha, module_path, site_name

__all__ = [
    "PeftAdapter",
    "PruneReport",
    "blora_config_from_peft",
    "export_peft",
    "import_peft",
    "peft_site_values",
    "prune_means",
    "read_peft_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PRUNING_REPORT = "pruning.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<leaf>lora_[AB])(?:\.[^.]+)?\.weight$")
# Settings of a peft LoRA that change its forward pass beyond W0 + (alpha / r) B A.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}


# ------------------------------------------------------------------------------------ export
@dataclass(frozen=True)
class PruneReport:
    """What setting small posterior-mean entries to zero did (measured on ``batches`` if given)."""

    threshold: float
    num_entries: int
    num_pruned: int
    pruned_fraction: float
    # Largest |logit(pruned) - logit(unpruned)| over the batches, and the teacher-forced
    # cross-entropy per token before and after; None without batches.
    max_logit_change: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None

    @property
    def nll_change(self) -> float | None:
        return None if self.nll_before is None else self.nll_after - self.nll_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nll_change": self.nll_change}


@torch.no_grad()
def prune_means(
    model: BLoRAWhisper,
    means: Mapping[str, torch.Tensor],
    threshold: float,
    batches: Sequence[Mapping] = (),
) -> tuple[dict[str, torch.Tensor], PruneReport]:
    """Means with every entry of |w| < ``threshold`` set to 0, and the change this makes."""
    if not threshold >= 0:
        raise ValueError(f"the pruning threshold must be >= 0, got {threshold!r}")
    masks = {site: value.abs() < threshold for site, value in means.items()}
    pruned = {site: value.masked_fill(masks[site], 0.0) for site, value in means.items()}
    num_entries = sum(v.numel() for v in means.values())
    num_pruned = int(sum(mask.sum() for mask in masks.values()))
    report = dict(threshold=threshold, num_entries=num_entries, num_pruned=num_pruned, pruned_fraction=num_pruned / num_entries)
    if batches:
        with model.hold_adapters(means):
            before = [model.logits(batch) for batch in batches]
            report["nll_before"] = token_nll(model.whisper, batches)
        with model.hold_adapters(pruned):
            after = [model.logits(batch) for batch in batches]
            report["nll_after"] = token_nll(model.whisper, batches)
        report["max_logit_change"] = max(float((a - b).abs().max()) for a, b in zip(after, before))
    return pruned, PruneReport(**report)


def _target_modules(model: BLoRAWhisper) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly the adapted layers: their leaf names when those
    select nothing else (the usual form, e.g. ["k_proj", "q_proj"]), else a regex of their paths."""
    adapted = adapted_modules(model)
    leaves = sorted({path.rpartition(".")[2] for path in adapted})
    # An adapted layer keeps its original nn.Linear as its child "base".
    linear = {name.removesuffix(".base") for name, sub in model.whisper.named_modules() if isinstance(sub, torch.nn.Linear)}
    selected = {name for name in linear if name.rpartition(".")[2] in leaves}
    if selected == set(adapted):
        return leaves
    return "|".join(re.escape(path) for path in adapted)


def export_peft(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    folder: str | Path,
    *,
    prune_threshold: float | None = None,
    batches: Sequence[Mapping] = (),
    base_model_name_or_path: str | None = None,
) -> PruneReport | None:
    """Write the posterior mean as a peft LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) loadable with ``peft.PeftModel.from_pretrained(base, folder)``.

    With ``prune_threshold`` the entries of A and B with |mean| below it are set to 0 first; the
    report (also written to ``pruning.json``) gives the pruned fraction and, on ``batches``, the
    largest logit change and the teacher-forced cross-entropy before and after.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - peft is a test dependency
        raise ImportError("exporting a PEFT adapter needs peft: pip install 'pyro-blora[baselines]'") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    means = guide.means()
    report = None
    if prune_threshold is not None:
        means, report = prune_means(model, means, prune_threshold, batches)
        atomic_write_json(folder / PRUNING_REPORT, report.to_dict())
    tensors = {}
    for site, value in means.items():
        path, leaf = module_path(site)
        tensors[f"base_model.model.{path}.{leaf}.weight"] = value.float().cpu().contiguous()
    atomic_write_safetensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    config = LoraConfig(
        r=model.config.rank,
        lora_alpha=lora_alpha(model),
        target_modules=_target_modules(model),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".adapter-config-") as staging:
        config.save_pretrained(staging)  # peft's own serialisation, then one atomic rename, written last
        atomic_write_bytes(folder / ADAPTER_CONFIG, (Path(staging) / ADAPTER_CONFIG).read_bytes())
    return report


# ------------------------------------------------------------------------------------ import
@dataclass(frozen=True)
class PeftAdapter:
    """A peft LoRA adapter as read from its folder."""

    config: dict[str, Any]
    # (A, B) of every adapted layer, keyed by its path inside the Whisper model.
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        return float(self.config["lora_alpha"]) / self.rank


def read_peft_adapter(folder: str | Path) -> PeftAdapter:
    """Read a peft LoRA folder, refusing settings that BLoRA's adapter cannot represent."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"{folder} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(write one with PeftModel.save_pretrained or pyro-blora export-peft)"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA adapters can become BLoRA posteriors")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise ValueError(
                f"{folder}: the adapter uses {key}={config[key]!r}, which BLoRA's plain LoRA update "
                f"W0 + (alpha / r) B A cannot represent; retrain it with {key}={allowed[0]!r}"
            )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}; only lora_A / lora_B weights can be imported")
        pairs.setdefault(match["path"], {})[match["leaf"]] = tensor
    weights = {}
    for path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: layer {path} lacks one of lora_A / lora_B")
        weights[path] = (pair["lora_A"], pair["lora_B"])
    return PeftAdapter(config=config, weights=weights)


def _target_patterns(adapter: PeftAdapter) -> tuple[str, ...]:
    """BLoRA target patterns (re.fullmatch on module paths) for the adapter's layers."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, str) and not adapter.config.get("layers_to_transform"):
        return (targets,)
    if isinstance(targets, list) and targets and not adapter.config.get("layers_to_transform"):
        return tuple(rf"(?:.*\.)?{re.escape(name)}" for name in sorted(targets))
    return tuple(re.escape(path) for path in adapter.weights)


def blora_config_from_peft(folder: str | Path | PeftAdapter, **overrides: Any) -> BLoRAConfig:
    """A BLoRAConfig with the adapter's rank, alpha and target layers; ``overrides`` set the rest
    (prior_scale, beta, ...)."""
    adapter = folder if isinstance(folder, PeftAdapter) else read_peft_adapter(folder)
    values = dict(rank=adapter.rank, alpha=float(adapter.config["lora_alpha"]), target_modules=_target_patterns(adapter))
    return BLoRAConfig(**{**values, **overrides})


def _check_fits(adapter: PeftAdapter, model: BLoRAWhisper, source: str) -> None:
    config = model.config
    fix = "build the model with BLoRAConfig from blora_config_from_peft(folder) (pyro-blora import-peft does this)"
    if adapter.rank != config.rank:
        raise ValueError(f"{source} has rank r={adapter.rank} but the BLoRAConfig has rank={config.rank}; {fix}")
    if not math.isclose(adapter.scaling, config.scaling, rel_tol=1e-6):
        raise ValueError(
            f"{source} has lora_alpha / r = {adapter.scaling:g} but the BLoRAConfig's alpha / rank is "
            f"{config.scaling:g}; set BLoRAConfig(alpha={adapter.config['lora_alpha']}) or {fix}"
        )
    ours = set(adapted_modules(model))
    theirs = set(adapter.weights)
    if ours != theirs:
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise ValueError(
            f"{source} adapts other layers than the BLoRAConfig's target_modules {list(config.target_modules)}: "
            f"{len(missing)} of the model's adapted layers are not in the adapter (e.g. {missing[:2]}), "
            f"{len(extra)} adapter layers are not adapted in the model (e.g. {extra[:2]}); {fix}"
        )


def _site_values(adapter: PeftAdapter, model: BLoRAWhisper, source: str) -> dict[str, torch.Tensor]:
    _check_fits(adapter, model, source)
    return {
        site_name(path, leaf): value
        for path, (lora_A, lora_B) in adapter.weights.items()
        for leaf, value in (("lora_A", lora_A), ("lora_B", lora_B))
    }


def peft_site_values(folder: str | Path, model: BLoRAWhisper) -> dict[str, torch.Tensor]:
    """A peft adapter's A and B keyed by the model's sample sites, e.g. to hold a plain LoRA in the
    BLoRA model (``model.hold_adapters``). The adapter must fit the model's BLoRAConfig."""
    return _site_values(read_peft_adapter(folder), model, str(folder))


@torch.no_grad()
def import_peft(folder: str | Path, model: BLoRAWhisper, guide: BLoRAGuide) -> PeftAdapter:
    """Set the guide's posterior means to a peft adapter's A and B (scales stay as they are).

    The adapter must fit the model's BLoRAConfig (rank, alpha / r, adapted layers) and base model."""
    adapter = read_peft_adapter(folder)
    values = _site_values(adapter, model, str(folder))
    try:
        guide.set_means(values)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None
    return adapter
