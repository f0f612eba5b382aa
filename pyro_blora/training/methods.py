"""The adaptation methods the experiment compares, each trained the same way on the same data.

* ``blora``: Bayesian LoRA, SVI with the mean-field :class:`~pyro_blora.model.guide.BLoRAGuide`;
* ``map``: the same Pyro model with point estimates (:class:`~pyro_blora.model.guide.BLoRAMAPGuide`): the
  prior acts as an L2 penalty with BLoRA's weight;
* ``lora``: peft's LoRA on the same target layers, rank and scaling (no prior);
* ``full``: every weight trainable.

All of them run :func:`pyro_blora.training.loop.run_steps`: the same batch order, optimiser (Adam), LR
schedule, gradient clipping, precision, checkpoints and log format. A run folder holds
``config.json``, ``log.jsonl``, ``checkpoints/``, ``result.json`` and the trained weights:
``posterior/`` (blora, map), ``adapter/`` (lora, peft format) or ``model/`` (full).

A run can start where another ended, for sequential adaptation to several domains:

* ``model_source`` may be a finished run folder: its adapted model (e.g. the posterior mean merged
  into its base) is this run's base;
* ``init_from``: the previous run's trained adapter is the starting point (blora, map, lora), on the
  same base with the same adapters;
* ``prior_from`` (blora, map): the previous run's posterior becomes the prior, per entry, and the
  guide starts at it (variational continual learning; for map an L2 penalty towards the previous
  point with BLoRA's sigma_p and weight). :class:`PriorTransfer` changes how: a floor on the copied
  scales (a posterior can be narrower than the original prior), or one isotropic scale at the same
  mean precision (``map-anchor``: anchored to the previous weights without their per-entry uncertainty).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import pyro
import torch
from transformers import WhisperForConditionalGeneration

from pyro_blora.training import distributed
from pyro_blora.training.budget import LABELS_FILE, BudgetTracker, RetentionSet, budget_fingerprint, load_retention_set
from pyro_blora.training.budget import parameter_update
from pyro_blora.config import BLoRAConfig, RetentionBudget, TrainConfig
from pyro_blora.data.training_data import TrainingData, load_training_data
from pyro_blora.model.encoder_window import set_encoder_window, window_frames
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, evaluate_whisper
from pyro_blora.model.guide import build_guide, guide_kind
from pyro_blora.predict.monte_carlo import token_nll
from pyro_blora.model.injection import find_target_modules
from pyro_blora.model.whisper import BLoRAWhisper, wrap_whisper
from pyro_blora.model.objective import IGNORE_INDEX, ElboTerms, token_cross_entropy
from pyro_blora.posterior import read_posterior_config, save_posterior
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.runs import METHODS, RunFolder, finished, load_run_model, read_run_config
from pyro_blora.training.loop import (
    Optimization,
    TrainResult,
    batch_order,
    finish_budget,
    make_batch,
    make_optimizer,
    run_steps,
    train,
)

__all__ = [
    "PriorTransfer",
    "copied_prior",
    "TrainingData",
    "load_training_data",
    "run_training",
]

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


def _curve(sets: Mapping[str, EvalSet] | None, options: EvalOptions, processor,
           model_for_eval: Callable[[], Any]) -> Callable[[], dict[str, float]] | None:
    """Log fields ``<domain>/ce``, ``<domain>/error_rate`` (and ``/language_id``) of the model as trained so far."""
    if not sets:
        return None

    def evaluate() -> dict[str, float]:
        with model_for_eval() as whisper:
            results = evaluate_whisper(whisper, processor, sets, replace(options, progress=False))
        return {f"{domain}/{metric}": value for domain, entry in results.items()
                for metric, value in entry.items() if metric in ("ce", "error_rate", "language_id")}

    return evaluate


class _TrainableState:
    """The trainable tensors of a module as a checkpointable state (frozen weights are not saved)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def _teacher_forced_loss(whisper: WhisperForConditionalGeneration, batch: Mapping) -> ElboTerms:
    """Mean token cross-entropy: the NLL term of the other methods' objective, with no KL."""
    nll = token_cross_entropy(whisper, batch, reduction="mean")
    num_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    return ElboTerms(loss=nll, nll=nll, kl=torch.zeros(()), num_tokens=num_tokens, weight=float(num_tokens))


