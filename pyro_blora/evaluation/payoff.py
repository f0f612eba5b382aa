"""Does the posterior's uncertainty pay? Monte Carlo scores against deterministic baselines on the same utterances.

One pass over the test utterances records, per utterance: the S posterior samples' hypotheses (the
largest S asked for; smaller S use the first draws), the posterior mean's hypothesis with its token
log-probability (also temperature-scaled) and per-word entropy confidence, the mutual information and
expected entropy of the samples along the mean hypothesis, and the same for the baseline LoRA (held in
the same model, ``run_training("lora")``'s adapter). With ``PayoffOptions.baselines`` it also records
the non-Bayesian decoders of the posterior mean that spend the same S passes
(:mod:`pyro_blora.predict.baselines`): the top hypothesis of S-beam search per S, and S temperature
samples (the largest S; smaller S use the first). Temperatures are fitted on dev utterances only,
one per deterministic model. :func:`summarise_payoff` turns the records into error rates (MBR at each
S against the posterior mean, and each baseline against MBR over as many posterior draws, with paired
bootstrap intervals) and uncertainty reports (AUROC and selective area with intervals, ECE of each word
confidence; the temperature samples' disagreement and agreement scored next to the posterior draws').

:func:`run_payoff_study` is the whole study on a testbed, resumable (its LoRA baseline, trained to match
the BLoRA run, comes from :mod:`pyro_blora.experiments.uncertainty`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyro
import torch
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora.predict.confidence import DEFAULT_ENTROPY_ALPHA, TemperatureFit, fit_temperature, word_entropy_confidences
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.data import load_audio
from pyro_blora.features import log_mel_features
from pyro_blora.model.encoder_window import encoder_input_frames, encoder_window_seconds, window_frames
from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.predict.baselines import beam_transcribe, temperature_transcribe, utterance_seed
from pyro_blora.predict.monte_carlo import minimum_bayes_risk, monte_carlo_transcribe, point_transcribe, widest_sites
from pyro_blora.data import load_speech_dataset
from pyro_blora.data.training_data import TrainingData, load_training_data
from pyro_blora.runs import WEIGHT_FOLDERS, load_for_transcription, read_run_config, run_encoder_window
from pyro_blora.testbed import testbed_domains
from pyro_blora.metrics.bootstrap import paired_bootstrap
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.predict.transcribe import Utterance, collect_utterances
from pyro_blora.predict.transcripts import UtteranceTranscript, word_confidences
from pyro_blora.evaluation.uncertainty import UncertaintyReport, evaluate_uncertainty, utterance_errors

__all__ = ["PayoffOptions", "decode_payoff_records", "dev_logits", "fit_model_temperatures", "lora_run_values",
           "read_records", "run_payoff_study", "summarise_payoff", "write_records"]

RECORDS_FILE = "utterances.jsonl"
SUMMARY_FILE = "summary.json"
TEMPERATURES_FILE = "temperatures.json"
# The non-Bayesian decoders PayoffOptions.baselines may name (see pyro_blora.predict.baselines).
BASELINES = ("beam", "temperature")


@dataclass(frozen=True)
class PayoffOptions:
    """How the test utterances are decoded and sampled."""

    # Values of S; the largest is drawn, the others use its first draws.
    samples: tuple[int, ...] = (1, 4, 8, 16)
    # Posterior temperature tau: every posterior std scaled by it when sampling (1: as trained).
    posterior_temperature: float = 1.0
    # Sample only this many adapter sites, those of largest posterior variance (None: all).
    widest_sites: int | None = None
    batch_size: int = 2
    max_new_tokens: int = 96
    seed: int = 0
    # Tsallis alpha of the entropy confidence (arXiv 2212.08703's best: 1/3; 1: Gibbs entropy).
    entropy_alpha: float = DEFAULT_ENTROPY_ALPHA
    # Decoders of the posterior mean at S passes, against MBR over S draws: "beam" (S beams),
    # "temperature" (MBR over S samples at sample_temperature). Empty: none (the study's cost).
    baselines: tuple[str, ...] = ()
    # Temperature T of the "temperature" baseline's next-token samples (1: the mean model's own distribution).
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(sorted(set(int(s) for s in self.samples))))
        names = self.baselines.split(",") if isinstance(self.baselines, str) else self.baselines
        object.__setattr__(self, "baselines", tuple(sorted({n.strip() for n in names if n.strip()})))
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; name some of {BASELINES}, e.g. "
                             "baselines=('beam', 'temperature') (--baselines beam,temperature)")
        if not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be > 0 (1: the mean model's own distribution), "
                             f"got {self.sample_temperature}")
        if not self.samples or self.samples[0] < 1:
            raise ValueError(f"samples must be values of S >= 1, got {self.samples}")
        if not self.posterior_temperature > 0:
            raise ValueError(f"posterior_temperature must be > 0, got {self.posterior_temperature}")
        if self.widest_sites is not None and self.widest_sites < 1:
            raise ValueError(f"widest_sites must be >= 1 (or None: sample every site), got {self.widest_sites}")
        if not self.entropy_alpha > 0:
            raise ValueError(f"entropy_alpha must be > 0 (1: Gibbs, the default; 1/3: the Tsallis alpha of arXiv 2212.08703), "
                             f"got {self.entropy_alpha}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")


def lora_run_values(run_dir: str | Path, model: BLoRAWhisper) -> dict[str, torch.Tensor]:
    """The adapter of a finished ``pyro-blora train --method lora`` run as the model's site values."""
    from pyro_blora.interop.peft import peft_site_values

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    method = config["run"]["method"]
    if method != "lora" or not (run_dir / "adapter").is_dir():
        raise ValueError(f"{run_dir} is not a finished lora run (method {method!r}); train the baseline with "
                         "`pyro-blora train --method lora` on the same base and adapters, or let "
                         "scripts/evaluate_uncertainty.py --train-lora train it to match the blora run")
    window = run_encoder_window(config)
    if window_frames(window) != encoder_input_frames(model.whisper):
        raise ValueError(f"{run_dir} was trained with a {window:g} s encoder window and the posterior with "
                         f"{encoder_window_seconds(model.whisper):g} s; compare runs trained with the same window")
    return peft_site_values(run_dir / "adapter", model)


