"""A forgetting budget: adapt as much as possible while the original domain gets at most X% worse.

The constraint is on the *retention loss*: the teacher-forced cross-entropy per transcript token
of a fixed set of retention utterances (the domain the model already knew), against the same loss of
the base model on the same utterances. The budget holds a one-sided upper confidence bound of its
change, not the point estimate (:func:`pyro_blora.training.budget_bound.retention_bound`, the one
function every use of the budget calls). :class:`~pyro_blora.config.RetentionBudget` holds the options.

During training (:class:`BudgetTracker`) the bound is measured every ``every`` steps (less often while
it is far below the limit). For blora and map the KL weight beta is the Lagrange multiplier of the
constraint and follows it by dual ascent in log space, as GECO does (Rezende & Viola 2018)::

    average <- decay * average + (1 - decay) * upper           (the first measurement starts it)
    log beta <- clamp(log beta + clamp(eta * (average - limit) / limit, +-max_log_step),
                      log beta_min, log beta_max)

where ``upper`` is the bound in nats per token, so beta grows while the constraint is violated and
decays while there is slack. lora and full have no prior, so the budget acts as early stopping
there. Every measurement inside the limit keeps a copy of the trained state; at the end the run
keeps its final weights if they are inside the limit, else the better (lower in-domain loss) of the
last weights measured inside the limit and the final update scaled, W0 + lambda dW, with the largest
lambda inside the limit (:func:`choose_bounded_scale`). Nothing is extrapolated: every kept model had
its bound measured.

The retention set and its loading, with the base model labelling utterances that lack transcripts:
:mod:`pyro_blora.training.retention_set`.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch

from pyro_blora.training import distributed
from pyro_blora.config import RetentionBudget
from pyro_blora.model.interpolation import interpolated
from pyro_blora.model.objective import token_nll_per_utterance
from pyro_blora.training.budget_bound import (RetentionBound, RetentionLosses, far_above_limit, far_from_limit,
                                               retention_bound, retention_losses, retention_name)
# The retention data lives in its own module; its names stay importable from here.
from pyro_blora.training.retention_set import BASE_MODEL_LABELS, LABELS_FILE, RetentionSet, load_retention_set

__all__ = [
    "BASE_MODEL_LABELS",
    "LABELS_FILE",
    "BudgetNotMetWarning",
    "BudgetTracker",
    "RetentionSet",
    "TrainedUpdate",
    "budget_fingerprint",
    "choose_bounded_scale",
    "choose_scale",
    "load_retention_set",
    "parameter_update",
    "posterior_update",
    "transcript_ce",
]


class BudgetNotMetWarning(UserWarning):
    """No weights measured during training kept the retention loss inside the budget."""


def transcript_ce(whisper, batches: Sequence[Mapping]) -> float:
    """The retention loss: teacher-forced cross-entropy (nats) per transcript token of ``batches``.

    Transcript tokens are the text and the end-of-text token; the forced prompt (label ids above
    the end-of-text id) is left out. Every retention loss of this module goes through here."""
    total, tokens = token_nll_per_utterance(whisper, batches).totals("transcript")
    if tokens == 0:
        raise ValueError("the retention batch has no transcript tokens (every label is prompt or padding); "
                         "give retention utterances with transcripts, or none so that the base model labels them")
    return total / tokens


def budget_fingerprint(budget: RetentionBudget, retention: RetentionSet) -> dict[str, Any]:
    """The ``retention`` entry of a budgeted run's ``config.json``: the budget's options and the
    retention set, including where its labels come from."""
    return {**retention.describe(), "budget": budget.to_dict()}


@dataclass
class TrainedUpdate:
    """How the budget reaches a method's trained update dW = W - W0."""

    # A context giving the plain forward model at W0 + scale * dW (1: as trained, 0: the base model).
    scaled: Callable[[float], ContextManager[Any]]
    # Make W0 + scale * dW the trained weights.
    commit: Callable[[float], None]
    # A copy of the trained state, and putting such a copy back.
    snapshot: Callable[[], Any]
    restore: Callable[[Any], None]


def _cloned(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}


def posterior_update(model, guide) -> TrainedUpdate:
    """blora and map: dW = (alpha / r) B A at the posterior means, so scaling the means of B scales
    dW. Committing a scale scales B's posterior (mean and standard deviation), i.e. the posterior of
    scale * B."""

    def values(scale: float) -> dict[str, torch.Tensor]:
        return {site: value * scale if site.endswith(".lora_B") else value for site, value in guide.means().items()}

    @contextmanager
    def scaled(scale: float) -> Iterator[Any]:
        with model.hold_adapters(values(scale)):
            yield model.whisper

    def commit(scale: float) -> None:
        if hasattr(guide, "stddevs"):  # a mean-field guide: q(scale * B) = N(scale * mu, scale * sigma)
            guide.set_stddevs({site: (value * scale).clamp_min(1e-12) if site.endswith(".lora_B") else value
                               for site, value in guide.stddevs().items()})
        guide.set_means(values(scale))

    return TrainedUpdate(scaled, commit, lambda: _cloned(guide.state_dict()), guide.load_state_dict)


