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
from typing import Iterator

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_blora.noise import active_noise

__all__ = ["BayesianLoRALinear", "lora_delta_weight", "lora_update"]


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
        raise ValueError(
            f"input batch of {x.shape[0]} rows cannot be split across {num_samples} stacked adapter samples; "
            "repeat each input once per sample (sample-major) before the forward pass"
        )
    lead = x.shape
    xs = x.reshape(num_samples, -1, lead[-1])
    out = torch.bmm(torch.bmm(xs, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))
    return out.reshape(*lead[:-1], lora_B.shape[1])


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

    def prior(self, which: str) -> dist.Distribution:
        """The prior of matrix ``which`` ("A" or "B"), expanded to its shape as one event.

        It lives on the weights' device but keeps (at least) float32 whatever the weights' dtype:
        a posterior copied into the prior must compare equal to the guide's float32 parameters."""
        loc = getattr(self, f"prior_loc_{which}")
        scale = getattr(self, f"prior_scale_{which}")
        shape = self.shape_A if which == "A" else self.shape_B
        device = self.base.weight.device
        loc = loc.to(device=device, dtype=torch.promote_types(loc.dtype, torch.float32))
        scale = scale.to(device=device, dtype=torch.promote_types(scale.dtype, torch.float32))
        return dist.Normal(loc, scale).expand(shape).to_event(2)

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
