"""pyro-blora: Bayesian low-rank adaptation of Whisper with Pyro."""

from pyro_blora.adapters import BayesianLoRALinear, lora_delta_weight
from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.features import log_mel_features
from pyro_blora.guide import BLoRAGuide, build_guide
from pyro_blora.inference import MonteCarloTranscript, monte_carlo_transcribe, posterior_mean_model, sample_posterior, token_nll
from pyro_blora.model import BLoRAWhisper, wrap_whisper
from pyro_blora.objective import ElboScaling, analytic_kl, elbo_scaling, elbo_terms
from pyro_blora.posterior import load_posterior, save_posterior
from pyro_blora.training import NonFiniteLossError, PosteriorCollapseWarning, TrainResult, train

__all__ = [
    "BLoRAConfig",
    "BLoRAGuide",
    "BLoRAWhisper",
    "BayesianLoRALinear",
    "ElboScaling",
    "MonteCarloTranscript",
    "NonFiniteLossError",
    "PosteriorCollapseWarning",
    "TrainConfig",
    "TrainResult",
    "analytic_kl",
    "build_guide",
    "elbo_scaling",
    "elbo_terms",
    "load_posterior",
    "log_mel_features",
    "lora_delta_weight",
    "monte_carlo_transcribe",
    "posterior_mean_model",
    "sample_posterior",
    "save_posterior",
    "token_nll",
    "train",
    "wrap_whisper",
]
__version__ = "0.1.0"
