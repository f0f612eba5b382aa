"""Training: the shared loop (``loop``), SVI on it (``svi``), the four methods into run folders
(``methods``), the forgetting budget (``budget``) and data parallelism (``distributed``)."""

from pyro_blora.training.loop import NonFiniteLossError, TrainingInterrupted, TrainResult
from pyro_blora.training.svi import PosteriorCollapseWarning, train

__all__ = ["NonFiniteLossError", "PosteriorCollapseWarning", "TrainResult", "TrainingInterrupted", "train"]
