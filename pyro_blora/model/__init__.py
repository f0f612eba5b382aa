"""The probabilistic model: LoRA adapters as Pyro sample sites inside Whisper, their guide and the ELBO.

Modules, bottom up: ``adapters`` (the adapted linear layer), ``noise`` (flipout / local
reparameterisation as an effect handler), ``injection`` (which layers get adapters),
``objective`` (the beta-scaled ELBO terms and the one teacher-forced cross-entropy), ``whisper``
(the PyroModule-wrapped Whisper and its site names), ``guide`` (AutoNormal and MAP guides),
``encoder_window`` and ``recompute`` (training-speed options).
"""

from pyro_blora.model.whisper import BLoRAWhisper, wrap_whisper

__all__ = ["BLoRAWhisper", "wrap_whisper"]
