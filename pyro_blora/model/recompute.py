"""Gradient checkpointing for a Whisper model with Bayesian adapters.

Checkpointing drops each layer's activations after the forward pass and recomputes them in the
backward pass. An adapter in ``"sample"`` mode reads its draw from Pyro's cache, which is gone by
the time the backward pass runs; a recomputed layer would draw new adapters and get gradients of
a different model. So every checkpointed call records the adapter values it used and the
recomputation holds exactly those values: the gradients are those of the run without
checkpointing. transformers only checkpoints layers in training mode, while the training loop
runs with dropout off; the layers are therefore put in training mode (which needs a model whose
dropout rates are 0, as Whisper's released checkpoints have).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from transformers import WhisperForConditionalGeneration

from pyro_blora.model.adapters import BayesianLoRALinear

__all__ = ["gradient_checkpointing"]


@contextlib.contextmanager
def gradient_checkpointing(
    whisper: WhisperForConditionalGeneration, adapters: Iterable[BayesianLoRALinear] = ()
) -> Iterator[WhisperForConditionalGeneration]:
    """Checkpoint every encoder and decoder layer of ``whisper`` while the context is open,
    reusing the draws of ``adapters`` (the Bayesian adapters inside it) when layers are recomputed."""
    rates = {name: float(getattr(whisper.config, name, 0.0) or 0.0) for name in ("dropout", "activation_dropout")}
    if any(rates.values()):
        raise ValueError(
            f"gradient checkpointing runs the layers in training mode, and this model has dropout ({rates}); "
            "training is meant to run without dropout: set those config values to 0, or turn checkpointing off"
        )
    adapters = list(adapters)

    def context_fn():
        values = [(adapter, adapter.values_in_use()) for adapter in adapters]

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            with contextlib.ExitStack() as stack:
                for adapter, (lora_A, lora_B) in values:
                    stack.enter_context(adapter.hold(lora_A, lora_B))
                yield

        return contextlib.nullcontext(), held()

    enable = getattr(whisper, "activation_checkpointing_enable", None)
    options = {"use_reentrant": False, "context_fn": context_fn}
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:  # transformers < 5
        whisper.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    top = {id(whisper), id(whisper.model)}
    layers = [m for m in whisper.modules() if getattr(m, "gradient_checkpointing", False) is True and id(m) not in top]
    modes = [m.training for m in layers]
    for module in layers:
        module.training = True
    try:
        yield whisper
    finally:
        for module, mode in zip(layers, modes):
            module.training = mode
        disable = getattr(whisper, "activation_checkpointing_disable", None) or whisper.gradient_checkpointing_disable
        disable()
