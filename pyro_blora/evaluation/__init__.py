"""Scoring models on test sets: error rates, transcript-token CE and language ID (``scoring``), and the
quality of uncertainty estimates (``uncertainty``, ``payoff``)."""

from pyro_blora.evaluation.scoring import (
    CE_SCOPE,
    EvalOptions,
    EvalSet,
    all_token_ce,
    ce_scope,
    detects_language,
    evaluate_whisper,
    greedy_transcripts,
    load_eval_sets,
    relative_changes,
)

__all__ = [
    "CE_SCOPE",
    "EvalOptions",
    "EvalSet",
    "all_token_ce",
    "ce_scope",
    "detects_language",
    "evaluate_whisper",
    "greedy_transcripts",
    "load_eval_sets",
    "relative_changes",
]
