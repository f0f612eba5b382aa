"""pyro-blora: Bayesian low-rank adaptation of Whisper with Pyro."""

from pyro_blora.features import log_mel_features

__all__ = ["log_mel_features"]
__version__ = "0.1.0"
