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

A run can start where another ended (sequential adaptation): :mod:`pyro_blora.training.continual`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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
from pyro_blora.model.guide import build_guide
from pyro_blora.model.objective import token_nll
from pyro_blora.model.injection import find_target_modules
from pyro_blora.model.whisper import BLoRAWhisper, wrap_whisper
from pyro_blora.model.objective import IGNORE_INDEX, ElboTerms, token_cross_entropy
from pyro_blora.posterior import save_posterior
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.runs import METHODS, RunFolder, load_run_model
from pyro_blora.training.continual import PriorTransfer, checked_transfer, previous_run, start_at_posterior
from pyro_blora.training.loop import (
    Optimization,
    TrainResult,
    batch_order,
    finish_budget,
    make_batch,
    make_optimizer,
    run_steps,
)
from pyro_blora.training.svi import train

__all__ = [
    "PriorTransfer",
    "TrainingData",
    "load_training_data",
    "run_training",
    "teacher_forced_loss",
]


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


def teacher_forced_loss(whisper: WhisperForConditionalGeneration, batch: Mapping) -> ElboTerms:
    """Mean token cross-entropy: the NLL term of the other methods' objective, with no KL."""
    nll = token_cross_entropy(whisper, batch, reduction="mean")
    num_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    return ElboTerms(loss=nll, nll=nll, kl=torch.zeros(()), num_tokens=num_tokens, weight=float(num_tokens))


def _fingerprint(method: str, model_source: str, data: TrainingData, blora_config: BLoRAConfig,
                 train_config: TrainConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    run = {"method": method, "model_source": str(model_source), "train_data": data.source,
           "train_split": data.split, "train_utterances": len(data), "seed": train_config.seed, **extra}
    if data.columns:  # only where given, so that runs on canonical columns keep their fingerprint
        run["train_columns"] = dict(data.columns)
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
    previous = previous_run(method, model_source, blora_config, init_from, prior_from)
    transfer = checked_transfer(prior_transfer, previous if prior_from is not None else None, model_source, blora_config)
    device = torch.device(device) if device is not None else distributed.default_device()
    with distributed.distributed_session(device):
        return _run_training(method, model_source, data, out_dir, blora_config, train_config, device,
                             whisper_and_processor, curve_sets, curve_options, resume, run_info,
                             previous, transfer if prior_from is not None else None,
                             budget, retain, retain_split, cache_dir)


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
            prior = start_at_posterior(model, guide, previous / "posterior", transfer)
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
        objective=lambda batch: teacher_forced_loss(whisper, batch),
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
    with gradient_checkpointing(whisper) if train_config.gradient_checkpointing else nullcontext():
        run_steps(optimization, data.dataset, data.collate, device, result.history, start, run,
                  extra_state={"base_nll": result.base_nll})
    if tracker is not None:
        result.budget = finish_budget(tracker, lambda model: token_nll(model, eval_batches), curve)
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
