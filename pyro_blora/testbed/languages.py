"""Language-tagged text: scripts, tokens, inline switch markup, and code-switching statistics.

A code-switched utterance is a sequence of `Segment`s, each in one language. Tokens are what an
error rate counts: one token per Han/Kana/Hangul character (Chinese and Japanese have no spaces) and
one per whitespace-separated word elsewhere; punctuation is not a token.

Inline markup for user text, where the script does not show the language (Spanish-English,
German-English): `Voy a la [en: meeting] mañana`. A bracket `[<language>: <words>]` marks
`<words>` as spoken in `<language>`; the brackets and the tag are removed from the transcript.
Where the two languages use different scripts (Chinese or Arabic with English), unmarked text is
split by script: runs of the embedded language's script are embedded segments.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "LanguagePair",
    "Segment",
    "SwitchStats",
    "script_of",
    "tokens",
    "join_segments",
    "parse_marked_text",
    "switch_stats",
    "SCRIPTS",
    "ESPEAK_VOICES",
]

# Writing system of each language the testbed knows; others default to Latin (pass `matrix_script`).
SCRIPTS: dict[str, str] = {
    "zh": "HAN", "ja": "HAN", "ko": "HANGUL", "ar": "ARABIC", "fa": "ARABIC", "ur": "ARABIC", "he": "HEBREW",
    "ru": "CYRILLIC", "uk": "CYRILLIC", "bg": "CYRILLIC", "el": "GREEK", "hi": "DEVANAGARI", "th": "THAI",
}
# eSpeak NG voice for each Whisper language code where the two differ or matter.
ESPEAK_VOICES: dict[str, str] = {"zh": "cmn", "en": "en-us", "yue": "yue"}

_CHARACTER_TOKEN_SCRIPTS = {"HAN", "HANGUL"}
_MARKUP = re.compile(r"\[\s*([A-Za-z]{2,3}(?:-[A-Za-z0-9]+)?)\s*:\s*([^\[\]]+?)\s*\]")


def script_of(char: str) -> str | None:
    """Writing system of one character ("HAN", "LATIN", "ARABIC", ...), None for digits, spaces, punctuation."""
    if not unicodedata.category(char).startswith("L") and not unicodedata.category(char).startswith("M"):
        return None
    name = unicodedata.name(char, "")
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA")):
        return "HAN"
    return name.split(" ")[0] or None


@dataclass(frozen=True)
class LanguagePair:
    """Who speaks what: the matrix (main) language, the embedded language, and their eSpeak voices.

    Languages are Whisper codes ("zh", "es", "ar", "en", "de"); voices are eSpeak voice names
    ("cmn", "es", "ar", "en-us"). A monolingual set is a pair whose embedded language is None.
    """

    matrix: str
    embedded: str | None = "en"
    matrix_voice: str | None = None
    embedded_voice: str | None = None

    def __post_init__(self):
        for code in (self.matrix, self.embedded):
            if code is not None and not re.fullmatch(r"[a-z]{2,3}", code):
                raise ValueError(f"language {code!r} is not a Whisper language code like 'zh', 'es', 'en'")
        if self.embedded == self.matrix:
            raise ValueError(f"matrix and embedded language are both {self.matrix!r}; use embedded=None for monolingual text")
        if self.matrix_voice is None:
            object.__setattr__(self, "matrix_voice", ESPEAK_VOICES.get(self.matrix, self.matrix))
        if self.embedded is not None and self.embedded_voice is None:
            object.__setattr__(self, "embedded_voice", ESPEAK_VOICES.get(self.embedded, self.embedded))

    @property
    def name(self) -> str:
        return self.matrix if self.embedded is None else f"{self.matrix}-{self.embedded}"

    @property
    def languages(self) -> str:
        return self.matrix if self.embedded is None else f"{self.matrix}+{self.embedded}"

    def voice_of(self, language: str) -> str:
        if language == self.matrix:
            return self.matrix_voice
        if language == self.embedded:
            return self.embedded_voice
        raise ValueError(f"language {language!r} is neither {self.matrix!r} nor {self.embedded!r} of pair {self.name}")

    @property
    def scripts_differ(self) -> bool:
        return self.embedded is not None and SCRIPTS.get(self.matrix, "LATIN") != SCRIPTS.get(self.embedded, "LATIN")


@dataclass(frozen=True)
class Segment:
    language: str
    text: str


def tokens(text: str) -> list[str]:
    """Error-rate tokens: single Han/Hangul characters, otherwise words; punctuation dropped."""
    out: list[str] = []
    for word in text.split():
        current = ""
        for char in word:
            script = script_of(char)
            if script in _CHARACTER_TOKEN_SCRIPTS:
                if current:
                    out.append(current)
                    current = ""
                out.append(char)
            elif script is not None or (char.isdigit()) or (char in "'’-" and current):
                current += char
            elif current:
                out.append(current)
                current = ""
        if current:
            out.append(current)
    return out


def _needs_space(left: str, right: str) -> bool:
    if not left or not right or left[-1].isspace() or right[0].isspace():
        return False
    left_script, right_script = script_of(left[-1]), script_of(right[0])
    if left_script is None or right_script is None:
        # Punctuation: a space after Latin-style marks before a word; none before punctuation or after "，。".
        return right_script is not None and left[-1] in ",.;:!?)"
    return left_script != right_script or left_script not in _CHARACTER_TOKEN_SCRIPTS


def join_segments(segments: Sequence[Segment]) -> str:
    """The transcript of a segment sequence: a space where scripts meet (as SEAME writes 'meeting' in Chinese)."""
    text = ""
    for segment in segments:
        piece = segment.text
        if _needs_space(text, piece):
            text += " "
        text += piece
    return re.sub(r"\s+", " ", text).strip()


def _split_by_script(text: str, pair: LanguagePair) -> list[Segment]:
    """Unmarked text of a pair with different scripts: runs in the embedded script are embedded."""
    embedded_script = SCRIPTS.get(pair.embedded, "LATIN")
    segments: list[Segment] = []
    for match in re.finditer(r"\S+|\s+", text):
        piece = match.group(0)
        scripts = {script_of(c) for c in piece} - {None}
        language = pair.embedded if scripts == {embedded_script} else pair.matrix
        if not scripts and segments:
            language = segments[-1].language
        if scripts and embedded_script in scripts and len(scripts) > 1:
            # A word mixing scripts (e.g. "用email"): split it character by character.
            for char in piece:
                char_language = pair.embedded if script_of(char) == embedded_script else pair.matrix
                segments.append(Segment(char_language, char))
            continue
        segments.append(Segment(language, piece))
    return _merge(segments)


def _merge(segments: Iterable[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].language == segment.language:
            merged[-1] = Segment(segment.language, merged[-1].text + segment.text)
        elif merged and not tokens(segment.text):
            # Whitespace and punctuation stay with the segment before them.
            merged[-1] = Segment(merged[-1].language, merged[-1].text + segment.text)
        else:
            merged.append(segment)
    return [Segment(s.language, s.text.strip()) for s in merged if s.text.strip()]


def parse_marked_text(line: str, pair: LanguagePair) -> list[Segment]:
    """Segments of one user-written utterance (see the module docstring for the markup)."""
    if re.search(r"[\[\]]", _MARKUP.sub("", line)):
        raise ValueError(f"unbalanced or malformed markup in {line!r}; write switches as [en: words]")
    segments: list[Segment] = []
    position = 0
    for match in _MARKUP.finditer(line):
        language, words = match.group(1).lower(), match.group(2)
        if language not in (pair.matrix, pair.embedded):
            raise ValueError(
                f"markup [{language}: ...] in {line!r} names a language outside the pair {pair.name}; "
                f"use [{pair.embedded}: words] for embedded words"
            )
        segments.extend(_unmarked(line[position : match.start()], pair))
        segments.append(Segment(language, words))
        position = match.end()
    segments.extend(_unmarked(line[position:], pair))
    merged = _merge(segments)
    if not merged:
        raise ValueError(f"utterance {line!r} has nothing to speak")
    return merged


def _unmarked(text: str, pair: LanguagePair) -> list[Segment]:
    if not text.strip():
        return [Segment(pair.matrix, text)] if text else []
    if pair.scripts_differ:
        return _split_by_script(text, pair)
    return [Segment(pair.matrix, text)]


@dataclass(frozen=True)
class SwitchStats:
    """Code-switching statistics of one utterance."""

    n_tokens: int
    n_embedded_tokens: int
    n_switches: int
    embedded_runs: tuple[int, ...]

    @property
    def embedded_fraction(self) -> float:
        return self.n_embedded_tokens / self.n_tokens if self.n_tokens else 0.0


def switch_stats(segments: Sequence[Segment], matrix: str) -> SwitchStats:
    """Switch points are language changes between consecutive segments that hold tokens."""
    spoken = [(s.language, len(tokens(s.text))) for s in segments]
    spoken = [(language, n) for language, n in spoken if n]
    runs: list[tuple[str, int]] = []
    for language, n in spoken:
        if runs and runs[-1][0] == language:
            runs[-1] = (language, runs[-1][1] + n)
        else:
            runs.append((language, n))
    embedded_runs = tuple(n for language, n in runs if language != matrix)
    return SwitchStats(
        n_tokens=sum(n for _, n in runs),
        n_embedded_tokens=sum(embedded_runs),
        n_switches=max(0, len(runs) - 1),
        embedded_runs=embedded_runs,
    )
