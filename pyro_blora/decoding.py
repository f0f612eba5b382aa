"""Whisper decoding arguments shared by evaluation and Monte Carlo transcription.

transformers applies Whisper's token suppression with processors that build a ``torch.isin`` mask
over the vocabulary at every decoding step; on a CPU that costs more than the decoder step itself.
:class:`IndexedSuppression` gives the same scores by indexing.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["IndexedSuppression", "greedy_generate_kwargs", "with_fast_suppression"]


class IndexedSuppression(LogitsProcessor):
    """Whisper's token suppression (``suppress_tokens`` at every step, ``begin_suppress_tokens`` at
    the first generated position) by indexing instead of a vocabulary-wide ``torch.isin``."""

    def __init__(self, suppress_tokens: Sequence[int], begin_suppress_tokens: Sequence[int], begin_index: int) -> None:
        self.suppress = torch.tensor(sorted(set(suppress_tokens or ())), dtype=torch.long)
        self.begin = torch.tensor(sorted(set(begin_suppress_tokens or ())), dtype=torch.long)
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.suppress.to(scores.device)] = -float("inf")
        if input_ids.shape[-1] == self.begin_index:
            scores[:, self.begin.to(scores.device)] = -float("inf")
        return scores


def _is_multilingual(whisper) -> bool:
    config = whisper.generation_config
    return bool(getattr(config, "is_multilingual", bool(getattr(config, "lang_to_id", None))))


def _prompt_length(config, multilingual: bool) -> int:
    """Tokens before the first generated one: <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>."""
    return 1 + (2 if multilingual else 0) + (getattr(config, "no_timestamps_token_id", None) is not None)


def _suppression_kwargs(whisper, multilingual: bool | None) -> dict[str, Any]:
    config = copy.deepcopy(whisper.generation_config)
    multilingual = _is_multilingual(whisper) if multilingual is None else multilingual
    processor = IndexedSuppression(config.suppress_tokens, config.begin_suppress_tokens, _prompt_length(config, multilingual))
    config.suppress_tokens = None
    config.begin_suppress_tokens = None
    return dict(generation_config=config, logits_processor=LogitsProcessorList([processor]))


def greedy_generate_kwargs(whisper, multilingual: bool | None, max_new_tokens: int) -> dict[str, Any]:
    """Greedy-search arguments with :class:`IndexedSuppression` in place of transformers' suppression."""
    kwargs = _suppression_kwargs(whisper, multilingual)
    config = kwargs["generation_config"]
    # Set on the config itself: transformers warns about arguments given both ways.
    config.max_new_tokens, config.max_length, config.do_sample, config.num_beams = max_new_tokens, None, False, 1
    return kwargs


def with_fast_suppression(whisper, generate_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``generate_kwargs`` with the indexed suppression added, unless the caller brought their own
    generation config or logits processors (then they are left exactly as given)."""
    kwargs = dict(generate_kwargs or {})
    if "generation_config" in kwargs or "logits_processor" in kwargs:
        return kwargs
    return {**_suppression_kwargs(whisper, None), **kwargs}
