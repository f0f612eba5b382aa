"""How the likelihood sees the posterior's noise during training: one draw per batch, flipout, or
the local reparameterisation trick, as an effect handler over the unchanged Pyro sites.

Under plain SVI every utterance of a batch sees the same draw of A and B, so the gradient noise of
a batch is that of one weight sample. Two estimators from the Bayesian-neural-network literature
decorrelate it without changing what is being estimated:

* ``"flipout"`` (Wen et al. 2018): A = mu + sigma * eps with one eps per batch, and every utterance n
  multiplies the perturbation by its own random sign vectors, (sigma * eps) o (s_n r_n^T). Each
  utterance's weights are still exactly N(mu, sigma^2), so the expected loss and gradient are those
  of plain sampling.
* ``"lrt"`` (Kingma et al. 2015): the output of each matrix, h = W x, is drawn from its Gaussian
  N(mu x, (sigma^2) (x^2)) per position. Exact for a layer applied to one position; through
  attention it treats positions as separately drawn, an approximation the literature accepts.

The adapters stay ``PyroSample`` sites and the guide stays an ``AutoNormal``: the handler reads the
posterior's loc and scale at the guide's sites (``_pyro_post_sample``) and the adapters ask it for
their update while it is active. The sampled values still fill the traces, so the KL part of the
ELBO is estimated exactly as without the handler. Guides without Normal sites (MAP) are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Literal

import torch
from pyro.poutine.messenger import Messenger

__all__ = ["LocalNoise", "active_noise", "local_noise", "flipout_linear", "lrt_linear"]

_ACTIVE: contextvars.ContextVar["LocalNoise | None"] = contextvars.ContextVar("pyro_blora_local_noise", default=None)


def _signs(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype).mul_(2).sub_(1)


def flipout_linear(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x W^T with W ~ N(loc, scale^2) per example (the leading dimension of ``x``), by flipout.

    One Gaussian perturbation is drawn for the call and decorrelated between examples by random
    signs on its input and output sides: example n uses W_n = loc + perturbation o (s_n r_n^T).
    The matrices W_n are formed (examples x the matrix's entries: small next to the activations)
    and applied in one batched product, which is flipout's x_n loc^T + ((x_n o r_n) perturbation^T) o s_n
    in half the matrix products and without keeping x_n o r_n, an activation-sized tensor, for the
    backward pass."""
    perturbation = scale * torch.randn_like(scale)
    examples = x.shape[0]
    sign_in = _signs((examples, 1, x.shape[-1]), perturbation)
    sign_out = _signs((examples, loc.shape[0], 1), perturbation)
    weights = (loc + perturbation * sign_out * sign_in).to(x.dtype)
    flat = x.reshape(examples, -1, x.shape[-1])
    return torch.bmm(flat, weights.transpose(1, 2)).reshape(*x.shape[:-1], loc.shape[0])


def lrt_linear(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x W^T with W ~ N(loc, scale^2), drawn as the output's Gaussian per position (local reparameterisation)."""
    mean = x @ loc.to(x.dtype).transpose(0, 1)
    variance = (x * x) @ (scale * scale).to(x.dtype).transpose(0, 1)
    return mean + variance.clamp_min(0).sqrt() * torch.randn_like(mean)


_LINEARS = {"flipout": flipout_linear, "lrt": lrt_linear}


class LocalNoise(Messenger):
    """Within this handler, adapters with a Normal posterior compute their update by flipout or
    the local reparameterisation trick from the guide's loc and scale (see the module's docstring).

    Use it around one ELBO estimate: the guide runs first and its sites record their (loc, scale);
    the model's adapters then ask :func:`active_noise` for their update."""

    def __init__(self, kind: Literal["flipout", "lrt"]) -> None:
        if kind not in _LINEARS:
            raise ValueError(f"local noise must be one of {sorted(_LINEARS)}, got {kind!r}")
        super().__init__()
        self.kind = kind
        self.linear = _LINEARS[kind]
        self.posteriors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        self._token = _ACTIVE.set(self)
        return super().__enter__()

    def __exit__(self, *args):
        try:
            return super().__exit__(*args)
        finally:
            _ACTIVE.reset(self._token)
            self.posteriors = {}

    def _pyro_post_sample(self, msg) -> None:
        fn = msg["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, torch.distributions.Normal) and msg["name"].endswith("_unconstrained"):
            self.posteriors[msg["name"].removesuffix("_unconstrained")] = (fn.loc, fn.scale)

    def covers(self, site: str) -> bool:
        return site in self.posteriors

    def lora_update(self, x: torch.Tensor, site: str, scaling: float) -> torch.Tensor:
        """scaling * B (A x) with A and B drawn by this handler's estimator."""
        loc_A, scale_A = self.posteriors[f"{site}.lora_A"]
        loc_B, scale_B = self.posteriors[f"{site}.lora_B"]
        hidden = self.linear(x, scaling * loc_A, scaling * scale_A)
        return self.linear(hidden, loc_B, scale_B)


def active_noise() -> LocalNoise | None:
    """The innermost active :class:`LocalNoise`, if any."""
    return _ACTIVE.get()


def local_noise(kind: Literal["shared", "flipout", "lrt"]) -> contextlib.AbstractContextManager:
    """The handler for ``TrainConfig.weight_noise``; "shared" (plain sampling) needs none."""
    return contextlib.nullcontext() if kind == "shared" else LocalNoise(kind)
