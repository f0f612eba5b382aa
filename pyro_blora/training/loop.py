"""The optimisation loop every method shares: mini-batches, schedules, checkpoints, resume.

:func:`run_steps` takes an :class:`Optimization` (the objective on one batch, what to checkpoint,
the optimiser) and runs it with the project's batch order, warm-up + cosine schedule, gradient
clipping, bf16 autocast, JSONL log and checkpoints. A run resumed from its last checkpoint continues
exactly where it stopped (same data order, same RNG states). SVI (:mod:`pyro_blora.training.svi`)
and the plain methods (:mod:`pyro_blora.training.methods`) are objectives on top of it.
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pyro_blora.checkpoint import capture_rng, restore_rng
from pyro_blora.config import TrainConfig
from pyro_blora.model.objective import ElboTerms
from pyro_blora.runs import RunFolder
from pyro_blora.training import distributed
from pyro_blora.training.budget import BudgetTracker

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainingInterrupted",
    "Optimization",
    "batch_order",
    "count_label_tokens",
    "finish_budget",
    "lr_schedule",
    "make_batch",
    "make_optimizer",
    "run_steps",
]


class NonFiniteLossError(RuntimeError):
    """The ELBO became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after the step in progress, which was checkpointed.

    A KeyboardInterrupt, so an uncaught one ends a program as Ctrl-C does; ``step`` is where a
    resumed run (``resume=True``) continues."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved, "
            "continue with resume=True (--resume)"
        )
        self.signal = signum
        self.step = step


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    base_nll: float | None = None
    final_nll: float | None = None
    collapsed: bool = False
    run_dir: Path | None = None
    # A budgeted run's end (pyro_blora.training.budget.BudgetTracker.finish): what it kept, its retention
    # loss against the limit, the final beta, and whether the budget was met.
    budget: dict[str, Any] | None = None
    # A mean-field posterior's convergence verdict (pyro_blora.training.convergence.posterior_convergence).
    posterior: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def batch_order(num_items: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of mini-batch ``step``: a fresh seeded permutation per epoch, so the data
    position of a run is its step count and nothing else."""
    per_epoch = max(1, num_items // batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutation = torch.randperm(num_items, generator=generator)
    if num_items < batch_size:
        return permutation
    return permutation[position * batch_size:(position + 1) * batch_size]


def make_batch(dataset, collate_fn: Callable, indices: torch.Tensor, device: torch.device) -> dict[str, Any]:
    batch = collate_fn([dataset[int(i)] for i in indices])
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["index"] = indices.to(device)
    return batch


def count_label_tokens(dataset, collate_fn: Callable, chunk: int = 16) -> int:
    """Label positions the likelihood scores over the whole data set (padding excluded)."""
    total = 0
    for start in range(0, len(dataset), chunk):
        batch = collate_fn([dataset[i] for i in range(start, min(start + chunk, len(dataset)))])
        total += int((batch["labels"] != -100).sum())
    return total


def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn SIGTERM/SIGINT into a flag so the loop can checkpoint before exiting; a second
    signal stops at once (checkpoint files are written atomically, so none is left half-written)."""
    flag: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):  # noqa: ARG001
        if flag["signal"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        flag["signal"] = signum

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Optimization:
    """What a training loop needs besides the data: the objective on one batch, the trainable
    state (for checkpoints) and the optimiser with its schedule."""

    # The scaled loss on one batch, with its nll and kl parts.
    objective: Callable[[dict[str, Any]], ElboTerms]
    # Named objects whose state_dict goes into every checkpoint (e.g. {"guide": guide}).
    stateful: Mapping[str, Any]
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    scheduler: torch.optim.lr_scheduler.LRScheduler = None  # type: ignore[assignment]
    # Extra fields evaluated every config.eval_every steps and merged into that step's record.
    evaluate: Callable[[], Mapping[str, float]] | None = None
    # Called on every process after each optimiser step with the step number (1-based); its fields
    # go into the step's record (e.g. a forgetting budget's retention loss and beta).
    after_step: Callable[[int], Mapping[str, Any]] | None = None
    # Words that explain a non-finite loss, appended to the error.
    failure_hint: str = "Likely causes: a learning rate too high, or NaN in the input features."
    desc: str = "training"

    def __post_init__(self) -> None:
        if self.scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(self.config))

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state(self, step: int, history: list, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            **{name: obj.state_dict() for name, obj in self.stateful.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "history": history,
            **extra,
        }

    def restore(self, state: Mapping[str, Any]) -> int:
        """Load a checkpoint's state; returns its step."""
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        return int(state["step"])


def run_steps(
    optimization: Optimization,
    dataset,
    collate_fn: Callable[[list], dict],
    device: torch.device,
    history: list[dict[str, Any]],
    start: int = 0,
    run: RunFolder | None = None,
    extra_state: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> list[dict[str, Any]]:
    """The optimisation loop every method shares: the project's batch order, LR schedule, gradient
    clipping, bf16 autocast, JSONL log, checkpoints and checkpoint-on-signal.

    Under torchrun (a process group is initialised) each rank scores its shard of every global
    batch and the gradients are averaged before clipping (:mod:`pyro_blora.training.distributed`); rank 0
    alone evaluates, calls ``callbacks``, logs and writes checkpoints."""
    config = optimization.config
    context = distributed.current()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    params = optimization.parameters()
    context.broadcast_parameters(params)
    writer = run if context.is_main else None
    if writer is not None:
        writer.rewrite_log(history)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not (config.progress and context.is_main), desc=optimization.desc)
    with _stop_on_signals() as stop:
        for step in bar:
            indices = context.shard(batch_order(len(dataset), config.batch_size, config.seed, step))
            batch = make_batch(dataset, collate_fn, indices, device)
            optimization.optimizer.zero_grad(set_to_none=True)
            terms, problem = _loss_and_gradients(optimization, batch, autocast)
            local = terms.detached() if terms is not None else dict.fromkeys(("loss", "nll", "kl"), math.nan)
            reduced = context.combine(params, terms.weight if terms is not None else 1.0, list(local.values()))
            if problem is not None:
                raise _non_finite(step, problem, optimization, batch)
            values = dict(zip(local, reduced))
            if not math.isfinite(values["loss"]):  # another rank's loss was not finite
                raise _non_finite(step, _described(values), optimization, batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            if not torch.isfinite(grad_norm):  # a step would write NaN into the trained parameters
                raise _non_finite(step, f"{_described(values)}, gradient norm={float(grad_norm)}", optimization, batch)
            optimization.optimizer.step()
            optimization.scheduler.step()
            record = {"step": step + 1, **values, "grad_norm": float(grad_norm),
                      "lr": optimization.scheduler.get_last_lr()[0]}
            if optimization.after_step is not None:
                record.update(optimization.after_step(step + 1))
            if optimization.evaluate is not None and config.eval_every and (step + 1) % config.eval_every == 0:
                if context.is_main:
                    record.update(optimization.evaluate())
                context.barrier()
            history.append(record)
            if context.is_main:
                for callback in callbacks:
                    callback(record)
            if writer is not None:
                writer.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3g}", nll=f"{record['nll']:.3g}", kl=f"{record['kl']:.3g}")
            done = step + 1 == config.steps
            stopping = context.any(bool(stop["signal"]))  # every rank stops after the same step
            if writer is not None and (
                (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or done or stopping
            ):
                writer.checkpoints.save(step + 1, optimization.state(step + 1, history, extra_state or {}))
            if stopping and not done:
                raise TrainingInterrupted(stop["signal"] or signal.SIGTERM, step + 1)
    return history


def _described(values: Mapping[str, float]) -> str:
    """Loss terms as the error messages show them: ``loss=..., nll=..., kl=...``."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _loss_and_gradients(optimization: Optimization, batch: Mapping, autocast) -> tuple[ElboTerms | None, str | None]:
    """The objective on this rank's batch and its gradients; or what made it non-finite (then no
    gradients: the caller stops, after taking part in the step's collectives)."""
    try:
        with autocast:
            terms = optimization.objective(batch)
    except ValueError as error:  # Pyro's validation refuses NaN logits or parameters
        if "nan" not in str(error).lower() and "constraint" not in str(error):
            raise
        return None, f"a distribution got invalid values ({str(error).splitlines()[0]})"
    if not bool(torch.isfinite(terms.loss)):
        return terms, _described(terms.detached())
    terms.loss.backward()
    return terms, None


def _non_finite(step: int, detail: str, optimization: Optimization, batch: Mapping) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"the training loss is not finite at step {step}: {detail}. {optimization.failure_hint} "
        f"Or NaN in the input features (batch rows {batch['index'].tolist()}). The last good checkpoint "
        "is kept; resume from it with a smaller learning rate."
    )


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW when ``config.weight_decay`` is set: every method's optimiser."""
    if config.weight_decay:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr)


def finish_budget(tracker: BudgetTracker, in_domain: Callable[[Any], float],
                  evaluate: Callable[[], Mapping[str, float]] | None = None) -> dict[str, Any]:
    """A budgeted run's end: keep the weights the budget allows (:meth:`BudgetTracker.finish`) and
    score them on the dev curves' sets when the run has them (``dev``: e.g. the in-domain dev error)."""
    summary = tracker.finish(in_domain)
    if evaluate is not None:
        context = distributed.current()
        summary["dev"] = dict(context.on_main(evaluate))
    return summary