def parameter_update(forward_model, trainable: Mapping[str, torch.nn.Parameter],
                     start: Mapping[str, torch.Tensor]) -> TrainedUpdate:
    """Plain weights (lora, full, or any merged model): dW = p - start[name] for the parameters
    named in ``start`` (lora: the B matrices, starting at zero; full: every weight, starting at W0).
    ``trainable`` is everything a snapshot keeps."""
    moving = {name: trainable[name] for name in start}

    @torch.no_grad()
    def set_scale(scale: float) -> None:
        for name, parameter in moving.items():
            parameter.copy_(interpolated(start[name], parameter, scale))

    @contextmanager
    def scaled(scale: float) -> Iterator[Any]:
        saved = {name: p.detach().clone() for name, p in moving.items()}
        try:
            set_scale(scale)
            yield forward_model
        finally:
            with torch.no_grad():
                for name, parameter in moving.items():
                    parameter.copy_(saved[name])

    @torch.no_grad()
    def restore(state: Mapping[str, torch.Tensor]) -> None:
        for name, value in state.items():
            trainable[name].copy_(value)

    return TrainedUpdate(scaled, set_scale, lambda: _cloned({n: p for n, p in trainable.items()}), restore)


def choose_scale(measure: Callable[[float], float], limit: float, grid: int = 10, refine: int = 4,
                 known: Mapping[float, float] | None = None) -> tuple[float | None, list[tuple[float, float]]]:
    """The largest scale lambda in [0, 1] whose measured retention loss ``measure(lambda)`` is at most
    ``limit``: the first of 1, 1 - 1/grid, ..., 0 inside, then ``refine`` bisection steps towards the
    next value up. Returns lambda (None when even 0 breaks the limit) and every (lambda, loss) measured;
    the returned lambda is always one of them."""
    tried: list[tuple[float, float]] = []
    known = dict(known or {})

    def inside(scale: float) -> bool:
        loss = known[scale] if scale in known else measure(scale)
        tried.append((scale, loss))
        return loss <= limit

    points = [1 - i / grid for i in range(grid + 1)]
    found = next((i for i, scale in enumerate(points) if inside(scale)), None)
    if found is None:
        return None, tried
    low = points[found]
    if found == 0:
        return low, tried
    high = points[found - 1]
    for _ in range(refine):
        middle = (low + high) / 2
        if inside(middle):
            low = middle
        else:
            high = middle
    return low, tried


def choose_bounded_scale(bound_at: Callable[[float], RetentionBound], limit: float, budget: RetentionBudget,
                         known: Mapping[float, RetentionBound] | None = None
                         ) -> tuple[float | None, dict[float, RetentionBound]]:
    """:func:`choose_scale` on the retention bound: the largest lambda whose upper bound is inside the
    budget, and every bound measured (by lambda). The end of a budgeted run and the post-hoc lambda of
    ``evaluate`` / ``export`` / ``frontier`` search the same way."""
    bounds = dict(known or {})

    def measure(scale: float) -> float:
        if scale not in bounds:
            bounds[scale] = bound_at(scale)
        return bounds[scale].ce_upper

    scale, _ = choose_scale(measure, limit, budget.scale_grid, budget.scale_refine)
    return scale, bounds


def _kept(bound: RetentionBound) -> dict[str, Any]:
    """The fields of ``result.json``'s ``budget`` that describe the kept model's retention."""
    return {"retain_ce": bound.ce, "retain_ce_upper": bound.ce_upper, "retain_change": bound.change,
            "retain_change_upper": bound.change_upper, "retention_bound": bound.to_dict(), "line": bound.line()}


def _bound(saved: Mapping[str, Any]) -> RetentionBound:
    return RetentionBound(**{k: v for k, v in saved.items() if k != "line"})


