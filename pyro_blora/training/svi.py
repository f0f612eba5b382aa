"""Stochastic variational inference for BLoRA, on the shared loop.

Each step estimates the beta-scaled negative ELBO with :func:`pyro_blora.model.objective.elbo_terms`
(Trace_ELBO by default, under the chosen weight noise) and takes an Adam step on the guide's
parameters, with its own learning rate for the scales. :func:`train` fits any guide with ``setup()``
and ``means()``: the mean-field guide (BLoRA) or the point guide (MAP).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyro
from pyro.infer import is_validation_enabled
import torch

from pyro_blora.config import RetentionBudget, TrainConfig
from pyro_blora.model.encoder_window import FULL_WINDOW_SECONDS, encoder_input_frames, window_frames
from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.model.noise import local_noise
from pyro_blora.model.objective import ElboTerms, elbo_scaling, elbo_terms
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.model.objective import token_nll
from pyro_blora.runs import RunFolder
from pyro_blora.training import distributed
from pyro_blora.metrics.scales import scale_quantiles
from pyro_blora.training.convergence import (
    curvature_batches, curvature_scales, posterior_convergence, site_prior_scales, weighted_kl, weighted_kl_of_means,
)
from pyro_blora.training.budget import BudgetTracker, RetentionSet, budget_fingerprint, posterior_update
from pyro_blora.training.loop import (
    Optimization,
    TrainResult,
    batch_order,
    count_label_tokens,
    finish_budget,
    make_batch,
    make_optimizer,
    run_steps,
)

__all__ = ["PosteriorCollapseWarning", "noisy_elbo_terms", "svi_parameter_groups", "train", "validated_first_step"]


class PosteriorCollapseWarning(UserWarning):
    """The adapter means stayed at zero and the model is no better than the base model."""


def svi_parameter_groups(guide, config: TrainConfig) -> list[dict[str, Any]]:
    """Adam groups: the scales (AutoNormal's ``scales.*``) at ``lr * scale_lr_multiplier``,
    everything else (means, or a MAP guide's point values) at ``lr``."""
    scales = [p for n, p in guide.named_parameters() if n.startswith("scales.")]
    others = [p for n, p in guide.named_parameters() if not n.startswith("scales.")]
    groups = [{"params": others, "lr": config.lr}]
    if scales:
        groups.append({"params": scales, "lr": config.lr * config.scale_lr_multiplier})
    return groups


def _posterior_nll(model: BLoRAWhisper, guide: BLoRAGuide, batches: Sequence[Mapping]) -> float:
    with model.hold_adapters(guide.means()):
        return token_nll(model.whisper, batches)


def noisy_elbo_terms(model: BLoRAWhisper, guide, batch: Mapping, config: TrainConfig) -> ElboTerms:
    """One ELBO estimate under the configured weight noise (pyro_blora.model.noise)."""
    with local_noise(config.weight_noise):
        return elbo_terms(model, guide, batch, config.estimator, config.num_particles)


def validated_first_step(objective: Callable[[Mapping], ElboTerms]) -> Callable[[Mapping], ElboTerms]:
    """The objective with Pyro's validation on its first call only (when validation is on at all).

    Validation checks every site's support, shape and NaN at every step: on Whisper base with q/k
    adapters about 11,000 of the 30,000 small operator calls BLoRA adds to a LoRA step. A wrong
    setup shows on the first step; after it the values only move, and the loop stops on a
    non-finite loss or gradient anyway. Results are unchanged: validation reads, it draws nothing."""
    calls = 0

    def objective_once_validated(batch: Mapping) -> ElboTerms:
        nonlocal calls
        calls += 1
        with pyro.validation_enabled(calls == 1 and is_validation_enabled()):
            return objective(batch)
    return objective_once_validated


def train(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    dataset,
    collate_fn: Callable[[list], dict],
    config: TrainConfig = TrainConfig(),
    eval_batches: Sequence[Mapping] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    num_tokens: int | None = None,
    run_info: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[dict[str, Any], BLoRAWhisper, BLoRAGuide], None]] = (),
    evaluate: Callable[[], Mapping[str, float]] | None = None,
    save: Callable[[], None] | None = None,
    budget: RetentionBudget | None = None,
    retention: RetentionSet | None = None,
) -> TrainResult:
    """Fit ``guide`` to the posterior of ``model`` on ``dataset`` by SVI.

    ``dataset[i]`` returns one example, ``collate_fn`` turns a list of them into a batch with
    ``input_features`` and ``labels`` (padded with -100). ``eval_batches`` (default: the first
    training batch) are scored at the posterior mean before training, every ``eval_every`` steps
    and at the end; the first score is the base model's, since B starts at zero. Each callback
    gets every step's record (step, loss, nll, kl, grad_norm, lr, eval_nll when evaluated) with the
    model and guide, e.g. for experiment trackers. ``evaluate`` adds its fields to the records of
    evaluated steps. ``save`` writes the trained weights (on the main process) before ``result.json``,
    so a run with a result always has its weights. Any guide with ``setup()`` and ``means()`` works:
    :class:`BLoRAGuide` (SVI) or :class:`~pyro_blora.model.guide.BLoRAMAPGuide` (MAP: the prior as an L2 penalty).

    ``budget`` with ``retention`` (the fixed retention batch) is a forgetting budget
    (:mod:`pyro_blora.training.budget`): the retention loss is measured every ``budget.every`` steps and logged
    (``retain_ce``, ``retain_slack``, ``beta``), beta follows it by dual ascent, and at the end the run
    keeps weights whose measured retention loss is inside the budget (``result.budget`` says which).
    """
    if len(dataset) == 0:
        raise ValueError("the training set is empty; check the data report for rows that were filtered out")
    window = config.encoder_window_seconds
    if window != FULL_WINDOW_SECONDS and encoder_input_frames(model.whisper) != window_frames(window):
        raise ValueError(
            f"the model's encoder takes {encoder_input_frames(model.whisper)} frames but encoder_window_seconds="
            f"{config.encoder_window_seconds}; cut the model first with pyro_blora.set_encoder_window (run_training does)"
        )
    if config.gradient_checkpointing and config.weight_noise != "shared":
        raise ValueError(
            f"gradient checkpointing recomputes layers with the batch's shared adapter draw, so it cannot be combined "
            f"with weight_noise={config.weight_noise!r}; use weight_noise='shared' or turn gradient checkpointing off"
        )
    if (budget is None) != (retention is None):
        raise ValueError("a forgetting budget needs both budget= (a RetentionBudget) and retention= (a RetentionSet "
                         "of the domain to keep); give both or neither")
    device = next(model.whisper.parameters()).device
    num_tokens = num_tokens or count_label_tokens(dataset, collate_fn)
    model.configure_objective(elbo_scaling(model.config, len(dataset), num_tokens, model.num_adapter_parameters()))
    guide.setup()
    guide.to(device)
    result = TrainResult(run_dir=Path(run_dir) if run_dir else None)
    context = distributed.current()
    run = None
    if run_dir is not None:
        fingerprint = {"blora": model.config.to_dict(), "train": config.to_dict(), "run": dict(run_info or {})}
        if budget is not None:
            fingerprint["retention"] = budget_fingerprint(budget, retention)
        run = context.on_main(lambda: RunFolder(run_dir, fingerprint, resume, config.keep_checkpoints))
    if eval_batches is None:
        eval_batches = [make_batch(dataset, collate_fn, batch_order(len(dataset), config.batch_size, config.seed, 0), device)]

    mean_field = isinstance(guide, BLoRAGuide)

    def scale_pass() -> dict[str, torch.Tensor]:
        batches = curvature_batches(dataset, collate_fn, config.batch_size, config.seed, config.curvature_batches, device)
        return curvature_scales(model, guide.means(), batches, num_tokens, seed=config.seed)

    def periodic_eval() -> dict[str, float]:
        fields = {"eval_nll": _posterior_nll(model, guide, eval_batches)}
        if mean_field:  # the scales' trajectory and the KL without Monte Carlo noise
            fields.update(scale_quantiles(guide.stddevs()))
            fields["kl_analytic"] = weighted_kl(model, guide)
            fields["kl_means"] = weighted_kl_of_means(model, guide)
        if evaluate is not None:
            fields.update(evaluate())
        return fields

    tracker = None
    if budget is not None:
        tracker = BudgetTracker(budget, retention.to(device), posterior_update(model, guide), config.steps, model=model)
    optimization = Optimization(
        objective=validated_first_step(lambda batch: noisy_elbo_terms(model, guide, batch, config)),
        stateful={"guide": guide, **({"budget": tracker} if tracker is not None else {})},
        optimizer=make_optimizer(svi_parameter_groups(guide, config), config),
        config=config,
        evaluate=periodic_eval,
        failure_hint=(
            f"Likely causes: a learning rate too high ({config.lr}, scales x{config.scale_lr_multiplier}), "
            f"initial scales too large (init_scale_A={model.config.init_scale_A}, init_scale_B="
            f"{model.config.init_scale_B}), beta / the KL normalisation ({model.config.beta}, "
            f"{model.config.kl_normalization}) out of range."
        ),
        desc="SVI",
        after_step=tracker.after_step if tracker is not None else None,
    )
    state = context.on_main(run.latest_state) if run is not None else None
    start = 0
    if state is not None:
        start = optimization.restore(state)
        result.history = state["history"]
        result.base_nll = state["base_nll"]
    else:
        pyro.set_rng_seed(config.seed)
        model.eval()
        result.base_nll = _posterior_nll(model, guide, eval_batches)
        if mean_field and config.scale_init == "curvature":
            guide.set_stddevs(scale_pass())
    model.train(False)  # dropout off: the randomness of SVI is the adapter noise alone
    if tracker is not None:
        tracker.start()
    recompute = gradient_checkpointing(model.whisper, model.adapters().values()) if config.gradient_checkpointing \
        else nullcontext()
    with recompute:
        run_steps(
            optimization, dataset, collate_fn, device, result.history, start, run,
            extra_state={"base_nll": result.base_nll},
            callbacks=[lambda record, cb=cb: cb(record, model, guide) for cb in callbacks],
        )
    if tracker is not None:
        result.budget = finish_budget(tracker, lambda whisper: token_nll(whisper, eval_batches), evaluate)
    result.final_nll = _posterior_nll(model, guide, eval_batches)
    if mean_field and config.curvature_batches:
        result.posterior = context.on_main(lambda: posterior_convergence(
            guide.stddevs(), scale_pass(), result.history, config.steps, site_prior_scales(model)))
    result.collapsed = _collapsed(model, guide, result.base_nll, result.final_nll)
    if result.collapsed:
        warnings.warn(
            f"posterior collapse: every adapter mean is ~0 and the NLL ({result.final_nll:.4f}) is no better than the "
            f"base model's ({result.base_nll:.4f}). The KL dominates: lower beta ({model.config.beta}), use "
            "kl_normalization='parameter', or raise the prior scale.",
            PosteriorCollapseWarning,
            stacklevel=2,
        )
    if context.is_main:
        if save is not None:  # the weights first: result.json, written last, marks a finished run
            save()
        if run is not None:
            run.write_result({k: v for k, v in vars(result).items() if k != "history"})
    return result


def _collapsed(model: BLoRAWhisper, guide: BLoRAGuide, base_nll: float, final_nll: float, tol: float = 0.01) -> bool:
    """Means inside the prior's bulk (mean |mu| of A and of B below sigma_p: A has left its
    Kaiming start) and an NLL no better than the base model's."""
    means = guide.means()
    sigma_p = model.config.prior_scale
    near_zero = all(
        float(torch.cat([v.flatten().abs() for k, v in means.items() if k.endswith(which)]).mean()) < sigma_p
        for which in ("lora_A", "lora_B")
    )
    return near_zero and final_nll >= base_nll * (1 - tol)
