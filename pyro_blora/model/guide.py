"""The mean-field Gaussian posterior over every adapter entry: an AutoNormal with LoRA's start."""

from __future__ import annotations

import math
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import ExpTransform
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_blora.model.whisper import BLoRAWhisper, use_module_local_params

__all__ = ["GUIDE_KINDS", "BLoRAGuide", "BLoRAMAPGuide", "build_guide", "guide_kind"]


class _PositiveByExp(constraints.Constraint):
    """The positive reals, reached from the real line by exp alone: the "exp" scale parameterisation.

    torch maps ``constraints.positive`` to exp followed by an affine map of shift 0 and scale 1,
    which changes no value but costs two passes over every scale tensor at every step, and two
    more in the backward pass."""

    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return constraints.positive.check(value)


positive_by_exp = _PositiveByExp()
transform_to.register(_PositiveByExp, lambda constraint: ExpTransform())
biject_to.register(_PositiveByExp, lambda constraint: ExpTransform())


class BLoRAGuide(AutoNormal):
    """AutoNormal over the adapter sites of a :class:`BLoRAWhisper`.

    * Locations start as LoRA does: A Kaiming-uniform, B zero, so training starts at the base model.
    * Scales start at ``init_scale_A`` / ``init_scale_B`` (or softplus(rho), rho ~ U(init_rho_range),
      per entry where those are None) and are kept positive by softplus or exp.
    * Every site is weighted by the model's KL weight of that site (beta / Z, per matrix under the
      "matrix" normalisation), the same weight the model puts on its prior site, so the KL part of
      the ELBO is weighted by exactly that factor.
    * It is built over ``model.adapter_prior``, which needs no data: the guide is ready (and can
      load saved parameters) before any batch is seen.
    """

    def __init__(self, model: BLoRAWhisper) -> None:
        use_module_local_params()
        self._model_ref = (model,)  # a tuple keeps nn.Module from registering the model as a child
        config = model.config
        if config.scale_parameterization == "exp":
            self.scale_constraint = positive_by_exp
        super().__init__(model.adapter_prior, init_loc_fn=self._init_loc)

    @property
    def blora(self) -> BLoRAWhisper:
        return self._model_ref[0]

    @staticmethod
    def _init_loc(site: dict) -> torch.Tensor:
        shape = site["fn"].event_shape
        template = site["fn"].mean
        if site["name"].endswith("lora_A"):
            # nn.Linear's (and peft's) default: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
            bound = 1.0 / math.sqrt(shape[-1])
            return torch.empty(shape, dtype=template.dtype, device=template.device).uniform_(-bound, bound)
        return torch.zeros(shape, dtype=template.dtype, device=template.device)

    def initial_stddevs(self) -> dict[str, torch.Tensor]:
        """The configured starting scales: ``init_scale_A`` / ``init_scale_B``, or softplus(rho) with
        rho ~ U(init_rho_range) per entry where the scale is None (drawn from the torch RNG)."""
        config = self.blora.config
        low, high = config.init_rho_range
        scales = {}
        for name in self.blora.site_names():
            shape = self.blora.site_prior(name).event_shape
            fixed = config.init_scale_A if name.endswith("lora_A") else config.init_scale_B
            if fixed is None:
                scales[name] = torch.nn.functional.softplus(torch.empty(shape).uniform_(low, high))
            else:
                scales[name] = torch.full(shape, float(fixed))
        return scales

    def setup(self) -> "BLoRAGuide":
        """Create the parameters now (they are otherwise made lazily at the first call) and put the
        scales at their configured start. The prototype is made by one call of the guide, which
        needs no data since it is built over ``model.adapter_prior``."""
        if self.prototype_trace is None:
            with torch.no_grad():
                self()
            self.set_stddevs(self.initial_stddevs())
        return self

    def _loc_and_scale(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The Normal's loc and scale of one site, read from AutoNormal's public ``locs`` and
        ``scales`` modules (where its sites' parameters sit under the site names)."""
        return attrgetter(site)(self.locs), attrgetter(site)(self.scales)

    def forward(self, *args, **kwargs):
        with self.blora.weigh_kl():
            return super().forward(*args, **kwargs)

    def posterior(self, site: str) -> dist.Distribution:
        """The Gaussian q of one adapter site: independent entries, the matrix as one event."""
        self.setup()
        loc, scale = self._loc_and_scale(site)
        return dist.Normal(loc, scale).to_event(loc.dim())

    def means(self) -> dict[str, torch.Tensor]:
        """Posterior means of every site (detached)."""
        self.setup()
        return {name: self._loc_and_scale(name)[0].detach().clone() for name in self.blora.site_names()}

    def stddevs(self) -> dict[str, torch.Tensor]:
        """Posterior standard deviations of every site (detached)."""
        self.setup()
        return {name: self._loc_and_scale(name)[1].detach().clone() for name in self.blora.site_names()}

    @torch.no_grad()
    def set_means(self, values: dict[str, torch.Tensor]) -> None:
        """Overwrite the posterior means of the given sites (e.g. from a trained LoRA)."""
        self.setup()
        for name, value in values.items():
            target = attrgetter(f"{name}_unconstrained")(self.locs)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name} needs shape {tuple(target.shape)}, got {tuple(value.shape)}: "
                    "the values come from another base model or rank"
                )
            target.copy_(value.to(target))

    @torch.no_grad()
    def set_stddevs(self, value: float | dict[str, torch.Tensor]) -> None:
        """Overwrite the posterior standard deviations (one number for all, or per site)."""
        self.setup()
        for name in self.blora.site_names():
            current = self._loc_and_scale(name)[1]
            target = value[name] if isinstance(value, dict) else torch.full_like(current, float(value))
            unconstrained = attrgetter(f"{name}_unconstrained")(self.scales)
            unconstrained.copy_(transform_to(self.scale_constraint).inv(target.to(current)))


