"""Options for the Bayesian adapters, the objective and the training loop.

Each option is a field with a comment; combinations are checked when the object is built,
and every error says which field to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = [
    "ALL_LINEAR_TARGETS",
    "ATTENTION_TARGETS",
    "DEFAULT_TARGETS",
    "KL_NORMALIZATIONS",
    "TARGET_PRESETS",
    "WEIGHT_NOISES",
    "BLoRAConfig",
    "BUDGET_KINDS",
    "CONVERGED_SCALE_LR_MULTIPLIER",
    "ElboScaling",
    "RetentionBudget",
    "TrainConfig",
    "target_patterns",
]

# q and k projections of every attention block: encoder self-attention, decoder
# self-attention and decoder cross-attention (the paper's choice).
DEFAULT_TARGETS: tuple[str, ...] = (r".*\.q_proj$", r".*\.k_proj$")
# Every projection (q, k, v, out) of every attention block.
ATTENTION_TARGETS: tuple[str, ...] = (r".*layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj$",)
# Every linear layer of the attention and feed-forward blocks of encoder and decoder. LoRA on these
# forgets visibly on the testbed (q/k-only LoRA at this scale barely does).
ALL_LINEAR_TARGETS: tuple[str, ...] = (*ATTENTION_TARGETS, r".*layers\.\d+\.fc[12]$")
# Names the command line and the experiments accept for `target_modules` (see `target_patterns`).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "qk": DEFAULT_TARGETS,
    "attention": ATTENTION_TARGETS,
    "all-linear": ALL_LINEAR_TARGETS,
}

# The scale learning rate (a multiple of lr) at which the paper preset's posterior scales converge.
CONVERGED_SCALE_LR_MULTIPLIER = 30.0
KLNormalization = Literal["dataset", "token", "parameter", "matrix"]
KL_NORMALIZATIONS: tuple[str, ...] = get_args(KLNormalization)
# Numeric precisions of training steps (TrainConfig) and retention measurements (RetentionBudget).
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
WEIGHT_NOISES = ("shared", "flipout", "lrt")
BUDGET_KINDS = ("relative", "absolute")


def target_patterns(targets: str | tuple[str, ...]) -> tuple[str, ...]:
    """``BLoRAConfig.target_modules`` from a preset name of ``TARGET_PRESETS`` or one regular expression
    (a tuple of patterns is kept), so that every entry point reads a name the same way."""
    if not isinstance(targets, str):
        return tuple(targets)
    return TARGET_PRESETS.get(targets, (targets,))


@dataclass(frozen=True)
class BLoRAConfig:
    """What the Bayesian adapters are, what they believe a priori, and how the ELBO is weighted."""

    # Rank r of every adapter (the paper: 32).
    rank: int = 32
    # LoRA scaling numerator: dW = (alpha / rank) * B @ A. None means alpha = 2 * rank.
    alpha: float | None = None
    # Regular expressions matched (re.fullmatch) against module paths such as
    # "model.encoder.layers.0.self_attn.q_proj". Each pattern must match at least one nn.Linear.
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    # Standard deviation sigma_p of the zero-mean Gaussian prior on every entry of A and B.
    prior_scale: float = 0.01
    # Weight beta on the KL term of the ELBO (the paper: 0.5). Must be > 0.
    beta: float = 0.5
    # How the likelihood and the KL are normalised (see pyro_blora.model.objective):
    #   "dataset"   textbook ELBO: sum of token NLL over the data set + beta * KL;
    #   "token"     the same divided by the number of training tokens (identical optimum);
    #   "parameter" mean token NLL + beta * KL / (number of adapter parameters);
    #   "matrix"    mean token NLL + beta * sum over adapter matrices of KL(matrix) / entries(matrix)
    #               (the paper's authors' code: at the same beta, M times stronger per entry than
    #               "parameter", with M the number of adapter matrices).
    kl_normalization: KLNormalization = "parameter"
    # Initial posterior standard deviation of the entries of A and of B. None draws each entry's
    # scale as softplus(rho), rho ~ U(init_rho_range) (the authors' start, near sigma_p). The
    # default starts B nearly deterministic (its mean is zero, so the adapted model starts at the
    # base model); a tiny init_scale_B (e.g. 1e-8) keeps it so.
    init_scale_A: float | None = 1e-3
    init_scale_B: float | None = 1e-4
    # Range of rho for the scales left at None above: sigma = softplus(rho), rho ~ U(low, high).
    # The authors' (-5.5, -4.5) gives sigma in about [4e-3, 1.1e-2].
    init_rho_range: tuple[float, float] = (-5.5, -4.5)
    # How the guide keeps its scales positive: "softplus" (AutoNormal's default) or "exp"
    # (a log-sigma parameterisation: every Adam step moves log sigma by about the learning rate).
    scale_parameterization: Literal["softplus", "exp"] = "exp"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}; set BLoRAConfig(rank=32) or similar")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for 2 * rank), got {self.alpha!r}")
        if not self.prior_scale > 0:
            raise ValueError(f"prior_scale (sigma_p) must be > 0, got {self.prior_scale!r}; the paper uses 0.01")
        if not self.beta > 0:
            raise ValueError(
                f"beta must be > 0, got {self.beta!r}: beta = 0 removes the prior (use the 'lora' or 'map' method "
                "for an unregularised adapter), and a negative beta rewards divergence from the prior"
            )
        if self.kl_normalization not in KL_NORMALIZATIONS:
            raise ValueError(f"kl_normalization must be one of {KL_NORMALIZATIONS}, got {self.kl_normalization!r}")
        for name in ("init_scale_A", "init_scale_B"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None for softplus(rho), rho ~ U(init_rho_range)), got {value!r}")
        low, high = (float(v) for v in self.init_rho_range)
        if not low <= high:
            raise ValueError(f"init_rho_range must be (low, high) with low <= high, got {self.init_rho_range!r}")
        object.__setattr__(self, "init_rho_range", (low, high))
        if self.scale_parameterization not in ("softplus", "exp"):
            raise ValueError(f"scale_parameterization must be 'softplus' or 'exp', got {self.scale_parameterization!r}")
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if not self.target_modules:
            raise ValueError("target_modules is empty; give at least one module-path pattern, e.g. r'.*\\.q_proj$'")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor in front of B @ A."""
        alpha = 2.0 * self.rank if self.alpha is None else float(self.alpha)
        return alpha / self.rank

    def replace(self, **changes: Any) -> "BLoRAConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def paper(cls, **changes: Any) -> "BLoRAConfig":
        """The paper's BLoRA as its authors' code runs it (README: "The paper preset"): rank 32,
        alpha 64, q/k targets, sigma_p 0.01, beta 0.5 on the KL normalised per adapter matrix, and
        both A and B starting at softplus(rho), rho ~ U(-5.5, -4.5), kept positive by softplus."""
        settings: dict[str, Any] = dict(
            rank=32, alpha=64.0, target_modules=DEFAULT_TARGETS, prior_scale=0.01, beta=0.5,
            kl_normalization="matrix", init_scale_A=None, init_scale_B=None, init_rho_range=(-5.5, -4.5),
            scale_parameterization="softplus",
        )
        return cls(**{**settings, **changes})

    @classmethod
    def converged(cls, **changes: Any) -> "BLoRAConfig":
        """The paper preset on every linear layer of encoder and decoder, where LoRA forgets and the
        prior measurably protects (RESULTS "Faithful BLoRA"); trained with :meth:`TrainConfig.converged`
        its posterior scales reach their curvature optimum (RESULTS "A posterior that learns")."""
        return cls.paper(**{"target_modules": ALL_LINEAR_TARGETS, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BLoRAConfig":
        data = dict(data)
        data["target_modules"] = tuple(data.get("target_modules", DEFAULT_TARGETS))
        if "init_rho_range" in data:
            data["init_rho_range"] = tuple(data["init_rho_range"])
        return cls(**data)


@dataclass(frozen=True)
class ElboScaling:
    """The two factors of the objective: on the token log-likelihood and on the adapter sites.

    Lives with the options rather than with the ELBO so that the model, which carries one, and the
    objective, which builds one from a :class:`BLoRAConfig`, need not import each other."""

    # Size N of the plate over utterances: the batch likelihood is scaled by N / B.
    num_utterances: int
    # Further factor on the likelihood (1 / T for the "token" and "parameter" normalisations).
    likelihood: float
    # Weight on the adapter sites in the model and in the guide, i.e. on the KL: beta / Z.
    kl: float
    normalization: str = "dataset"
    # Divide each adapter matrix's KL further by its number of entries ("matrix" normalisation).
    per_matrix: bool = False
    # The beta that ``kl`` was computed from (None: not known, so beta cannot be changed).
    beta: float | None = None

    def __post_init__(self) -> None:
        if self.num_utterances <= 0:
            raise ValueError(f"num_utterances must be > 0, got {self.num_utterances}")
        if not (self.likelihood > 0 and self.kl > 0):
            raise ValueError(f"likelihood and kl scales must be > 0, got {self.likelihood}, {self.kl}")

    def with_beta(self, beta: float) -> "ElboScaling":
        """The same objective with the KL weighted by ``beta`` instead (kl rescaled by beta / self.beta)."""
        if self.beta is None:
            raise ValueError("this ElboScaling does not record its beta; build it with elbo_scaling(...) or give beta=")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        return dataclasses.replace(self, kl=self.kl * beta / self.beta, beta=float(beta))

    def site_weight(self, num_entries: int) -> float:
        """The KL weight of one adapter matrix with ``num_entries`` entries."""
        return self.kl / num_entries if self.per_matrix else self.kl


@dataclass(frozen=True)
class TrainConfig:
    """How stochastic variational inference is run."""

    # Number of optimiser steps.
    steps: int = 200
    # Utterances per mini-batch.
    batch_size: int = 4
    # Adam learning rate of the posterior means.
    lr: float = 1e-3
    # Learning rate of the posterior scales, as a multiple of lr. Scales start tiny and must
    # move by orders of magnitude, so they get a larger step than the means.
    scale_lr_multiplier: float = 10.0
    # Where the posterior scales start: "config" (BLoRAConfig's init_scale_A/B or rho range) or
    # "curvature": sigma* from a curvature pass at the initial means (pyro_blora.model.curvature),
    # so SVI refines scales that start at their quadratic optimum instead of having to travel there.
    scale_init: Literal["config", "curvature"] = "config"
    # Mini-batches of the curvature pass (a forward and backward pass each) that sets scale_init="curvature"
    # and, after training, judges whether a mean-field posterior converged (result.json "posterior"); 0 skips it.
    curvature_batches: int = 8
    # Linear warm-up steps, then cosine decay to final_lr_fraction * lr.
    warmup_steps: int = 10
    final_lr_fraction: float = 0.1
    # Gradient-norm clipping over all guide parameters (None: off).
    max_grad_norm: float | None = 1.0
    # Monte Carlo particles per ELBO estimate.
    num_particles: int = 1
    # "trace": Trace_ELBO (Monte Carlo KL); "analytic": closed-form Gaussian KL (mean-field).
    estimator: Literal["trace", "analytic"] = "trace"
    # How the likelihood sees the posterior's noise (pyro_blora.model.noise): "shared" draws one A and B
    # per batch (plain reparameterisation); "flipout" gives every utterance its own sign-flipped
    # perturbation of that draw; "lrt" samples every layer output from its Gaussian (local
    # reparameterisation). The KL is estimated the same way under all three.
    weight_noise: Literal["shared", "flipout", "lrt"] = "shared"
    # Decoupled weight decay (AdamW) on every trained parameter; 0 is plain Adam.
    weight_decay: float = 0.0
    # "bf16" runs the forward pass under bfloat16 autocast (about 2x faster on CPUs with AMX and on
    # GPUs); the guide's parameters and the ELBO stay in float32.
    precision: Precision = "fp32"
    # Evaluate every this many steps (0: never) and checkpoint every this many steps (0: only at the end).
    eval_every: int = 0
    checkpoint_every: int = 50
    # How many checkpoints to keep in the run folder.
    keep_checkpoints: int = 2
    # Recompute each layer's activations in the backward pass instead of keeping them: less memory,
    # about a third more compute. Gives the same gradients (each adapter draw is reused).
    gradient_checkpointing: bool = False
    # Seconds of audio the encoder reads. 30 is Whisper's own window; a shorter one (e.g. 10: 1000
    # mel frames, the first 500 encoder positions) is a speed option that CHANGES THE MODEL (see
    # pyro_blora.model.encoder_window), refuses longer clips and is used again when the run is evaluated.
    encoder_window_seconds: float = 30.0
    # Seed for the data order and the Monte Carlo draws of training (the initial adapters are
    # drawn by build_guide(model, seed=...)).
    seed: int = 0
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.scale_lr_multiplier > 0, f"scale_lr_multiplier must be > 0, got {self.scale_lr_multiplier}"),
            (self.scale_init in ("config", "curvature"),
             f"scale_init must be 'config' or 'curvature', got {self.scale_init!r}"),
            (self.curvature_batches >= 0, f"curvature_batches must be >= 0, got {self.curvature_batches}"),
            (self.scale_init == "config" or self.curvature_batches > 0,
             "scale_init='curvature' needs curvature_batches > 0 (the batches its curvature pass reads)"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.final_lr_fraction <= 1, f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (self.num_particles >= 1, f"num_particles must be >= 1, got {self.num_particles}"),
            (self.estimator in ("trace", "analytic"), f"estimator must be 'trace' or 'analytic', got {self.estimator!r}"),
            (self.weight_noise in WEIGHT_NOISES, f"weight_noise must be one of {WEIGHT_NOISES}, got {self.weight_noise!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (0 < self.encoder_window_seconds <= 30,
             f"encoder_window_seconds must lie in (0, 30], got {self.encoder_window_seconds}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def paper(cls, **changes: Any) -> "TrainConfig":
        """The optimiser of the authors' code where it fits a short run: AdamW at lr 1e-3 with weight
        decay 5e-4 on means and scales alike (no larger scale learning rate), flipout noise. Steps,
        batch size and schedule stay ours (README: "The paper preset")."""
        settings: dict[str, Any] = dict(lr=1e-3, weight_decay=5e-4, scale_lr_multiplier=1.0, weight_noise="flipout")
        return cls(**{**settings, **changes})

    @classmethod
    def converged(cls, **changes: Any) -> "TrainConfig":
        """The paper preset with one deviation from the authors: the posterior scales learn at 30x the
        means' rate (3e-2 on rho). At one rate Adam moves each rho by about 1e-3 per step, so in a few
        hundred steps sigma stays where it started; at 30x it reaches sigma* (RESULTS "A posterior that learns")."""
        return cls.paper(**{"scale_lr_multiplier": CONVERGED_SCALE_LR_MULTIPLIER, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RetentionBudget:
    """A forgetting budget: adapt as much as possible while the loss on a retention set (the domain
    the model already knew) stays inside a limit (README: "A forgetting budget"; pyro_blora.training.budget).

    The retention loss is the teacher-forced cross-entropy per transcript token of the first
    ``utterances`` utterances of the retention set; the budget holds its one-sided upper confidence
    bound at ``confidence``, paired per utterance with the base model's loss. During training it is
    measured every ``every`` steps; for blora and map the KL weight beta follows the bound by dual
    ascent in log space (GECO, Rezende & Viola 2018): beta grows while the smoothed bound is above
    the limit and decays while there is slack. The run keeps the last weights whose bound was inside."""

    # How much worse the retention loss may get. kind="relative": a fraction of the base model's
    # retention loss (0.03: at most 3% worse). kind="absolute": the highest retention loss allowed,
    # in nats per transcript token.
    budget: float
    kind: Literal["relative", "absolute"] = "relative"
    # Measure the retention loss every this many training steps (and always after the last step).
    every: int = 10
    # Utterances of the fixed retention batch: the first ones of the retention set. The budget holds
    # an upper confidence bound, whose width shrinks as 1/sqrt(utterances); `scripts/budget_variance.py`
    # measures it per size.
    utterances: int = 64
    # Confidence of the one-sided upper bound on the retention CE's change that the budget holds
    # (pyro_blora.training.budget_bound): 0.95 reads "with 95% confidence, at most X% worse".
    confidence: float = 0.95
    # While the last upper bound has used less than far_fraction of the allowed CE increase, measure
    # only every far_every-th time (every far_every * every steps): the overhead is low while far
    # from the limit, and every measurement near it is kept.
    far_fraction: float = 0.5
    far_every: int = 4
    # Dual-ascent step eta: at every measurement log(beta) += eta * (average - limit) / limit.
    lr: float = 5.0
    # Weight the moving average of the retention loss keeps at each measurement (GECO's alpha). GECO
    # uses 0.99 on a noisy estimate at every step; here the estimate is exact on a fixed batch and
    # comes every `every` steps, and a long memory only delays beta: at 0.9 per measurement beta
    # kept growing long after the loss was back inside the limit, and the run lost its adaptation
    # (tiny-model runs in tests/test_budget.py). 0.5 damps the oscillation with a lag of about one
    # measurement.
    decay: float = 0.5
    # Largest change of log(beta) at one measurement (beta moves by at most a factor e^max_log_step).
    max_log_step: float = 0.5
    # Bounds of beta (log(beta) is clamped to [log beta_min, log beta_max]).
    beta_min: float = 1e-3
    beta_max: float = 1e4
    # When the final weights break the budget: also try the final update scaled, W0 + lambda dW with
    # the largest lambda in [0, 1] inside the budget, and keep it if it fits the training data
    # better than the last checkpoint inside the budget.
    scale_at_end: bool = True
    # The search for lambda: scale_grid + 1 evenly spaced values from 1 down to 0, then scale_refine
    # bisection steps between the largest value inside the budget and the next one up.
    scale_grid: int = 10
    scale_refine: int = 4
    # Precision of a measurement: "fp32", or "bf16" autocast, about half the cost on CPUs with bf16
    # matrix units (BENCHMARKS "Forgetting budget"). The base model's losses it is paired with are
    # measured the same way. bf16 moved the bound by 0.2-1.1 points of the change (BENCHMARKS), so the
    # budget's coverage (RESULTS "Forgetting budget") is measured in fp32, the default.
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if self.kind == "relative" and not self.budget >= 0:
            raise ValueError(f"a relative budget must be >= 0 (0.03: at most 3% worse than the base model), got "
                             f"{self.budget!r}")
        if self.kind == "absolute" and not self.budget > 0:
            raise ValueError(f"an absolute budget is the highest retention loss allowed (nats per transcript "
                             f"token) and must be > 0, got {self.budget!r}")
        checks = [
            (isinstance(self.every, int) and self.every >= 1, f"every must be an integer >= 1, got {self.every!r}"),
            (isinstance(self.utterances, int) and self.utterances >= 1,
             f"utterances must be an integer >= 1, got {self.utterances!r}"),
            (0.5 <= self.confidence < 1, f"confidence must lie in [0.5, 1) (0.95: a 95% upper bound), got "
             f"{self.confidence!r}"),
            (0 <= self.far_fraction <= 1, f"far_fraction must lie in [0, 1] (0: never measure less often), got "
             f"{self.far_fraction!r}"),
            (isinstance(self.far_every, int) and self.far_every >= 1,
             f"far_every must be an integer >= 1 (1: always every `every` steps), got {self.far_every!r}"),
            (self.lr > 0, f"lr (the dual-ascent step eta) must be > 0, got {self.lr!r}"),
            (0 <= self.decay < 1, f"decay must lie in [0, 1) (0: no smoothing), got {self.decay!r}"),
            (self.max_log_step > 0, f"max_log_step must be > 0, got {self.max_log_step!r}"),
            (0 < self.beta_min <= self.beta_max,
             f"beta bounds need 0 < beta_min <= beta_max, got {self.beta_min!r}, {self.beta_max!r}"),
            (isinstance(self.scale_grid, int) and self.scale_grid >= 1,
             f"scale_grid must be an integer >= 1, got {self.scale_grid!r}"),
            (isinstance(self.scale_refine, int) and self.scale_refine >= 0,
             f"scale_refine must be an integer >= 0, got {self.scale_refine!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def limit(self, base_loss: float) -> float:
        """The highest retention loss allowed, for a base model whose retention loss is ``base_loss``."""
        return base_loss * (1 + self.budget) if self.kind == "relative" else self.budget

    def describe(self) -> str:
        """The budget in words: "3% over the base model" or "at most 0.9 nats per transcript token"."""
        if self.kind == "relative":
            return f"{100 * self.budget:g}% over the base model's retention loss"
        return f"a retention loss of at most {self.budget:g} nats per transcript token"

    def replace(self, **changes: Any) -> "RetentionBudget":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
