"""Long-form transcription: Whisper's own sequential 30 s windows with timestamps, under posterior draws.

Recordings longer than one Whisper input (30 s) are decoded with transformers' long-form
``generate``, which is openai-whisper's algorithm: decode a 30 s window with timestamp tokens,
keep the complete segments, move the window to the last timestamp, repeat. It runs once with the
posterior mean and once per posterior draw, each draw held fixed for the whole recording.

Why this and not voice-activity segmentation: the windows, the timestamps and the segment
boundaries come from the model itself, as in every Whisper deployment, and nothing is added that
could drop speech. The cost is that the draws cut their windows at slightly different times, so
word confidences are computed per window of the chosen hypothesis: every segment of a sample
hypothesis goes to the window that holds its midpoint, the chosen window's words are aligned with
those of each sample, and the windows are stitched in order.

Decoding is greedy with no temperature fallback and without conditioning on the previous window's
text (``condition_on_prev_tokens=False``): conditioning lets one window's error run into the next,
which would make the draws disagree for reasons that are not about the words being decoded.
Whisper's every-step token suppression is applied to the output projection's logits by indexing
(a forward hook), so it comes before the timestamp rules, as in openai-whisper; transformers' own
processor builds a vocabulary-wide ``torch.isin`` mask at every step, which took two thirds of
long-form decoding time on a CPU. The suppression at the first position stays transformers' own.
Entropies are therefore over the unsuppressed vocabulary.
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

import torch

from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.predict.monte_carlo import with_language, minimum_bayes_risk, sample_posterior
from pyro_blora.model.whisper import BLoRAWhisper

__all__ = [
    "LongFormHypothesis",
    "LongFormMonteCarlo",
    "Segment",
    "long_form_decode",
    "monte_carlo_long_form",
    "suppression_in_logits",
    "window_texts",
]


@dataclass(frozen=True)
class Segment:
    """A stretch of a long-form hypothesis between two of Whisper's timestamps."""

    start: float
    end: float
    text: str
    # Index of the 30 s decoding window the segment came from.
    window: int


@dataclass(frozen=True)
class LongFormHypothesis:
    """One model's long-form decoding of one recording."""

    segments: list[Segment]
    # Mean next-token entropy (nats) and mean log-probability of the decoded tokens, over all windows.
    mean_entropy: float
    mean_log_prob: float

    @property
    def text(self) -> str:
        return " ".join(segment.text for segment in self.segments if segment.text)


@dataclass(frozen=True)
class LongFormMonteCarlo:
    """A recording decoded long-form under S posterior draws (and the posterior mean)."""

    chosen: LongFormHypothesis
    samples: list[LongFormHypothesis]
    disagreement: float
    mean_token_entropy: float
    mean_log_prob: float | None


def _window_statistics(result: Mapping[str, Any], eos: int) -> tuple[float, float, int]:
    """Summed entropy and token log-probability of one window's decoding, and its step count."""
    logits = result.get("logits") if isinstance(result, Mapping) else None
    if not logits:
        return 0.0, 0.0, 0
    log_p = torch.log_softmax(torch.stack(list(logits)).float(), dim=-1)  # (steps, vocab)
    generated = result["sequences"][-log_p.shape[0]:].to(log_p.device)
    ends = (generated == eos).nonzero()
    steps = int(ends[0]) + 1 if len(ends) else log_p.shape[0]  # up to and including the first end token
    log_p, generated = log_p[:steps], generated[:steps]
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
    token = log_p.gather(-1, generated.unsqueeze(-1)).squeeze(-1).nan_to_num(neginf=0.0)
    return float(entropy.sum()), float(token.sum()), steps


@contextmanager
def suppression_in_logits(whisper) -> Iterator[None]:
    """Suppress the generation config's ``suppress_tokens`` in the output projection's logits (by indexing)
    instead of in transformers' processor, for the duration; the model's config is restored afterwards."""
    config = whisper.generation_config
    saved = config.suppress_tokens
    suppressed = torch.tensor(sorted(set(saved or ())), dtype=torch.long)

    def hook(module, inputs, logits):
        logits[..., suppressed.to(logits.device)] = -float("inf")
        return logits

    handle = whisper.proj_out.register_forward_hook(hook) if len(suppressed) else None
    config.suppress_tokens = None
    try:
        yield
    finally:
        config.suppress_tokens = saved
        if handle is not None:
            handle.remove()


