"""Decoder targets in Whisper's own format.

Each label is <|startoftranscript|><|lang|><|transcribe|><|notimestamps|> text <|endoftext|>
(English-only models: <|startoftranscript|><|notimestamps|> text <|endoftext|>). The text is
tokenised with a leading space, as Whisper's training data has it; without it the first word
gets a token the model rarely predicts and the first position's loss is high.
"""

from __future__ import annotations

from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

__all__ = [
    "MAX_TARGET_POSITIONS",
    "EnglishOnlyModelError",
    "UnknownLanguageError",
    "TranscriptEncoder",
    "decoder_start_token_id",
    "is_english_only",
    "check_language",
    "language_code",
]

MAX_TARGET_POSITIONS = 448  # Whisper's decoder positions: prompt + text + end token must fit

# English-only Whisper vocabularies are GPT-2's (50256 ordinary tokens, so <|endoftext|> is 50256);
# multilingual ones have one more ordinary token. Both list language tokens in transformers.
_ENGLISH_ONLY_EOT_ID = 50256


class UnknownLanguageError(ValueError):
    """A language that has no token in the tokenizer."""


class EnglishOnlyModelError(UnknownLanguageError):
    """A language other than English asked of an English-only (`.en`) model."""


def decoder_start_token_id(tokenizer) -> int:
    return _token_id(tokenizer, "<|startoftranscript|>")


def is_english_only(tokenizer) -> bool:
    """True for the `.en` checkpoints' tokenizers, which the prompt must not give a language token."""
    if _optional_token_id(tokenizer, "<|en|>") is None:
        return True
    return _token_id(tokenizer, "<|endoftext|>") == _ENGLISH_ONLY_EOT_ID


def language_code(tokenizer, language: str, english_only: bool | None = None) -> str:
    """Whisper's code for a code or an English name ('zh', 'Chinese', 'mandarin' -> 'zh'), refused
    when the tokenizer has no token for it or the model is English-only and it is not English."""
    key = language.strip().lower()
    code = key if key in LANGUAGES else TO_LANGUAGE_CODE.get(key, key)
    if is_english_only(tokenizer) if english_only is None else english_only:
        if code != "en":
            raise EnglishOnlyModelError(
                f"language {language!r} asked of an English-only model (a '.en' checkpoint), which transcribes "
                "English only; use a multilingual checkpoint such as 'base' for it, or language='en'"
            )
    elif _optional_token_id(tokenizer, f"<|{code}|>") is None:
        raise UnknownLanguageError(
            f"language {language!r} has no token in this tokenizer; use a Whisper code such as 'en', 'zh', 'es' "
            "(for code-switched speech, the matrix language)"
        )
    return code


class TranscriptEncoder:
    """Turns (text, language) into label ids; one per tokenizer, prompts cached per language."""

    def __init__(self, tokenizer, english_only: bool | None = None, language_override: str | None = None):
        self.tokenizer = tokenizer
        self.english_only = is_english_only(tokenizer) if english_only is None else english_only
        self.language_override = None if language_override is None else self.language_code(language_override)
        self.end = [_token_id(tokenizer, "<|endoftext|>")]
        self._prompts: dict[str, list[int]] = {}

    def language_code(self, language: str) -> str:
        return language_code(self.tokenizer, language, self.english_only)

    def prompt(self, language: str) -> list[int]:
        code = self.language_override or self.language_code(language)
        if code not in self._prompts:
            names = ["<|startoftranscript|>", "<|notimestamps|>"]
            if not self.english_only:
                names[1:1] = [f"<|{code}|>", "<|transcribe|>"]
            self._prompts[code] = [_token_id(self.tokenizer, name) for name in names]
        return self._prompts[code]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids

    def labels(self, text: str, language: str) -> list[int]:
        return self.prompt(language) + self.text_ids(text) + self.end


def _optional_token_id(tokenizer, token: str) -> int | None:
    """The token's id, or None where the tokenizer maps it to its unknown token."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def _token_id(tokenizer, token: str) -> int:
    token_id = _optional_token_id(tokenizer, token)
    if token_id is None:
        raise ValueError(
            f"the tokenizer has no {token} token; it is not a Whisper tokenizer (load one with load_processor)"
        )
    return token_id


def check_language(processor_or_tokenizer, language: str) -> str:
    """Whisper's code for ``language`` (a code or an English name such as 'Spanish').

    Raises UnknownLanguageError when the tokenizer has no token for it, and EnglishOnlyModelError
    (a subclass) when the model is English-only and ``language`` is not English.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    return language_code(tokenizer, language)
