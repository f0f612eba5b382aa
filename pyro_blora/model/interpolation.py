"""Moving along a trained update: W0 + λ (W − W0), the cheapest walk along the stability-plasticity frontier.

λ = 0 is the base model, λ = 1 the model as trained. Every method's update (a merged LoRA adapter,
a posterior mean, fully fine-tuned weights) is scaled by the same formula, written once here.
"""

from __future__ import annotations

import torch

__all__ = ["interpolate_weights", "interpolated"]


def interpolated(start: torch.Tensor, trained: torch.Tensor, scale: float) -> torch.Tensor:
    """``start + scale * (trained - start)``, computed in float32, in ``trained``'s dtype and device."""
    origin = start.to(trained.device, torch.float32)
    return (origin + scale * (trained.float() - origin)).to(trained.dtype)


@torch.no_grad()
def interpolate_weights(base: torch.nn.Module, adapted: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Move every weight of ``adapted`` (in place) to W0 + scale · (W − W0), W0 being ``base``'s.

    A merged adapter, a posterior mean or a fully fine-tuned model is W0 + ΔW, so this scales the
    update ΔW of any method alike. Integer buffers are kept. Returns ``adapted``."""
    state, reference = adapted.state_dict(), base.state_dict()
    if set(state) != set(reference):
        different = sorted(set(state) ^ set(reference))
        raise ValueError(f"the two models hold different weights ({different[:3]}...); give the base model the "
                         "adapted one was trained from")
    scaled = {}
    for name, value in state.items():
        start = reference[name]
        if value.shape != start.shape:
            raise ValueError(f"{name}: {tuple(value.shape)} against the base's {tuple(start.shape)}; give the base "
                             "model the adapted one was trained from, cut to the same encoder window")
        scaled[name] = interpolated(start, value, scale) if value.is_floating_point() else value
    adapted.load_state_dict(scaled)
    return adapted