class BudgetTracker:
    """The forgetting budget of one training run: measures the retention loss and its upper bound,
    adapts beta (when the model has a prior), keeps the last state inside the limit, and decides what
    the run keeps.

    Its ``state_dict`` (the base model's losses, beta, the moving average, the last state inside the
    limit) goes into every checkpoint, so a resumed run continues exactly as an uninterrupted one."""

    def __init__(self, budget: RetentionBudget, retention: RetentionSet, update: TrainedUpdate, total_steps: int,
                 model=None) -> None:
        self.budget = budget
        self.retention = retention
        self.update = update
        self.total_steps = total_steps
        # The BLoRA model whose beta is the multiplier (None for methods without a prior).
        self.model = model
        self.name = retention_name(retention.source)
        self.base: RetentionLosses | None = None  # the base model's per-utterance losses, measured once
        self.base_ce: float | None = None
        self.limit: float | None = None
        self.average: float | None = None
        self.log_beta: float | None = None
        self.measurements = 0
        self.last: dict[str, Any] | None = None  # {"step", "bound"} of the latest measurement
        self.inside: dict[str, Any] | None = None  # {"step", "bound", "beta", "state"} of the last one inside
        self.seconds = 0.0  # measuring during training, over every process of a resumed run
        # Training-loop seconds of the processes before this one (a resumed run) and when this one's loop
        # began (:meth:`start`): the overhead is that of the whole run, not of its last process.
        self.earlier_loop_seconds = 0.0
        self._began: float | None = None

    # ------------------------------------------------------------------ measuring
    def measure(self, scale: float = 1.0) -> RetentionLosses:
        """The per-utterance retention losses of the trained weights with the update scaled by
        ``scale`` (rank 0 measures, every rank gets the value)."""
        start = time.perf_counter()

        def run() -> RetentionLosses:
            with self.update.scaled(scale) as whisper:
                return retention_losses(whisper, self.retention.batches, self.budget.precision)

        value = distributed.current().on_main(run)
        self.seconds += time.perf_counter() - start
        return value

    def bound(self, scale: float = 1.0) -> RetentionBound:
        """The budget's verdict (:func:`retention_bound`) on the update scaled by ``scale``."""
        return retention_bound(self.budget, self.measure(scale), self.base, self.name)

    def start(self) -> None:
        """Measure the base model (the update scaled by 0) and set the limit; clamp beta into its bounds."""
        if self.base is None:
            self.base = self.measure(0.0)
            self.base_ce = self.base.ce
            self.limit = self.budget.limit(self.base_ce)
            self.seconds = 0.0  # the overhead counted is that of the measurements during training
        if self.model is not None and self.log_beta is None:
            self._set_log_beta(math.log(self.model.beta))
        self._began = time.perf_counter()

    def loop_seconds(self) -> float:
        """Seconds of the training loop so far (measurements included), over every process of the run."""
        return self.earlier_loop_seconds + (0.0 if self._began is None else time.perf_counter() - self._began)

    def _set_log_beta(self, value: float) -> None:
        low, high = math.log(self.budget.beta_min), math.log(self.budget.beta_max)
        self.log_beta = min(high, max(low, value))
        self.model.set_beta(math.exp(self.log_beta))

    def due(self, step: int) -> bool:
        """Every ``every`` steps and after the last one; while the last upper bound was far below the
        limit (:func:`far_from_limit`), only every ``far_every * every`` steps. Without a prior (early
        stopping) also while it was far above it: there a measurement only looks for weights back inside,
        and no beta has to follow it."""
        if step == self.total_steps:
            return True
        if step % self.budget.every:
            return False
        last = None if self.last is None else _bound(self.last["bound"])
        far = last is not None and (far_from_limit(last, self.budget.far_fraction)
                                    or (self.model is None and far_above_limit(last, self.budget.far_fraction)))
        return not far or step % (self.budget.every * self.budget.far_every) == 0

    def after_step(self, step: int) -> dict[str, float]:
        """After optimiser step ``step`` (1-based), when a measurement is :meth:`due`: measure, update
        the average of the upper bound and beta, and return the fields for the step's log record."""
        if not self.due(step):
            return {}
        bound = self.bound()
        self.measurements += 1
        decay, upper = self.budget.decay, bound.ce_upper
        self.average = upper if self.average is None else decay * self.average + (1 - decay) * upper
        record = {"retain_ce": bound.ce, "retain_ce_upper": upper, "retain_change": bound.change,
                  "retain_change_upper": bound.change_upper, "retain_ce_avg": self.average,
                  "retain_limit": self.limit, "retain_slack": self.limit - upper}
        if self.model is not None:
            violation = (self.average - self.limit) / self.limit
            step_bound = self.budget.max_log_step
            self._set_log_beta(self.log_beta + min(step_bound, max(-step_bound, self.budget.lr * violation)))
            record["beta"] = math.exp(self.log_beta)
        self.last = {"step": step, "bound": bound.to_dict()}
        if bound.inside:
            self.inside = {"step": step, "bound": bound.to_dict(), "beta": record.get("beta"),
                           "state": self.update.snapshot()}
        return record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"base": None if self.base is None else self.base.to_dict(), "base_ce": self.base_ce,
                "limit": self.limit, "average": self.average, "log_beta": self.log_beta,
                "measurements": self.measurements, "last": self.last, "inside": self.inside,
                "seconds": self.seconds, "loop_seconds": self.loop_seconds()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "base" not in state:
            raise ValueError("this checkpoint's forgetting budget predates the upper confidence bound (it holds no "
                             "per-utterance base losses); train the run again, without --resume")
        for name in ("base_ce", "limit", "average", "measurements", "last", "inside"):
            setattr(self, name, state[name])
        self.base = None if state["base"] is None else RetentionLosses(**state["base"])
        # (checkpoints written before the overhead spanned resumes lack both: counted from here on)
        self.seconds, self.earlier_loop_seconds = state.get("seconds", 0.0), state.get("loop_seconds", 0.0)
        self.log_beta = None
        if self.model is not None and state["log_beta"] is not None:
            self._set_log_beta(state["log_beta"])

    # ------------------------------------------------------------------ the end
    def finish(self, in_domain: Callable[[Any], float]) -> dict[str, Any]:
        """Decide what the run keeps (see the module's docstring), leave those weights in place and
        return the summary for ``result.json``. ``in_domain(whisper)`` is the in-domain loss (lower is
        better) that chooses between two models inside the budget. The overhead counts every measurement,
        the search for lambda at the end too, against the training loop's time without them (from
        :meth:`start`, over every process of a resumed run)."""
        during, loop = self.seconds, self.loop_seconds()
        summary = self._decide(in_domain)
        if loop:
            summary["estimate_seconds"] = self.seconds
            summary["search_seconds"] = self.seconds - during
            summary["overhead"] = self.seconds / max(1e-9, loop - during)
        return summary

    def _decide(self, in_domain: Callable[[Any], float]) -> dict[str, Any]:
        context = distributed.current()
        ended = self.last is not None and self.last["step"] == self.total_steps
        final = _bound(self.last["bound"]) if ended else self.bound()
        summary: dict[str, Any] = {
            "budget": self.budget.to_dict(), "described": self.budget.describe(), "retention": self.retention.describe(),
            "confidence": self.budget.confidence, "utterances": len(self.retention),
            "base_retain_ce": self.base_ce, "retain_limit": self.limit, "final_retain_ce": final.ce,
            "final_retain_ce_upper": final.ce_upper,
            "final_beta": None if self.log_beta is None else math.exp(self.log_beta),
            "measurements": self.measurements, "met_during_training": self.inside is not None,
            "last_inside_step": None if self.inside is None else self.inside["step"],
        }
        if final.inside:
            summary.update(kept="final", kept_step=self.total_steps, scale=1.0, met=True, **_kept(final))
            return summary
        candidates = []
        if self.inside is not None:
            final_state = self.update.snapshot()
            self.update.restore(self.inside["state"])
            with self.update.scaled(1.0) as whisper:
                loss = context.on_main(lambda: in_domain(whisper))
            self.update.restore(final_state)
            candidates.append({"kept": "checkpoint", "kept_step": self.inside["step"], "scale": 1.0,
                               "in_domain_loss": loss, **_kept(_bound(self.inside["bound"]))})
        if self.budget.scale_at_end:
            scale, bounds = choose_bounded_scale(self.bound, self.limit, self.budget, known={1.0: final})
            summary["scales_tried"] = [(s, b.ce_upper) for s, b in bounds.items()]
            if scale is not None:
                with self.update.scaled(scale) as whisper:
                    loss = context.on_main(lambda: in_domain(whisper))
                candidates.append({"kept": "scaled", "kept_step": self.total_steps, "scale": scale,
                                   "in_domain_loss": loss, **_kept(bounds[scale])})
        if not candidates:
            summary.update(kept="final", kept_step=self.total_steps, scale=1.0, met=False, **_kept(final))
            warnings.warn(self._never_met(final), BudgetNotMetWarning, stacklevel=3)
            summary["message"] = self._never_met(final)
            return summary
        chosen = min(candidates, key=lambda c: c["in_domain_loss"])
        if chosen["kept"] == "checkpoint":
            self.update.restore(self.inside["state"])
        else:
            self.update.commit(chosen["scale"])
        summary.update(chosen, met=True, candidates=[{k: c[k] for k in ("kept", "kept_step", "scale", "retain_ce",
                                                                          "retain_ce_upper", "in_domain_loss")}
                                                     for c in candidates])
        if self.inside is None:
            summary["message"] = self._never_met(final) + f" The run keeps its final update scaled by {chosen['scale']:.4g}."
            warnings.warn(summary["message"], BudgetNotMetWarning, stacklevel=3)
        return summary

    def _never_met(self, final: RetentionBound) -> str:
        return (f"the forgetting budget ({self.budget.describe()}: an upper bound of the retention loss of at most "
                f"{self.limit:.4f}) was never met during training: all {self.measurements} measurements were above "
                f"it (the last: {final.line()}).")
