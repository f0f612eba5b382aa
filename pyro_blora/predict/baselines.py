"""Non-Bayesian decoders that spend the same S decoding passes as S posterior draws, on one fixed model.

Sampling from the posterior is worth its S passes only if it beats what those passes buy without a
posterior: beam search with S beams (its top hypothesis), and S samples of the next-token
distribution at temperature T, from which minimum Bayes risk picks one
(:func:`~pyro_blora.predict.monte_carlo.minimum_bayes_risk`, as for the posterior draws). Both decode
with the adapters held at fixed values (e.g. ``guide.means()``). Temperature samples are seeded per
utterance (:func:`utterance_seed`), so they do not depend on batching, on the order a resumed study
decodes in, or on the posterior draws around them (the global random state is restored afterwards).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.predict.decoding import generate
from pyro_blora.predict.monte_carlo import with_language

__all__ = ["beam_transcribe", "temperature_transcribe", "utterance_seed"]


def utterance_seed(seed: int, key: str) -> int:
    """A seed of one utterance (``key``, e.g. its id) under the study's ``seed``: stable across runs and
    processes (``hash`` of a string is not)."""
    return zlib.crc32(f"{seed}:{key}".encode("utf-8"))


def _held_texts(model: BLoRAWhisper, values: Mapping[str, torch.Tensor], input_features: torch.Tensor | None, tokenizer,
                language: str | None, generate_kwargs: Mapping | None, **decoding) -> list[str]:
    """The texts ``generate`` returns with the adapters held at ``values`` (``decoding`` on top of
    ``generate_kwargs``), decoded as the posterior draws' texts are."""
    kwargs = {**with_language(model, generate_kwargs, language), **decoding}
    model.eval()
    with model.hold_adapters(values):
        out = generate(model.whisper, input_features, **kwargs)
    sequences = getattr(out, "sequences", out)
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def _encoded(model: BLoRAWhisper, values: Mapping[str, torch.Tensor], input_features: torch.Tensor) -> torch.Tensor:
    """The encoder's output with the adapters held at ``values``: one pass, shared by every decode of the
    same model (``generate`` expands a fresh :class:`BaseModelOutput` of it in place, so wrap it anew)."""
    model.eval()
    with model.hold_adapters(values):
        return model.whisper.get_encoder()(input_features).last_hidden_state


@torch.no_grad()
def beam_transcribe(model: BLoRAWhisper, adapter_values: Mapping[str, torch.Tensor], input_features: torch.Tensor,
                    tokenizer, beams: Sequence[int], language: str | None = None,
                    generate_kwargs: Mapping | None = None) -> dict[int, list[str]]:
    """For each number of beams in ``beams``, the top hypothesis of beam search, one per row of
    ``input_features`` (1 beam is greedy decoding); one encoder pass serves them all."""
    if not beams or min(beams) < 1:
        raise ValueError(f"beams must be numbers of beams >= 1 (1: greedy decoding), got {list(beams)}")
    encoded = _encoded(model, adapter_values, input_features)
    return {width: _held_texts(model, adapter_values, None, tokenizer, language, generate_kwargs,
                               encoder_outputs=BaseModelOutput(last_hidden_state=encoded), num_beams=width,
                               do_sample=False) for width in beams}


@torch.no_grad()
def temperature_transcribe(model: BLoRAWhisper, adapter_values: Mapping[str, torch.Tensor],
                           input_features: torch.Tensor, tokenizer, num_samples: int, seeds: Sequence[int],
                           temperature: float = 1.0, language: str | None = None,
                           generate_kwargs: Mapping | None = None) -> list[list[str]]:
    """``num_samples`` hypotheses per row of ``input_features``, each token drawn from the model's
    next-token distribution at ``temperature``. Row b is drawn under ``seeds[b]`` alone (the same samples
    in any batch), in one batched pass of ``num_samples`` sequences that share one encoder pass (one
    model: the audio's encoding is the same for all); a smaller ``num_samples`` draws other samples, so
    draw once at the largest S and take the first k (as the posterior draws do)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0 (1: the model's own distribution; beam or greedy "
                         f"decoding are the other baselines), got {temperature}")
    if len(seeds) != input_features.shape[0]:
        raise ValueError(f"give one seed per row of input_features: {len(seeds)} seeds for {input_features.shape[0]} rows")
    device = input_features.device
    encoded = _encoded(model, adapter_values, input_features)
    samples = []
    for row, seed in enumerate(seeds):
        shared = BaseModelOutput(last_hidden_state=encoded[row:row + 1].repeat(num_samples, 1, 1))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            samples.append(_held_texts(model, adapter_values, None, tokenizer, language, generate_kwargs,
                                       encoder_outputs=shared, do_sample=True, temperature=temperature))
    return samples
