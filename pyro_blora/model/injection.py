"""Which linear layers get adapters, decided in one place."""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from pyro_blora.model.adapters import BayesianLoRALinear
from pyro_blora.config import BLoRAConfig

__all__ = ["find_target_modules", "inject_adapters"]


def find_target_modules(module: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Paths of the ``nn.Linear`` layers whose path fully matches one of ``patterns``.

    Every pattern must match at least one layer: a typo would otherwise silently train nothing.
    """
    patterns = list(patterns)
    linear_paths = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name]
    matched: list[str] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [path for path in linear_paths if regex.fullmatch(path)]
        if not hits:
            examples = ", ".join(linear_paths[:6])
            raise ValueError(
                f"target pattern {pattern!r} matches no linear layer. Patterns are regular expressions matched "
                f"against whole module paths, e.g. r'.*\\.q_proj$'; some paths in this model: {examples}"
            )
        matched.extend(path for path in hits if path not in matched)
    return sorted(matched, key=linear_paths.index)


def inject_adapters(module: nn.Module, config: BLoRAConfig) -> dict[str, BayesianLoRALinear]:
    """Freeze every weight of ``module`` and replace the target layers by Bayesian adapters, in place."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    adapters: dict[str, BayesianLoRALinear] = {}
    for path in find_target_modules(module, config.target_modules):
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        adapter = BayesianLoRALinear(getattr(parent, child), config.rank, config.scaling, config.prior_scale)
        setattr(parent, child, adapter)
        adapters[path] = adapter
    return adapters