@torch.no_grad()
def dev_logits(model: BLoRAWhisper, values: Mapping[str, torch.Tensor], data: TrainingData,
               batch_size: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced logits and labels of the transcript tokens (prompt tokens left out) of ``data``,
    with the adapters held at ``values``: the input of :func:`~pyro_blora.predict.confidence.fit_temperature`."""
    whisper = model.whisper
    cfg = whisper.config
    device = next(whisper.parameters()).device
    for start in range(0, len(data), batch_size):
        batch = data.collate([data.dataset[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch["labels"].to(device)
        decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        with model.hold_adapters(values):
            logits = whisper(input_features=batch["input_features"].to(device), decoder_input_ids=decoder_input_ids).logits
        mask = (labels != -100) & (labels <= cfg.eos_token_id)
        yield logits[mask].float(), labels[mask]


def fit_model_temperatures(model: BLoRAWhisper, models: Mapping[str, Mapping[str, torch.Tensor]],
                           dev: Sequence[TrainingData]) -> dict[str, TemperatureFit]:
    """One temperature per deterministic model (adapter values by name), fitted on the dev sets only."""
    return {name: fit_temperature(pair for data in dev for pair in dev_logits(model, values, data))
            for name, values in models.items()}


def decode_payoff_records(model: BLoRAWhisper, guide: BLoRAGuide, processor, utterances: Sequence[Utterance],
                          options: PayoffOptions, lora: Mapping[str, torch.Tensor] | None = None,
                          temperatures: Mapping[str, float] | None = None) -> Iterator[dict[str, Any]]:
    """One record per utterance (see the module docstring), batch by batch, in input order."""
    temperatures = dict(temperatures or {})
    tokenizer = processor.tokenizer
    device, dtype = next(model.whisper.parameters()).device, next(model.whisper.parameters()).dtype
    sites = widest_sites(guide, options.widest_sites) if options.widest_sites else None
    n_frames = encoder_input_frames(model.whisper)  # the posterior's encoder window
    kwargs = {"max_new_tokens": options.max_new_tokens}
    pyro.set_rng_seed(options.seed)
    batch: list[Utterance] = []
    for index, utterance in enumerate(utterances):
        batch.append(utterance)
        last = index == len(utterances) - 1
        if not last and len(batch) < options.batch_size and utterances[index + 1].language == batch[0].language:
            continue
        language = batch[0].language
        features = log_mel_features(processor.feature_extractor, [load_audio(u.audio) for u in batch],
                                    n_frames).to(device, dtype)
        sampled = monte_carlo_transcribe(model, guide, features, tokenizer, num_samples=options.samples[-1],
                                         language=language, generate_kwargs=kwargs,
                                         posterior_temperature=options.posterior_temperature, sampled_sites=sites,
                                         entropy_alpha=options.entropy_alpha)
        means = guide.means()
        points = {"mean": point_transcribe(model, means, features, tokenizer, language, kwargs,
                                           temperatures.get("mean"), options.entropy_alpha)}
        if lora is not None:
            points["lora"] = point_transcribe(model, lora, features, tokenizer, language, kwargs, temperatures.get("lora"),
                                              options.entropy_alpha)
        beams = beam_transcribe(model, means, features, tokenizer, options.samples, language,
                                kwargs) if "beam" in options.baselines else {}
        drawn = temperature_transcribe(model, means, features, tokenizer, options.samples[-1],
                                       [utterance_seed(options.seed, u.id) for u in batch], options.sample_temperature,
                                       language, kwargs) if "temperature" in options.baselines else None
        for b, (utterance, result) in enumerate(zip(batch, sampled)):
            record = {"id": utterance.id, "language": language, "reference": utterance.reference,
                      "samples": result.hypotheses, "token_entropy": result.mean_token_entropy,
                      "mutual_information": result.mutual_information, "expected_entropy": result.expected_entropy,
                      "predictive_entropy": result.predictive_entropy,
                      "ensemble_word_entropy_confidence": word_entropy_confidences(
                          tokenizer, result.token_ids, result.token_confidences, language)}
            for name, rows in points.items():
                point = rows[b]
                record[name] = {"text": point.text, "log_prob": point.mean_log_prob,
                                "scaled_log_prob": point.scaled_mean_log_prob,
                                "word_entropy_confidence": word_entropy_confidences(
                                    tokenizer, point.token_ids, point.token_confidences, language)}
            if beams:
                record["beam"] = {str(size): texts[b] for size, texts in beams.items()}
            if drawn is not None:
                record["temperature_samples"] = drawn[b]
            yield record
        batch = []


def _transcripts(rows: Sequence[Mapping[str, Any]], key: str, size: int) -> list[UtteranceTranscript]:
    """The ``key`` model's hypotheses as transcripts, with the first ``size`` samples' agreement."""
    transcripts = []
    for r in rows:
        samples = r["samples"][:size] if key == "mean" else [r[key]["text"]]
        _, disagreement = minimum_bayes_risk(samples, r["language"])
        transcripts.append(UtteranceTranscript(
            id=r["id"], source=None, language=r["language"], text=r[key]["text"], chooser=key, num_samples=len(samples),
            samples=samples, uncertainty=disagreement, mean_token_entropy=r["token_entropy"],
            mean_log_prob=r[key]["log_prob"], words=word_confidences(r[key]["text"], samples, r["language"]),
            reference=r["reference"]))
    return transcripts


def _scaled(rows, key) -> dict[str, list[float]]:
    if all(r[key]["scaled_log_prob"] is not None for r in rows):
        return {f"{key}_neg_log_prob_scaled": [-r[key]["scaled_log_prob"] for r in rows]}
    return {}


def _mbr(rows: Sequence[Mapping[str, Any]], key: str, size: int) -> tuple[list[str], list[float]]:
    """Per row, the MBR choice among the first ``size`` hypotheses of ``key`` and their disagreement."""
    chosen, disagreement = [], []
    for r in rows:
        drawn = r[key][:size]
        best, spread = minimum_bayes_risk(drawn, r["language"])
        chosen.append(drawn[best])
        disagreement.append(spread)
    return chosen, disagreement


def _recorded_baselines(rows: Sequence[Mapping[str, Any]], options: PayoffOptions) -> tuple[bool, bool]:
    """Whether every record has the beam hypotheses of every S, and the temperature samples of the
    largest (records written without the baselines have neither)."""
    beam = all(str(size) in r.get("beam", {}) for r in rows for size in options.samples)
    sampled = all(len(r.get("temperature_samples", ())) >= options.samples[-1] for r in rows)
    return beam, sampled


def _report(report: UncertaintyReport, drop: Sequence[str] = ()) -> dict[str, Any]:
    for name in drop:
        report.scores.pop(name, None)
    return report.to_dict()


def summarise_payoff(rows: Sequence[Mapping[str, Any]], options: PayoffOptions,
                     temperatures: Mapping[str, TemperatureFit] | None = None,
                     bootstrap_samples: int = 2000) -> dict[str, Any]:
    """Error rates (MBR at each S against the posterior mean, paired intervals; the recorded baselines,
    beam@S and temperature_mbr@S, also against mbr@S in ``against_posterior_mbr``) and uncertainty reports
    (``UncertaintyReport.from_dict`` of one draws it again)."""
    if not rows:
        raise ValueError("no records to summarise; decode some test utterances first")
    references, languages = [r["reference"] for r in rows], [r["language"] for r in rows]
    have_lora = all("lora" in r for r in rows)
    have_beam, have_sampled = _recorded_baselines(rows, options)
    hypotheses = {"mean": [r["mean"]["text"] for r in rows]}
    sampled_disagreement = {}
    for size in options.samples:
        hypotheses[f"mbr@{size}"] = _mbr(rows, "samples", size)[0]
        if have_beam:
            hypotheses[f"beam@{size}"] = [r["beam"][str(size)] for r in rows]
        if have_sampled:
            hypotheses[f"temperature_mbr@{size}"], sampled_disagreement[size] = _mbr(rows, "temperature_samples", size)
    if have_lora:
        hypotheses["lora"] = [r["lora"]["text"] for r in rows]
    counts = {name: utterance_errors(texts, references, languages) for name, texts in hypotheses.items()}
    mean_errors, lengths = counts["mean"]
    summary: dict[str, Any] = {
        "utterances": len(rows), "options": asdict(options),
        "temperatures": {k: asdict(v) for k, v in (temperatures or {}).items()},
        "error_rate": {name: float(e.sum() / n.sum()) for name, (e, n) in counts.items()},
        "against_mean": {name: paired_bootstrap(mean_errors, lengths, e, n, samples=bootstrap_samples).to_dict()
                         for name, (e, n) in counts.items() if name != "mean"},
        # Each baseline minus MBR over as many posterior draws (> 0: the draws are better).
        "against_posterior_mbr": {
            f"{kind}@{size}": paired_bootstrap(*counts[f"mbr@{size}"], *counts[f"{kind}@{size}"],
                                               samples=bootstrap_samples).to_dict()
            for size in options.samples for kind in ("beam", "temperature_mbr") if f"{kind}@{size}" in counts},
        "uncertainty": {},
    }
    largest = options.samples[-1]
    extra = {"mean_neg_log_prob": [-r["mean"]["log_prob"] for r in rows], **_scaled(rows, "mean"),
             "mutual_information": [r["mutual_information"] for r in rows],
             "expected_entropy": [r["expected_entropy"] for r in rows],
             "predictive_entropy": [r["predictive_entropy"] for r in rows]}
    if have_lora:
        extra["lora_neg_log_prob_on_mean_errors"] = [-r["lora"]["log_prob"] for r in rows]
    words = {"entropy_mean_model": [r["mean"]["word_entropy_confidence"] for r in rows],
             "entropy_ensemble": [r["ensemble_word_entropy_confidence"] for r in rows]}
    if have_sampled:  # the share of the temperature samples agreeing with each word of the mean hypothesis
        words["temperature_sample_agreement"] = [
            [w.confidence for w in word_confidences(r["mean"]["text"], r["temperature_samples"][:largest], r["language"])]
            for r in rows]
    for size in options.samples:
        at_largest = size == largest  # entropies and mutual information are recorded for all S draws only
        sampled = {"temperature_disagreement": sampled_disagreement[size]} if have_sampled else {}
        report = evaluate_uncertainty(_transcripts(rows, "mean", size),
                                      extra_scores={**{k: v for k, v in extra.items() if at_largest or "entropy" not in k
                                                       and k != "mutual_information"}, **sampled},
                                      word_confidences=words if at_largest else None,
                                      bootstrap_samples=bootstrap_samples)
        summary["uncertainty"][f"S={size}"] = _report(report, () if at_largest else ("token_entropy",))
    if have_lora:
        report = evaluate_uncertainty(_transcripts(rows, "lora", 1), extra_scores=_scaled(rows, "lora"),
                                      word_confidences={"entropy_lora": [r["lora"]["word_entropy_confidence"] for r in rows]},
                                      bootstrap_samples=bootstrap_samples)
        summary["uncertainty"]["lora_own_errors"] = _report(report, ("disagreement", "token_entropy"))
    return summary


def write_records(records: Iterator[Mapping[str, Any]], path: Path, extra: Mapping[str, Any] | None = None) -> int:
    """Append records as JSON lines, each flushed (a killed run keeps what it decoded); returns how many."""
    count = 0
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({**(extra or {}), **record}, ensure_ascii=False) + "\n")
            handle.flush()
            count += 1
    return count


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records :func:`write_records` appended to ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split_exists(domain: Path, split: str) -> bool:
    return split in load_speech_dataset(domain)


def _dev_temperatures(model: BLoRAWhisper, models: Mapping[str, Mapping[str, torch.Tensor]], processor,
                      domains: Sequence[Path], dev_clips: int, out: Path) -> dict[str, TemperatureFit]:
    """The temperatures of the study in ``out`` (fitted once, on the first ``dev_clips`` dev utterances of
    every domain that has a dev split, and kept in ``temperatures.json``)."""
    path = out / TEMPERATURES_FILE
    if path.exists():
        return {name: TemperatureFit(**fit) for name, fit in json.loads(path.read_text()).items()}
    if not dev_clips:
        return {}
    dev = [load_training_data(domain, processor, split="dev", cache_dir=out / "cache", limit=dev_clips)
           for domain in domains if _split_exists(domain, "dev")]
    n_frames = encoder_input_frames(model.whisper)
    dev = [replace(data, collate=replace(data.collate, n_frames=n_frames)) for data in dev]
    if not dev:
        raise ValueError("no domain of the testbed has a dev split to fit the temperatures on; pass dev_clips=0 "
                         "(--dev-clips 0) for no temperature scaling")
    fits = fit_model_temperatures(model, models, dev)
    atomic_write_json(path, {name: asdict(fit) for name, fit in fits.items()})
    return fits


def _refuse_records_without_baselines(rows: Sequence[Mapping[str, Any]], options: PayoffOptions, path: Path) -> None:
    """A study resumed with baselines its records lack would summarise without them, silently."""
    recorded = dict(zip(BASELINES, _recorded_baselines(rows, options))) if rows else {}
    missing = [name for name in options.baselines if rows and not recorded[name]]
    if missing:
        raise ValueError(f"{path} holds {len(rows)} records decoded without the {missing} baseline(s) at S = "
                         f"{list(options.samples)}; decode the study with them into a new output folder (--out)")


def run_payoff_study(testbed: str | Path, posterior: str | Path, out: str | Path, options: PayoffOptions = PayoffOptions(),
                     *, lora: str | Path | None = None, model: str | None = None, domains: Sequence[str] | None = None,
                     clips_per_domain: int = 50, dev_clips: int = 50, bootstrap_samples: int = 2000) -> dict[str, Any]:
    """The study of a posterior (a finished blora run or a posterior folder) against the LoRA
    run ``lora`` (None: no baseline) on the first ``clips_per_domain`` test utterances of every testbed
    domain (or of ``domains``), temperatures fitted on ``dev_clips`` dev utterances per domain (0: none).

    Writes ``temperatures.json``, ``utterances.jsonl`` (appended utterance by utterance: a killed study
    continues where it stopped) and ``summary.json`` into ``out``, and returns the summary. ``model``
    replaces the base model the posterior records."""
    testbed, out = Path(testbed), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    posterior = Path(posterior)
    inside_run = posterior / WEIGHT_FOLDERS["blora"]
    # The test utterances are short: a posterior trained with a cut encoder is scored with its own window.
    blora, guide, processor = load_for_transcription(inside_run if inside_run.is_dir() else posterior, model,
                                                     keep_window=True)
    lora_values = lora_run_values(lora, blora) if lora is not None else None
    names = list(domains) if domains else testbed_domains(testbed)
    records = out / RECORDS_FILE
    decoded = read_records(records)
    _refuse_records_without_baselines(decoded, options, records)
    baselines = {"mean": guide.means(), **({"lora": lora_values} if lora_values is not None else {})}
    fits = _dev_temperatures(blora, baselines, processor, [testbed / name for name in names], dev_clips, out)
    done = {(row["domain"], row["id"]) for row in decoded}
    for name in names:
        utterances = [u for u in collect_utterances(testbed / name, split="test", limit=clips_per_domain)
                      if (name, u.id) not in done]
        write_records(decode_payoff_records(blora, guide, processor, utterances, options, lora_values,
                                            {k: fit.temperature for k, fit in fits.items()}), records, {"domain": name})
    summary = summarise_payoff(read_records(records), options, fits, bootstrap_samples=bootstrap_samples)
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