def _fingerprint(method: str, model_source: str, data: TrainingData, blora_config: BLoRAConfig,
                 train_config: TrainConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    run = {"method": method, "model_source": str(model_source), "train_data": data.source,
           "train_split": data.split, "train_utterances": len(data), "seed": train_config.seed, **extra}
    return {"blora": blora_config.to_dict(), "train": train_config.to_dict(), "run": run}


def run_training(
    method: str,
    model_source: str | Path,
    data: TrainingData,
    out_dir: str | Path,
    blora_config: BLoRAConfig = BLoRAConfig(),
    train_config: TrainConfig = TrainConfig(),
    *,
    whisper_and_processor: tuple[WhisperForConditionalGeneration, Any] | None = None,
    curve_sets: Mapping[str, EvalSet] | None = None,
    curve_options: EvalOptions = EvalOptions(decode_limit=8),
    resume: bool = False,
    run_info: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    prior_from: str | Path | None = None,
    prior_transfer: PriorTransfer = PriorTransfer(),
    device: torch.device | str | None = None,
    budget: RetentionBudget | None = None,
    retain: str | Path | RetentionSet | None = None,
    retain_split: str = "dev",
    cache_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``method`` from ``model_source`` (a model or a finished run folder) on ``data`` into the
    run folder ``out_dir``.

    ``blora_config`` gives the adapter (targets, rank, alpha) for blora, map and lora, and the prior
    for blora and map. With ``train_config.eval_every`` the ``curve_sets`` are scored every that many
    steps (teacher-forced CE on all, greedy error on ``curve_options.decode_limit`` utterances) and
    the scores go into that step's log record. ``whisper_and_processor`` reuses an already loaded
    base model (it is modified in place). ``init_from`` and ``prior_from`` name a finished previous
    run on the same base with the same adapters (see the module's docstring); ``prior_transfer`` says
    how ``prior_from``'s posterior becomes the prior (its summary goes into the posterior's metadata as
    ``prior``). ``device`` defaults to this process's GPU when there is one.

    ``budget`` with ``retain`` (a retention data source, e.g. ``testbed/en``, whose ``retain_split``
    is used, or a ready :class:`~pyro_blora.training.budget.RetentionSet`) is a forgetting budget
    (:mod:`pyro_blora.training.budget`): blora and map adapt beta to keep the retention loss inside it, lora
    and full keep their last weights inside it (early stopping); every method may end with its
    update scaled. Retention utterances without transcripts are labelled with the base model's
    greedy transcripts, kept in ``<out>/retention-labels.json``; ``config.json`` says so.

    Launched by torchrun (``torchrun --nproc-per-node K -m pyro_blora.cli train ...``) it trains
    data-parallel: each process scores its share of every batch and rank 0 writes the run folder
    (gloo on CPUs, NCCL on GPUs; see :mod:`pyro_blora.training.distributed`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (budget is None) != (retain is None):
        raise ValueError("a forgetting budget needs both budget= (a RetentionBudget) and retain= (the retention "
                         "data, e.g. testbed/en); give both or neither")
    previous = _previous_run(method, model_source, blora_config, init_from, prior_from)
    transfer = _checked_transfer(prior_transfer, previous if prior_from is not None else None, model_source, blora_config)
    device = torch.device(device) if device is not None else distributed.default_device()
    with distributed.distributed_session(device):
        return _run_training(method, model_source, data, out_dir, blora_config, train_config, device,
                             whisper_and_processor, curve_sets, curve_options, resume, run_info,
                             previous, transfer if prior_from is not None else None,
                             budget, retain, retain_split, cache_dir)


def _checked_transfer(transfer: PriorTransfer, prior_from: Path | None, model_source, blora_config: BLoRAConfig) -> PriorTransfer:
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


def _run_training(method, model_source, data: TrainingData, out_dir, blora_config: BLoRAConfig,
                  train_config: TrainConfig, device: torch.device, whisper_and_processor, curve_sets,
                  curve_options, resume, run_info, previous: Path | None,
                  transfer: PriorTransfer | None, budget: RetentionBudget | None = None, retain=None,
                  retain_split: str = "dev", cache_dir=None) -> TrainResult:
    whisper, processor = whisper_and_processor or load_run_model(model_source)[:2]
    set_encoder_window(whisper, train_config.encoder_window_seconds)
    n_frames = window_frames(train_config.encoder_window_seconds)
    data = replace(data, collate=replace(data.collate, n_frames=n_frames))
    whisper.to(device)
    out = Path(out_dir)
    retention = None
    if budget is not None:  # labelled by the base model as it is now, before any adapter goes in
        retention = retain if isinstance(retain, RetentionSet) else distributed.current().on_main(
            lambda: load_retention_set(retain, processor, whisper, budget.utterances, retain_split, cache_dir,
                                       out / LABELS_FILE, n_frames, model_name=str(model_source)))
        retention = retention.to(device)
    extra = dict(run_info or {})
    as_prior = transfer is not None
    if previous is not None:
        extra["prior_from" if as_prior else "init_from"] = str(previous)
    if as_prior and not transfer.is_default:
        extra["prior_transfer"] = transfer.to_dict()
    fingerprint = _fingerprint(method, str(model_source), data, blora_config, train_config, extra)
    torch.manual_seed(train_config.seed)
    pyro.set_rng_seed(train_config.seed)
    if method in ("blora", "map"):
        model = wrap_whisper(whisper, blora_config)
        guide = build_guide(model, "normal" if method == "blora" else "delta")
        metadata = {"base_model": str(model_source), "method": method,
                    "encoder_window_seconds": train_config.encoder_window_seconds}
        if previous is not None:
            prior = _start_at_posterior(model, guide, previous / "posterior", transfer)
            if prior is not None:
                metadata["prior"] = prior
        evaluate = _curve(curve_sets, curve_options, processor, lambda: _means_held(model, guide))
        metadata.update({k: extra[k] for k in ("init_from", "prior_from") if k in extra})
        return train(model, guide, data.dataset, data.collate, train_config, run_dir=out, resume=resume,
                     run_info=fingerprint["run"], evaluate=evaluate,
                     save=lambda: save_posterior(out / "posterior", model, guide, metadata=metadata),
                     budget=budget, retention=retention)
    return _train_plain(method, whisper, processor, data, out, blora_config, train_config, fingerprint,
                        curve_sets, curve_options, resume, previous, budget, retention)


def _same_source(a: str | Path, b: str | Path) -> bool:
    """Two model sources name the same model: the same folder, or the same name."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() if a.exists() and b.exists() else str(a) == str(b)


def _previous_run(method: str, model_source: str | Path, blora_config: BLoRAConfig,
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
def _start_at_posterior(model: BLoRAWhisper, guide, folder: Path, transfer: PriorTransfer | None) -> dict[str, Any] | None:
    """Start ``guide`` at the posterior saved in ``folder`` and, given a ``transfer``, make that
    posterior the prior (see :class:`PriorTransfer`); returns the prior's summary then. A guide of the
    same kind takes the saved parameters bit for bit, so the KL against a copied prior starts at 0."""
    from safetensors.torch import load_file

    info = read_posterior_config(folder)
    state = load_file(str(folder / "posterior.safetensors"))
    if info.get("guide", "normal") == guide_kind(guide):
        guide.load_state_dict(state, strict=True)
    else:  # the other kind: only the means carry over
        guide.set_means(_means_of(model, info, state))
    if transfer is None:
        return None
    if transfer.scales == "mean-precision":
        stddevs = _saved_guide(model, transfer.precision_from / "posterior").stddevs()
    else:
        stddevs = guide.stddevs() if guide_kind(guide) == "normal" else model.config.prior_scale
    scales, summary = copied_prior(guide.means(), stddevs, transfer)
    model.set_site_priors(guide.means(), scales)
    return summary


def _saved_guide(model: BLoRAWhisper, folder: Path):
    """The guide saved in the posterior folder ``folder``, rebuilt over ``model``'s sites."""
    from safetensors.torch import load_file

    guide = build_guide(model, read_posterior_config(folder).get("guide", "normal"))
    guide.load_state_dict(load_file(str(folder / "posterior.safetensors")), strict=True)
    return guide


def _means_of(model: BLoRAWhisper, info: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The means of a saved guide of the other kind, read through a guide of that kind."""
    other = build_guide(model, info.get("guide", "normal"))
    other.load_state_dict(state, strict=True)
    return other.means()


@contextmanager
def _means_held(model: BLoRAWhisper, guide) -> Iterator[WhisperForConditionalGeneration]:
    """The BLoRA model's Whisper with the guide's means held in the adapters."""
    with model.hold_adapters(guide.means()):
        yield model.whisper


def _train_plain(method, whisper, processor, data: TrainingData, out: Path, blora_config: BLoRAConfig,
                 train_config: TrainConfig, fingerprint, curve_sets, curve_options, resume,
                 previous: Path | None = None, budget: RetentionBudget | None = None,
                 retention: RetentionSet | None = None) -> TrainResult:
    """LoRA (peft) or full fine-tuning with the shared loop; LoRA continues ``previous``'s adapter if given."""
    if method == "lora" and previous is not None:
        from peft import PeftModel

        trainable = PeftModel.from_pretrained(whisper, str(previous / "adapter"), is_trainable=True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = find_target_modules(whisper, blora_config.target_modules)
        lora = LoraConfig(r=blora_config.rank, lora_alpha=blora_config.scaling * blora_config.rank,
                          target_modules=targets, lora_dropout=0.0)
        trainable = get_peft_model(whisper, lora)  # injects into `whisper` in place
    else:
        fingerprint["blora"] = None
        for parameter in whisper.parameters():
            parameter.requires_grad_(True)
        trainable = whisper
    device = next(whisper.parameters()).device
    context = distributed.current()
    if budget is not None:
        fingerprint["retention"] = budget_fingerprint(budget, retention)
    run = context.on_main(lambda: RunFolder(out, fingerprint, resume, train_config.keep_checkpoints))
    eval_batches = [make_batch(data.dataset, data.collate,
                               batch_order(len(data), train_config.batch_size, train_config.seed, 0), device)]
    curve = _curve(curve_sets, curve_options, processor, lambda: nullcontext(whisper))

    def periodic_eval() -> dict[str, float]:
        fields = {"eval_nll": token_nll(whisper, eval_batches)}
        if curve is not None:
            fields.update(curve())
        return fields

    params = [p for p in trainable.parameters() if p.requires_grad]
    tracker = None
    if budget is not None:  # no prior: the budget is early stopping (and the update's scale at the end)
        named = {n: p for n, p in trainable.named_parameters() if p.requires_grad}
        origin = {n: torch.zeros_like(p) if method == "lora" else p.detach().clone()  # W0: before any resume
                  for n, p in named.items() if method != "lora" or ".lora_B." in n}
        tracker = BudgetTracker(budget, retention, parameter_update(whisper, named, origin), train_config.steps)
    optimization = Optimization(
        objective=lambda batch: _teacher_forced_loss(whisper, batch),
        stateful={"trainable": _TrainableState(trainable), **({"budget": tracker} if tracker is not None else {})},
        optimizer=make_optimizer(params, train_config),
        config=train_config,
        evaluate=periodic_eval,
        failure_hint=f"Likely cause: a learning rate too high ({train_config.lr}).",
        desc=method,
        after_step=tracker.after_step if tracker is not None else None,
    )
    result = TrainResult(run_dir=out)
    state = context.on_main(run.latest_state)
    start = 0
    if state is not None:
        start = optimization.restore(state)
        result.history, result.base_nll = state["history"], state["base_nll"]
    else:
        result.base_nll = token_nll(whisper, eval_batches)
    whisper.eval()  # dropout off, as in SVI
    if tracker is not None:
        tracker.start()
    began = time.perf_counter()
    with gradient_checkpointing(whisper) if train_config.gradient_checkpointing else nullcontext():
        run_steps(optimization, data.dataset, data.collate, device, result.history, start, run,
                  extra_state={"base_nll": result.base_nll})
    if tracker is not None:
        result.budget = finish_budget(tracker, lambda model: token_nll(model, eval_batches),
                                      time.perf_counter() - began, curve)
    result.final_nll = token_nll(whisper, eval_batches)
    if not context.is_main:
        return result
    if method == "lora":
        trainable.save_pretrained(str(out / "adapter"))
    else:
        whisper.save_pretrained(str(out / "model"))
        processor.save_pretrained(str(out / "model"))
    run.write_result({k: v for k, v in vars(result).items() if k != "history"})
    return result
