"""BLoRA as a Pyro model: Whisper with Bayesian adapters and a token-level likelihood."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method
from pyro.nn.module import to_pyro_module_
from pyro.poutine.runtime import am_i_wrapped
from transformers import WhisperForConditionalGeneration

from pyro_blora.config import BLoRAConfig, ElboScaling
from pyro_blora.model.adapters import BayesianLoRALinear, lora_delta_weight
from pyro_blora.model.injection import inject_adapters
from pyro_blora.model.objective import IGNORE_INDEX, KLWeights, teacher_forced_logits

__all__ = [
    "BLoRAWhisper",
    "adapted_modules",
    "lora_alpha",
    "module_path",
    "site_name",
    "use_module_local_params",
    "wrap_whisper",
]


def use_module_local_params() -> None:
    """Make Pyro modules keep their parameters to themselves instead of in Pyro's global store.

    With the global store, a guide's values would leak into the next guide built in the same
    process (two posteriors compared, a sequence of tasks) and ``pyro.clear_param_store()`` would
    wipe a trained posterior. The setting is Pyro's and process-wide; it is switched on where a
    model or guide is built rather than when this package is imported, so importing pyro_blora
    leaves other Pyro code alone."""
    pyro.settings.set(module_local_params=True)


def _frozen_weights_hidden():
    """Keep the frozen Whisper weights out of the Pyro handlers around a forward pass.

    PyroModule announces every weight it reads as a ``param`` site; those weights are not trained
    and no inference uses them, yet each announcement passes through every active handler (the
    ELBO's traces, replay, the plate, the scales). A ``block`` of param sites stops them at once;
    sample sites (the adapters) pass through as before. With no handler active, announcements cost
    nothing and no block is entered."""
    return poutine.block(hide_types=["param"]) if am_i_wrapped() else contextlib.nullcontext()


def _convert_paths_to(whisper: WhisperForConditionalGeneration, adapters: Mapping[str, BayesianLoRALinear]) -> None:
    """Make PyroModules of the modules on the way from ``whisper`` to each adapter, and of no other.

    The adapters' sites are named by that chain of PyroModules (``whisper.model.encoder.layers.0
    .self_attn.q_proj.lora_A``) and share its root's cache, so every module on it must be one; the
    rest of the model (norms, feed-forward and value/output layers, embeddings) stays plain torch
    and runs without PyroModule's hooks. Converted deepest first, so each parent registers its
    converted children and the root names the whole chain."""
    parts = [path.split(".") for path in adapters]
    ancestors = {".".join(names[:depth]) for names in parts for depth in range(len(names))}
    for path in sorted(ancestors, key=lambda path: -len(path.split("."))):
        to_pyro_module_(whisper.get_submodule(path), recurse=False)


class BLoRAWhisper(PyroModule):
    """A Whisper model whose target layers carry Bayesian LoRA adapters.

    ``forward(batch)`` is the Pyro model: it draws every adapter (``<path>.lora_A``/``.lora_B``,
    weighted by ``elbo_scaling.kl``) and observes the label tokens under a plate over the
    ``elbo_scaling.num_utterances`` training utterances, subsampled by ``batch["index"]``.
    """

    def __init__(self, whisper: WhisperForConditionalGeneration, config: BLoRAConfig | None = None) -> None:
        use_module_local_params()
        super().__init__()
        self.config = config or BLoRAConfig()
        adapters = inject_adapters(whisper, self.config)
        _convert_paths_to(whisper, adapters)
        self.whisper = whisper
        self._adapter_paths = {f"whisper.{path}": adapter for path, adapter in adapters.items()}
        for path, adapter in self._adapter_paths.items():
            adapter.site = path
        self.configure_objective(ElboScaling(num_utterances=1, likelihood=1.0, kl=self.config.beta,
                                             per_matrix=self.config.kl_normalization == "matrix",
                                             beta=self.config.beta))

    # ----------------------------------------------------------------- sites
    def adapters(self) -> dict[str, BayesianLoRALinear]:
        """Adapters by their Pyro path (``whisper.model.encoder.layers.0.self_attn.q_proj``)."""
        return dict(self._adapter_paths)

    def site_names(self) -> list[str]:
        return [f"{path}.lora_{m}" for path in self._adapter_paths for m in ("A", "B")]

    def _site(self, site: str) -> tuple[BayesianLoRALinear, str]:
        path, _, leaf = site.rpartition(".")
        if path not in self._adapter_paths or leaf not in ("lora_A", "lora_B"):
            raise KeyError(f"{site!r} is not an adapter site of this model; see BLoRAWhisper.site_names()")
        return self._adapter_paths[path], leaf[-1]

    def site_prior(self, site: str) -> dist.Distribution:
        adapter, which = self._site(site)
        return adapter.prior(which)

    def set_site_priors(self, locs: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor] | float) -> None:
        """Prior N(loc, scale) per adapter entry: a previous posterior (``locs`` = its means,
        ``scales`` = its standard deviations) makes this a step of variational continual learning;
        one number for ``scales`` gives an L2 penalty towards ``locs``."""
        missing = [s for s in self.site_names() if s not in locs or (isinstance(scales, Mapping) and s not in scales)]
        if missing:
            raise KeyError(f"prior values missing for {len(missing)} sites, e.g. {missing[0]!r}")
        for path, adapter in self._adapter_paths.items():
            def scale(which: str):
                return scales[f"{path}.lora_{which}"] if isinstance(scales, Mapping) else scales

            adapter.set_prior(locs[f"{path}.lora_A"], scale("A"), locs[f"{path}.lora_B"], scale("B"))

    def site_prior_parameters(self) -> dict[str, torch.Tensor]:
        """Every adapter's prior as ``<site>.loc`` / ``<site>.scale`` tensors (scalars for the
        default N(0, sigma_p)), e.g. to save next to a posterior."""
        return {f"{path}.lora_{key[-1]}.{key[:-2]}": value
                for path, adapter in self._adapter_paths.items()
                for key, value in adapter.prior_parameters().items()}

    def num_adapter_parameters(self) -> int:
        return sum(a.rank * (a.base.in_features + a.base.out_features) for a in self._adapter_paths.values())

    def configure_objective(self, scaling: ElboScaling) -> None:
        """Set the factors of the ELBO; the guide reads the KL weights from here too."""
        self.elbo_scaling = scaling
        self._kl_weights = {
            f"{path}.lora_{which}": scaling.site_weight(math.prod(adapter.shape_A if which == "A" else adapter.shape_B))
            for path, adapter in self._adapter_paths.items() for which in ("A", "B")
        }

    @property
    def beta(self) -> float | None:
        """The KL weight beta of the objective now (``config.beta`` unless :meth:`set_beta` changed it)."""
        return self.elbo_scaling.beta

    def set_beta(self, beta: float) -> None:
        """Weigh the KL by ``beta`` from now on, under the same normalisation (e.g. a beta adapted
        during training by a forgetting budget); model and guide read the new weights at once."""
        self.configure_objective(self.elbo_scaling.with_beta(beta))

    def kl_weights(self) -> dict[str, float]:
        """The KL weight of every adapter site (beta / Z, divided by the matrix's entries under "matrix")."""
        return dict(self._kl_weights)

    def weigh_kl(self) -> KLWeights:
        """The handler that puts these weights on the adapter sites (model and guide alike)."""
        return KLWeights(self._kl_weights)

    # ----------------------------------------------------------------- model
    @pyro_method
    def adapter_prior(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every adapter site (once per root call). Extra arguments are ignored, so the
        guide can be built over this function without data."""
        values = {}
        with self.weigh_kl():
            for path, adapter in self._adapter_paths.items():
                if adapter.mode == "sample":
                    lora_A, lora_B = adapter.draw()
                    values[f"{path}.lora_A"], values[f"{path}.lora_B"] = lora_A, lora_B
        return values

    def utterance_plate(self, batch: Mapping) -> pyro.plate:
        index = batch.get("index")
        if index is None:
            index = torch.arange(batch["labels"].shape[0])
        return pyro.plate("utterances", self.elbo_scaling.num_utterances, subsample=index, dim=-1)

    def logits(self, batch: Mapping) -> torch.Tensor:
        """Decoder logits under teacher forcing, for labels padded with -100."""
        with _frozen_weights_hidden():
            return teacher_forced_logits(self.whisper, batch)

    def forward(self, batch: Mapping) -> torch.Tensor:
        self.adapter_prior()
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        with self.utterance_plate(batch), poutine.scale(scale=self.elbo_scaling.likelihood):
            logits = self.logits(batch)
            pyro.sample(
                "tokens",
                dist.Categorical(logits=logits.float()).mask(mask).to_event(1),
                obs=labels.masked_fill(~mask, 0),
            )
        return logits

    @pyro_method
    def generate(self, input_features: torch.Tensor, **generate_kwargs):
        """``WhisperForConditionalGeneration.generate`` with one adapter draw for the whole call."""
        self.adapter_prior()
        with _frozen_weights_hidden():
            return self.whisper.generate(input_features, **generate_kwargs)

    # ----------------------------------------------------------------- modes
    @contextlib.contextmanager
    def hold_adapters(self, values: Mapping[str, torch.Tensor]) -> Iterator["BLoRAWhisper"]:
        """Use given adapter values instead of sampling: 2-D tensors (e.g. the posterior mean) or
        stacks of S samples (leading dimension S; inputs must then be repeated sample-major)."""
        missing = [s for s in self.site_names() if s not in values]
        if missing:
            raise KeyError(f"adapter values missing for {len(missing)} sites, e.g. {missing[0]!r}")
        with contextlib.ExitStack() as stack:
            for path, adapter in self._adapter_paths.items():
                stack.enter_context(adapter.hold(values[f"{path}.lora_A"], values[f"{path}.lora_B"]))
            yield self

    def delta_weights(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dW of every adapted layer, keyed by its path inside the Whisper model."""
        return {
            path.removeprefix("whisper."): lora_delta_weight(
                values[f"{path}.lora_A"], values[f"{path}.lora_B"], adapter.scaling
            )
            for path, adapter in self._adapter_paths.items()
        }

    def merged_whisper(self, values: Mapping[str, torch.Tensor]) -> WhisperForConditionalGeneration:
        """A plain transformers Whisper with W0 + dW(values) folded in: no Pyro in its forward path."""
        deltas = self.delta_weights(values)
        state = {}
        for key, tensor in self.whisper.state_dict().items():
            module_path, _, leaf = key.rpartition(".")
            if module_path.endswith(".base"):
                module_path = module_path[: -len(".base")]
            elif leaf.startswith("prior_"):
                continue
            state[f"{module_path}.{leaf}"] = tensor.detach().clone()
        for path, delta in deltas.items():
            weight = state[f"{path}.weight"]
            merged = weight + delta.to(weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging the adapter of {path} gives non-finite weights; the posterior is broken")
            state[f"{path}.weight"] = merged
        plain = WhisperForConditionalGeneration(self.whisper.config)
        plain.load_state_dict(state, strict=True)
        plain.generation_config = self.whisper.generation_config
        dtype = next(self.whisper.parameters()).dtype
        return plain.to(dtype=dtype).eval()


def wrap_whisper(whisper: WhisperForConditionalGeneration, config: BLoRAConfig | None = None) -> BLoRAWhisper:
    """Put Bayesian adapters into ``whisper`` (in place) and return the Pyro model around it."""
    return BLoRAWhisper(whisper, config)


_MODEL_PREFIX = "whisper."


def module_path(site: str) -> tuple[str, str]:
    """(path inside the Whisper model, "lora_A" | "lora_B") of a Pyro adapter site."""
    path, _, leaf = site.rpartition(".")
    return path.removeprefix(_MODEL_PREFIX), leaf


def site_name(path: str, leaf: str) -> str:
    """The Pyro site of matrix ``leaf`` of the layer at ``path`` inside the Whisper model."""
    return f"{_MODEL_PREFIX}{path}.{leaf}"


def adapted_modules(model: BLoRAWhisper) -> list[str]:
    """Paths of the adapted layers inside the Whisper model, in model order."""
    return [path.removeprefix(_MODEL_PREFIX) for path in model.adapters()]


def lora_alpha(model: BLoRAWhisper) -> float | int:
    """alpha as peft writes it: an int when it is one."""
    alpha = model.config.scaling * model.config.rank
    return int(alpha) if float(alpha).is_integer() else alpha
