"""Whisper decoding arguments shared by evaluation and Monte Carlo transcription.

transformers applies Whisper's token suppression with processors that build a ``torch.isin`` mask
over the vocabulary at every decoding step; on a CPU that costs more than the decoder step itself.
:class:`IndexedSuppression` gives the same scores by indexing.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["IndexedSuppression", "generate", "greedy_generate_kwargs", "with_fast_suppression"]


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


@contextmanager
def _model_suppression_cleared(whisper) -> Iterator[None]:
    """transformers refills a generation config's unset (None) suppression lists from the model's own
    generation config, so its processors would run next to ours; clear them for the call."""
    config = whisper.generation_config
    saved = (config.suppress_tokens, config.begin_suppress_tokens)
    config.suppress_tokens = config.begin_suppress_tokens = None
    try:
        yield
    finally:
        config.suppress_tokens, config.begin_suppress_tokens = saved


class _LengthNoticeFilter(logging.Filter):
    """Drops transformers' notice that ``max_new_tokens`` overrides the model's own ``max_length``:
    our generation config sets the former on purpose, and the notice came once per decoded batch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("max_new_tokens" in message and "max_length" in message)


_GENERATION_LOGGER = logging.getLogger("transformers.generation.utils")


def generate(whisper, input_features, **generate_kwargs: Any):
    """``whisper.generate`` with :class:`IndexedSuppression` doing Whisper's token suppression alone
    (unless the caller brought their own generation config or logits processors without it)."""
    kwargs = with_fast_suppression(whisper, generate_kwargs)
    ours = any(isinstance(p, IndexedSuppression) for p in kwargs.get("logits_processor") or ())
    notice = _LengthNoticeFilter()
    _GENERATION_LOGGER.addFilter(notice)
    try:
        with _model_suppression_cleared(whisper) if ours else nullcontext():
            return whisper.generate(input_features, **kwargs)
    finally:
        _GENERATION_LOGGER.removeFilter(notice)
