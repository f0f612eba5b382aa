"""Scoring models on test sets: error rates, transcript-token CE and language ID (``scoring``), and the
quality of uncertainty estimates (``uncertainty``, ``payoff``).

The package re-exports ``scoring``, which was the module ``pyro_blora.evaluation`` before the layout by
pipeline stage, so old imports keep working."""

from pyro_blora.evaluation import scoring
from pyro_blora.evaluation.scoring import *  # noqa: F401,F403

__all__ = list(scoring.__all__)
