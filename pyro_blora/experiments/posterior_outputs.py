"""What a trained run shows beyond its scores: Monte Carlo transcripts from its posterior's draws, and
its update's scales and sparsity.

Word confidence is what a posterior gives that a point estimate cannot (RESULTS "Monte Carlo
uncertainty": calibrated on a trained posterior), and the scales say whether the posterior learnt at
all (RESULTS "A posterior that learns"); the main job shows both for the run it trains.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from pyro_blora.checkpoint import atomic_write_json, atomic_write_text
from pyro_blora.metrics.scales import scale_quantiles
from pyro_blora.metrics.sparsity import sparsity_report
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.posterior import load_posterior
from pyro_blora.predict.subtitles import write_subtitles
from pyro_blora.predict.transcribe import TranscribeOptions, transcribe
from pyro_blora.predict.transcripts import read_jsonl, write_jsonl
from pyro_blora.predict.transcripts import UtteranceTranscript
from pyro_blora.report.summaries import load_run_weights
from pyro_blora.runs import RESULT_FILE, load_run_model, read_run_config

__all__ = ["TranscriptSource", "ensure_posterior_summary", "ensure_transcripts", "posterior_summary"]

# A dataset to take clips from: (source load_speech_dataset reads, split or None, how many clips).
TranscriptSource = tuple[str | Path, str | None, int]


def ensure_transcripts(run_dir: str | Path, sources: Sequence[TranscriptSource], out: str | Path, *,
                       options: TranscribeOptions = TranscribeOptions(),
                       encoder_window_seconds: float = 30.0) -> list[UtteranceTranscript]:
    """Monte Carlo transcripts of the first clips of each source under the run's posterior draws, with
    word confidence: ``out``/transcripts.jsonl (written last) and one SRT file per clip in ``out``/srt;
    read back when the JSONL exists. The posterior goes onto its base model at ``encoder_window_seconds``
    (Whisper's own 30 s: an adapter trained with a shorter window is used at the full one)."""
    out = Path(out)
    jsonl = out / "transcripts.jsonl"
    if jsonl.is_file():
        return read_jsonl(jsonl)
    run_dir = Path(run_dir)
    whisper, processor, _ = load_run_model(read_run_config(run_dir)["run"]["model_source"])
    set_encoder_window(whisper, encoder_window_seconds)
    model, guide = load_posterior(run_dir / "posterior", whisper)
    transcripts: list[UtteranceTranscript] = []
    for source, split, count in sources:
        transcripts += transcribe(model, guide, processor, str(source), options, split=split, limit=count,
                                  progress=False)
    write_subtitles(transcripts, out / "srt", "srt", options.low_confidence)
    buffer = io.StringIO()
    write_jsonl(transcripts, buffer)
    atomic_write_text(jsonl, buffer.getvalue())
    return transcripts


def posterior_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's update: sparsity of ΔW (all adapted layers pooled) and, for a posterior, the quantiles
    of its scales per group (encoder/decoder, A/B), its prior scale and the convergence verdict that
    training wrote into ``result.json`` (key ``posterior``)."""
    weights = load_run_weights(run_dir)
    summary: dict[str, Any] = {"method": weights.method, "dW": sparsity_report(weights.delta).as_dict()}
    if weights.bayesian:
        scales = {f"{layer}.lora_{matrix}": value for matrix in ("A", "B")
                  for layer, value in getattr(weights, f"stddev_{matrix}").items()}
        summary["prior_scale"] = weights.prior_scale
        summary["sigma"] = scale_quantiles(scales)
        result = Path(run_dir) / RESULT_FILE
        convergence = json.loads(result.read_text()).get("posterior") if result.is_file() else None
        if convergence:
            summary["convergence"] = {key: convergence[key] for key in (
                "converged", "scales_near_optimum", "kl_settled", "kl_change_last_fifth",
                "sigma_vs_optimum/share_within", "sigma_vs_optimum/within", "sigma_vs_optimum/median_ratio", "rule",
            ) if key in convergence}
    return summary


def ensure_posterior_summary(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """:func:`posterior_summary` written to ``out`` (JSON), or read back from it."""
    out = Path(out)
    if out.is_file():
        return json.loads(out.read_text())
    summary = posterior_summary(run_dir)
    atomic_write_json(out, summary)
    return summary