@torch.no_grad()
def long_form_decode(
    whisper,
    tokenizer,
    input_features: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generate_kwargs: Mapping[str, Any] | None = None,
    fast_suppression: bool = True,
) -> list[LongFormHypothesis]:
    """Decode recordings of any length with transformers' sequential long-form algorithm.

    ``input_features`` and ``attention_mask`` come from :func:`pyro_blora.features.long_form_features`;
    ``fast_suppression=False`` leaves token suppression to transformers (same tokens, slower)."""
    kwargs = dict(generate_kwargs or {})
    if input_features.shape[0] > 1 and attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with suppression_in_logits(whisper) if fast_suppression else nullcontext():
        out = _generate_long_form(whisper, input_features, kwargs)
    return _hypotheses(whisper, tokenizer, out)


def _generate_long_form(whisper, input_features: torch.Tensor, kwargs: dict) -> dict:
    return whisper.generate(
        input_features,
        return_timestamps=True,
        return_segments=True,
        return_dict_in_generate=True,
        output_logits=True,
        condition_on_prev_tokens=False,
        **kwargs,
    )


def _hypotheses(whisper, tokenizer, out: Mapping[str, Any]) -> list[LongFormHypothesis]:
    """Segments (with their window) and per-token statistics from long-form ``generate`` output."""
    eos = whisper.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    hypotheses = []
    for raw_segments in out["segments"]:
        segments, entropy, log_prob, steps = [], 0.0, 0.0, 0
        window, previous = -1, None
        for raw in raw_segments:
            result = raw.get("result")
            if result is None or result is not previous:  # segments of one window share its result
                window += 1
                previous = result
                if result is not None:
                    e, lp, n = _window_statistics(result, eos)
                    entropy, log_prob, steps = entropy + e, log_prob + lp, steps + n
            text = tokenizer.decode(raw["tokens"], skip_special_tokens=True).strip()
            segments.append(Segment(round(float(raw["start"]), 3), round(float(raw["end"]), 3), text, window))
        count = max(steps, 1)
        hypotheses.append(LongFormHypothesis(segments, entropy / count, log_prob / count))
    return hypotheses


def window_texts(chosen: LongFormHypothesis, other: LongFormHypothesis) -> list[str]:
    """The text of ``other`` cut at the windows of ``chosen``: each of its segments goes to the
    chosen window that holds the segment's midpoint (windows meet where a window's first segment starts)."""
    starts: dict[int, float] = {}
    for segment in chosen.segments:
        starts.setdefault(segment.window, segment.start)
    windows = sorted(starts)
    cuts = [starts[w] for w in windows[1:]]
    pieces: list[list[str]] = [[] for _ in windows]
    for segment in other.segments:
        if windows and segment.text:
            pieces[bisect_right(cuts, (segment.start + segment.end) / 2)].append(segment.text)
    return [" ".join(piece) for piece in pieces]


@torch.no_grad()
def monte_carlo_long_form(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    input_features: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokenizer,
    num_samples: int = 8,
    choose: Literal["mean", "mbr"] = "mean",
    language: str | None = None,
    generate_kwargs: Mapping | None = None,
    posterior_temperature: float = 1.0,
) -> list[LongFormMonteCarlo]:
    """Long-form decoding of a batch of recordings under ``num_samples`` posterior draws.

    Draws are decoded one after another: long-form decoding drops finished recordings from its
    batch as it goes, so rows cannot carry one adapter draw each as the short-form vectorised pass does.
    ``posterior_temperature`` scales the posterior's standard deviations of the draws."""
    if choose not in ("mean", "mbr"):
        raise ValueError(f"choose must be 'mean' or 'mbr', got {choose!r}")
    kwargs = with_language(model, generate_kwargs, language)
    model.eval()
    draws = sample_posterior(guide, num_samples, temperature=posterior_temperature)
    per_draw = []
    for s in range(num_samples):
        with model.hold_adapters({site: value[s] for site, value in draws.items()}):
            per_draw.append(long_form_decode(model.whisper, tokenizer, input_features, attention_mask, kwargs))
    means: list[LongFormHypothesis | None] = [None] * input_features.shape[0]
    if choose == "mean":
        with model.hold_adapters(guide.means()):
            means = long_form_decode(model.whisper, tokenizer, input_features, attention_mask, kwargs)
    results = []
    for b, mean in enumerate(means):
        samples = [per_draw[s][b] for s in range(num_samples)]
        best, disagreement = minimum_bayes_risk([h.text for h in samples], language=language)
        results.append(
            LongFormMonteCarlo(
                chosen=samples[best] if mean is None else mean,
                samples=samples,
                disagreement=disagreement,
                mean_token_entropy=sum(h.mean_entropy for h in samples) / num_samples,
                mean_log_prob=None if mean is None else mean.mean_log_prob,
            )
        )
    return results
