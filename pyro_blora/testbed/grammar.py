"""Sentence generation from templates with word slots, code-switched or monolingual.

A template is a sentence in the matrix language with slots such as `{N}` or `{TIME}`. Each slot is
filled from the matrix language's word list for that slot or, with `switch_probability`, from the
embedded language's list: that is where the speaker switches. Sentences whose switch statistics fall
outside the spec's ranges are redrawn.

Templates are split between train, dev and test (`split_templates`), so that held-out sentences have
structures never seen in training: a model cannot score well by memorising templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from pyro_blora.testbed.languages import LanguagePair, Segment, SwitchStats, join_segments, switch_stats

__all__ = ["CodeSwitchSpec", "GeneratedSentence", "generate_sentences", "split_templates"]

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class CodeSwitchSpec:
    """Everything the generator needs for one language pair; a new pair is a new spec, not new code.

    - `templates`: matrix-language sentences with `{SLOT}` fields.
    - `matrix_words` / `embedded_words`: slot name -> candidate fills (words or short phrases).
      Slots without embedded words never switch.
    - `switch_probability`: chance that a slot is filled in the embedded language.
    - `embedded_fraction_range`, `switch_range`: accepted range of the embedded token fraction and of
      the number of switch points per code-switched sentence.
    """

    pair: LanguagePair
    templates: tuple[str, ...]
    matrix_words: Mapping[str, Sequence[str]]
    embedded_words: Mapping[str, Sequence[str]] = field(default_factory=dict)
    switch_probability: float = 0.45
    embedded_fraction_range: tuple[float, float] = (0.05, 0.6)
    switch_range: tuple[int, int] = (1, 6)

    def __post_init__(self):
        if not self.templates:
            raise ValueError(f"spec {self.name} has no templates; give at least one sentence with {{SLOT}} fields")
        for template in self.templates:
            for slot in _SLOT.findall(template):
                if not self.matrix_words.get(slot) and not self.embedded_words.get(slot):
                    raise ValueError(
                        f"template {template!r} of {self.name} uses slot {{{slot}}} but neither matrix_words nor "
                        f"embedded_words has fills for {slot!r}; add a word list for it"
                    )
        if self.embedded_words and self.pair.embedded is None:
            raise ValueError(f"spec {self.name} has embedded_words but its pair has no embedded language")
        if not 0.0 <= self.switch_probability <= 1.0:
            raise ValueError(f"switch_probability {self.switch_probability} must lie in [0, 1]")
        low, high = self.embedded_fraction_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"embedded_fraction_range {self.embedded_fraction_range} must satisfy 0 <= low <= high <= 1")
        if not 0 <= self.switch_range[0] <= self.switch_range[1]:
            raise ValueError(f"switch_range {self.switch_range} must satisfy 0 <= low <= high")

    @property
    def name(self) -> str:
        return self.pair.name

    def template_id(self, index: int) -> str:
        return f"{self.name}/t{index:03d}"


@dataclass(frozen=True)
class GeneratedSentence:
    segments: tuple[Segment, ...]
    template_id: str
    stats: SwitchStats

    @property
    def text(self) -> str:
        return join_segments(self.segments)


def _tidy_english(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _fill(spec: CodeSwitchSpec, template: str, rng: np.random.Generator, monolingual: bool) -> list[Segment]:
    pieces: list[Segment] = []
    position = 0
    for match in _SLOT.finditer(template):
        pieces.append(Segment(spec.pair.matrix, template[position : match.start()]))
        slot = match.group(1)
        matrix_fills, embedded_fills = spec.matrix_words.get(slot, ()), spec.embedded_words.get(slot, ())
        use_embedded = bool(embedded_fills) and not monolingual and (
            not matrix_fills or rng.random() < spec.switch_probability
        )
        if monolingual and not matrix_fills:
            raise ValueError(f"slot {{{slot}}} of {spec.name} has no matrix words, so no monolingual sentence can fill it")
        fills, language = (embedded_fills, spec.pair.embedded) if use_embedded else (matrix_fills, spec.pair.matrix)
        pieces.append(Segment(language, fills[int(rng.integers(len(fills)))]))
        position = match.end()
    pieces.append(Segment(spec.pair.matrix, template[position:]))
    return _segments_from_pieces(pieces)


def _segments_from_pieces(pieces: list[Segment]) -> list[Segment]:
    """Merge same-language neighbours and tie letterless pieces (spaces, punctuation) to the previous segment."""
    merged: list[list[str]] = []
    for piece in pieces:
        if merged and (merged[-1][0] == piece.language or not any(c.isalpha() for c in piece.text)):
            merged[-1][1] += piece.text
        else:
            merged.append([piece.language, piece.text])
    out = []
    for language, text in merged:
        text = re.sub(r"\s+", " ", text).strip()
        if language == "en":
            text = _tidy_english(text)
        if text:
            out.append(Segment(language, text))
    if out and out[0].text[0].islower():
        # A sentence starts with a capital, also when it starts with an embedded word.
        out[0] = Segment(out[0].language, out[0].text[0].upper() + out[0].text[1:])
    return out


def _acceptable(spec: CodeSwitchSpec, stats: SwitchStats) -> bool:
    low, high = spec.embedded_fraction_range
    return low <= stats.embedded_fraction <= high and spec.switch_range[0] <= stats.n_switches <= spec.switch_range[1]


def generate_sentences(
    spec: CodeSwitchSpec,
    n: int,
    seed: int,
    template_indices: Sequence[int] | None = None,
    monolingual: bool = False,
    exclude: set[str] | None = None,
) -> list[GeneratedSentence]:
    """`n` distinct sentences from the given templates (all by default), reproducible from `seed`.

    Code-switched sentences (a pair with an embedded language, `monolingual=False`) respect the spec's
    switch ranges. Texts in `exclude` are never produced (keeps splits disjoint).
    """
    indices = list(range(len(spec.templates))) if template_indices is None else list(template_indices)
    if n and not indices:
        raise ValueError(f"no templates to draw {n} sentences of {spec.name} from")
    code_switched = spec.pair.embedded is not None and not monolingual
    rng = np.random.default_rng(seed)
    seen = set(exclude or ())
    out: list[GeneratedSentence] = []
    attempts = 0
    max_attempts = 200 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only draw {len(out)} of {n} distinct sentences for {spec.name} from {len(indices)} templates; "
                "add templates or words to the spec, widen its switch ranges, or ask for fewer sentences"
            )
        index = indices[int(rng.integers(len(indices)))]
        segments = _fill(spec, spec.templates[index], rng, monolingual=not code_switched)
        stats = switch_stats(segments, spec.pair.matrix)
        if code_switched and not _acceptable(spec, stats):
            continue
        sentence = GeneratedSentence(tuple(segments), spec.template_id(index), stats)
        if sentence.text in seen:
            continue
        seen.add(sentence.text)
        out.append(sentence)
    return out


def split_templates(n_templates: int, sizes: Mapping[str, int], seed: int) -> dict[str, list[int]]:
    """Disjoint template indices per split, shared out in proportion to the split sizes (at least one each)."""
    wanted = {split: size for split, size in sizes.items() if size > 0}
    if len(wanted) > n_templates:
        raise ValueError(
            f"{n_templates} templates cannot be split over {len(wanted)} splits ({', '.join(wanted)}) without sharing "
            "structures; add templates or set unused split sizes to 0"
        )
    order = np.random.default_rng(seed).permutation(n_templates).tolist()
    total = sum(wanted.values())
    counts = {split: 1 for split in wanted}
    spare = n_templates - len(wanted)
    shares = {split: spare * size / total if total else 0 for split, size in wanted.items()}
    for split in wanted:
        counts[split] += int(shares[split])
    leftover = n_templates - sum(counts.values())
    for split in sorted(wanted, key=lambda s: shares[s] - int(shares[s]), reverse=True)[:leftover]:
        counts[split] += 1
    out: dict[str, list[int]] = {split: [] for split in sizes}
    start = 0
    for split, count in counts.items():
        out[split] = sorted(order[start : start + count])
        start += count
    return out
