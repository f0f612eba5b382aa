"""The Bayesian LoRA adapter: a frozen linear layer plus a low-rank update with a Gaussian prior.

Convention (the same as peft's LoRA):

    y = W0 x + b + (alpha / r) * B (A x),    A: (r, d_in),  B: (d_out, r),  dW = (alpha / r) * B @ A

The paper writes W0 + (alpha / r) * A B with its A of shape (d_out, r): the paper's A is our B and
the paper's B is our A. A and B are Pyro sample sites with prior Normal(0, sigma_p) on every entry
(one event per matrix), so each adapter contributes the sites ``<module path>.lora_A`` and
``<module path>.lora_B``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_blora.model.noise import active_noise

__all__ = ["AdapterPrior", "BayesianLoRALinear", "StackedBatchError", "lora_delta_weight", "lora_update"]


class StackedBatchError(ValueError):
    """A forward pass under stacked adapter samples got a batch that is not S sample-major slices
    (e.g. generation re-ran the encoder on some rows only)."""

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = scaling * B @ A, the single source of truth for merging, unmerging and export.

    With a leading sample dimension (A: (S, r, d_in), B: (S, d_out, r)) it returns S matrices.
    """
    return scaling * (lora_B @ lora_A)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B (A x) for inputs (..., d_in), without forming dW.

    With stacked matrices (A: (S, r, d_in), B: (S, d_out, r)) the leading dimension of ``x`` must be
    S * b, ordered sample-major (rows s*b .. s*b+b-1 belong to sample s).
    The scaling multiplies the small A rather than the layer's output (one pass less over the
    activations; exact for the default alpha = 2 * rank).
    """
    lora_A = scaling * lora_A
    if lora_A.dim() == 2:
        return (x @ lora_A.transpose(0, 1)) @ lora_B.transpose(0, 1)
    num_samples = lora_A.shape[0]
    if x.shape[0] % num_samples:
        raise StackedBatchError(
            f"input batch of {x.shape[0]} rows cannot be split across {num_samples} stacked adapter samples; "
            "repeat each input once per sample (sample-major) before the forward pass"
        )
    lead = x.shape
    xs = x.reshape(num_samples, -1, lead[-1])
    out = torch.bmm(torch.bmm(xs, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))
    return out.reshape(*lead[:-1], lora_B.shape[1])


class AdapterPrior(dist.Independent):
    """``Normal(loc, scale).expand(shape).to_event(2)``, built once per prior and reused at every step.

    The log-density is torch's ``Normal.log_prob`` summed over the matrix, bit for bit, with the
    variance and log-scale terms kept from construction and a zero mean skipped: five passes over
    the matrix instead of twelve. Two of those were validation: the loc and scale are checked once,
    when the prior is built, and the values scored come from the guide's validated Normal.
    Sampling, the mean and the KL divergence are those of the plain expression."""

    @classmethod
    def build(cls, loc: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> "AdapterPrior":
        with torch.inference_mode(False):  # kept for later steps, which may need gradients
            prior = cls(dist.Normal(loc, scale).expand(shape), 2, validate_args=False)
            normal = prior.base_dist
            # torch's Normal.log_prob computes -((value - loc) ** 2) / (2 * var) - log(scale) - log(sqrt(2 pi));
            # -(a) / b and a / (-b) are the same floating-point number.
            prior._neg_two_var = -(2 * normal.scale**2)
            prior._log_scale = normal.scale.log()
            # (value - 0) ** 2 is value ** 2 whatever the sign of the zero
            prior._loc = None if bool((loc == 0).all()) else normal.loc
        return prior

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        centred = value if self._loc is None else value - self._loc
        log_prob = centred**2 / self._neg_two_var - self._log_scale - _LOG_SQRT_2PI
        return log_prob.reshape(log_prob.shape[:-2] + (-1,)).sum(-1)

    def expand(self, batch_shape, _instance=None):
        return dist.Independent(self.base_dist, 2, validate_args=False).expand(batch_shape, _instance)


class BayesianLoRALinear(PyroModule):
    """A frozen ``nn.Linear`` with a Bayesian low-rank update.

    The adapter has three modes, switched by the context managers of :class:`BLoRAWhisper`:

    * ``"sample"``: A and B are drawn at the Pyro sample sites (from the prior, or from the guide
      under ``poutine.replay``); within one call of the root PyroModule they are drawn once;
    * ``"fixed"``: A and B are given tensors (e.g. the posterior mean);
    * ``"stacked"``: S given samples of A and B, applied to S sample-major slices of the batch.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, prior_scale: float) -> None:
        super().__init__()
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank {rank} exceeds the layer's dimensions ({base.out_features} x {base.in_features}); "
                f"choose rank <= {min(base.in_features, base.out_features)}"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = scaling
        # Prior parameters live in buffers so that they follow .to(device) and can be replaced by
        # a previous posterior (per-element loc and scale); by default they are scalars.
        self.register_buffer("prior_loc_A", torch.tensor(0.0))
        self.register_buffer("prior_scale_A", torch.tensor(float(prior_scale)))
        self.register_buffer("prior_loc_B", torch.tensor(0.0))
        self.register_buffer("prior_scale_B", torch.tensor(float(prior_scale)))
        self._priors: dict[str, tuple] = {}  # "A"/"B": (loc, scale, their versions, prior)
        self.lora_A = PyroSample(lambda self: self.prior("A"))
        self.lora_B = PyroSample(lambda self: self.prior("B"))
        self._mode = "sample"
        self._values: tuple[torch.Tensor, torch.Tensor] | None = None
        # The Pyro path of this adapter (its sites are "<site>.lora_A" / "<site>.lora_B"), set by
        # the model that owns it; estimators such as flipout look the posterior up by it.
        self.site: str | None = None

    @property
    def shape_A(self) -> tuple[int, int]:
        return (self.rank, self.base.in_features)

    @property
    def shape_B(self) -> tuple[int, int]:
        return (self.base.out_features, self.rank)

    def prior(self, which: str) -> AdapterPrior:
        """The prior of matrix ``which`` ("A" or "B"), expanded to its shape as one event.

        It lives on the weights' device but keeps (at least) float32 whatever the weights' dtype:
        a posterior copied into the prior must compare equal to the guide's float32 parameters.
        The distribution is built once and reused until a prior buffer changes (a new tensor, e.g.
        after ``.to(device)`` or :meth:`set_prior`, or an in-place write, which bumps its version)."""
        loc = self._buffers[f"prior_loc_{which}"]
        scale = self._buffers[f"prior_scale_{which}"]
        versions = (loc._version, scale._version)
        cached = self._priors.get(which)
        if cached is not None and cached[0] is loc and cached[1] is scale and cached[2] == versions:
            return cached[3]
        shape = self.shape_A if which == "A" else self.shape_B
        device = self.base.weight.device
        prior = AdapterPrior.build(
            loc.to(device=device, dtype=torch.promote_types(loc.dtype, torch.float32)),
            scale.to(device=device, dtype=torch.promote_types(scale.dtype, torch.float32)),
            shape,
        )
        self._priors[which] = (loc, scale, versions, prior)
        return prior

    def set_prior(self, loc_A, scale_A, loc_B, scale_B) -> None:
        """Replace the prior, e.g. by a previous posterior (scalars or per-element tensors of the
        matrix's shape; the scales must be positive)."""
        for which, loc, scale in (("A", loc_A, scale_A), ("B", loc_B, scale_B)):
            shape = self.shape_A if which == "A" else self.shape_B
            for kind, value in (("loc", loc), ("scale", scale)):
                value = torch.as_tensor(value).detach().to(device=self.base.weight.device, dtype=torch.float32).clone()
                if value.dim() and tuple(value.shape) != shape:
                    raise ValueError(f"prior {kind} of {which} has shape {tuple(value.shape)}; it needs a scalar or {shape}")
                if not torch.isfinite(value).all() or (kind == "scale" and not (value > 0).all()):
                    raise ValueError(f"prior {kind} of {which} must be finite{' and > 0' if kind == 'scale' else ''}")
                setattr(self, f"prior_{kind}_{which}", value)

    def prior_parameters(self) -> dict[str, torch.Tensor]:
        """The prior's loc and scale of A and B (scalars or per-element), keyed as in :meth:`set_prior`."""
        return {f"{kind}_{which}": getattr(self, f"prior_{kind}_{which}")
                for which in ("A", "B") for kind in ("loc", "scale")}

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Read A and B at the sample sites (cached within the current root call)."""
        return self.lora_A, self.lora_B

    def values_in_use(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as the next forward pass would use them (the current draw in ``"sample"`` mode)."""
        return self.draw() if self._mode == "sample" else self._values

    @contextlib.contextmanager
    def hold(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> Iterator[None]:
        """Use the given A and B (2-D: fixed; 3-D: stacked samples) instead of sampling."""
        previous = (self._mode, self._values)
        if lora_A.shape[-2:] != self.shape_A or lora_B.shape[-2:] != self.shape_B:
            raise ValueError(
                f"adapter values of shapes {tuple(lora_A.shape)} / {tuple(lora_B.shape)} do not fit "
                f"A {self.shape_A} / B {self.shape_B}"
            )
        self._mode = "fixed" if lora_A.dim() == 2 else "stacked"
        self._values = (lora_A, lora_B)
        try:
            yield
        finally:
            self._mode, self._values = previous

    @property
    def mode(self) -> str:
        return self._mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = active_noise()
        if self._mode == "sample" and noise is not None and noise.covers(f"{self.site}.lora_A"):
            self.draw()  # the sites are still drawn (the KL is estimated at them)
            return self.base(x) + noise.lora_update(x, self.site, self.scaling)
        lora_A, lora_B = self.values_in_use()
        lora_A = lora_A.to(x.dtype)
        lora_B = lora_B.to(x.dtype)
        return self.base(x) + lora_update(x, lora_A, lora_B, self.scaling)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}, mode={self._mode}"
