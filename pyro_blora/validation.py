"""Start-up checks that refuse a run before any work is done, each with the fix in its message.

The language check is the one the data pipeline's label encoder applies to every row; calling it
at start-up (training, generation, evaluation) turns a late failure inside ``generate`` or a
silently dropped data set into one clear error.
"""

from __future__ import annotations

from pyro_blora.data.labels import EnglishOnlyModelError, UnknownLanguageError, language_code

__all__ = ["EnglishOnlyModelError", "UnknownLanguageError", "check_language"]


def check_language(processor_or_tokenizer, language: str) -> str:
    """Whisper's code for ``language`` (a code or an English name such as 'Spanish').

    Raises UnknownLanguageError when the tokenizer has no token for it, and EnglishOnlyModelError
    (a subclass) when the model is English-only and ``language`` is not English.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    return language_code(tokenizer, language)
