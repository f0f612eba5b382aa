"""Training: the generic loop and SVI (``loop``), the four methods into run folders (``methods``),
the forgetting budget (``budget``) and data parallelism (``distributed``)."""

from pyro_blora.training.loop import (
    NonFiniteLossError,
    PosteriorCollapseWarning,
    TrainingInterrupted,
    TrainResult,
    train,
)

__all__ = ["NonFiniteLossError", "PosteriorCollapseWarning", "TrainResult", "TrainingInterrupted", "train"]