def build_guide(model: BLoRAWhisper, kind: str = "normal", seed: int | None = None) -> BLoRAGuide:
    """An initialised guide for ``model``: ``"normal"`` (mean-field posterior) or ``"delta"`` (MAP).
    ``seed`` fixes the Kaiming-uniform start of A (without it the start follows the torch RNG state)."""
    if kind not in GUIDE_KINDS:
        raise ValueError(f"guide kind must be one of {sorted(GUIDE_KINDS)}, got {kind!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    return GUIDE_KINDS[kind](model).setup()



class BLoRAMAPGuide(AutoDelta):
    """Point estimates of every adapter site (MAP): with Delta guides the ELBO's KL term is the
    negative log prior, i.e. an L2 penalty ``beta * |theta|^2 / (2 sigma_p^2)`` scaled like BLoRA's KL.

    Starts where :class:`BLoRAGuide` starts (A Kaiming-uniform, B zero) and offers the same
    ``setup()`` / ``means()``, so training, merging and saving take one code path."""

    def __init__(self, model: BLoRAWhisper) -> None:
        use_module_local_params()
        self._model_ref = (model,)
        super().__init__(model.adapter_prior, init_loc_fn=BLoRAGuide._init_loc)

    blora = BLoRAGuide.blora

    def setup(self) -> "BLoRAMAPGuide":
        """Create the point values now, by one call of the guide (it needs no data)."""
        if self.prototype_trace is None:
            with torch.no_grad():
                self()
        return self

    def means(self) -> dict[str, torch.Tensor]:
        """The point estimates of every site (detached)."""
        self.setup()
        return {name: attrgetter(name)(self).detach().clone() for name in self.blora.site_names()}

    @torch.no_grad()
    def set_means(self, values: dict[str, torch.Tensor]) -> None:
        """Overwrite the point estimates of the given sites (e.g. from a previous posterior's means)."""
        self.setup()
        for name, value in values.items():
            target = attrgetter(f"{name}_unconstrained")(self)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name} needs shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value.to(target))


GUIDE_KINDS = {"normal": BLoRAGuide, "delta": BLoRAMAPGuide}


def guide_kind(guide: AutoNormal | AutoDelta) -> str:
    """The name under which a guide's class is saved (``normal`` or ``delta``)."""
    for kind, cls in GUIDE_KINDS.items():
        if type(guide) is cls:
            return kind
    raise TypeError(f"unknown guide type {type(guide).__name__}; expected one of {[c.__name__ for c in GUIDE_KINDS.values()]}")
