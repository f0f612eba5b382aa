r"""Measure long-form transcription on a long recording joined from testbed utterances.

    python scripts/long_recording.py build --testbed testbed --domain zh-en --minutes 5 --out long/
    pyro-blora transcribe long/recording.wav --posterior runs/x/posterior --samples 4 --language zh \
        --jsonl long/recording.jsonl --srt long/recording.srt --vtt long/recording.vtt --plot long/plots
    python scripts/long_recording.py score --out long/ --posterior runs/x/posterior --language zh
    python scripts/long_recording.py timing --out long/

`build` joins the test split's utterances, in order, with pauses of 0.3-0.8 s until the recording
is at least --minutes long, and writes recording.wav and reference.json (every utterance's start,
end and transcript). `score` reads the transcript that `pyro-blora transcribe` wrote, and measures
against the reference: the error rate of long-form decoding, the error rate of decoding the known
utterances one by one with the posterior mean (short-form, the way the model was trained), the
real-time factor of long-form decoding with the posterior mean alone (the transcribe run's own time,
passed as --transcribe-seconds, gives the factor for mean + S draws), and how well low word confidence
flags the words that are wrong (AUROC). Times are wall clock and this process's CPU time (with one
torch thread, the CPU time is what the decoding costs on one core when other jobs share the machine).
It writes scores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import soundfile


def build(testbed: Path, domain: str, minutes: float, out: Path, seed: int) -> None:
    from pyro_blora.data import load_audio, load_speech_dataset
    from pyro_blora.features import SAMPLING_RATE

    rows = load_speech_dataset(testbed / domain, split="test")
    rng = np.random.default_rng(seed)
    pieces, reference, position = [], [], 0.0
    for row in rows:
        if position >= minutes * 60:
            break
        audio = load_audio(row["audio"])
        reference.append({"id": row["id"], "start": round(position, 3), "end": round(position + audio.size / SAMPLING_RATE, 3),
                          "text": row["text"], "language": row["language"]})
        pause = np.zeros(int(rng.uniform(0.3, 0.8) * SAMPLING_RATE), dtype=np.float32)
        pieces += [audio, pause]
        position += (audio.size + pause.size) / SAMPLING_RATE
    if position < minutes * 60:
        raise SystemExit(f"the {domain} test split holds only {position:.0f} s; ask for fewer --minutes")
    out.mkdir(parents=True, exist_ok=True)
    soundfile.write(out / "recording.wav", np.concatenate(pieces), SAMPLING_RATE, subtype="PCM_16")
    (out / "reference.json").write_text(json.dumps({"duration": position, "utterances": reference}, ensure_ascii=False, indent=1))
    print(f"wrote {out / 'recording.wav'}: {position:.1f} s, {len(reference)} utterances")


def score(out: Path, posterior: Path, language: str, transcribe_seconds: float | None) -> None:
    import torch

    from pyro_blora.data import load_audio
    from pyro_blora.features import log_mel_features, long_form_features
    from pyro_blora.predict.monte_carlo import with_language, point_transcribe
    from pyro_blora.predict.longform import long_form_decode
    from pyro_blora.metrics import error_rate
    from pyro_blora.predict.transcripts import read_jsonl
    from pyro_blora.runs import load_for_transcription
    from pyro_blora.evaluation.uncertainty import auroc, word_correctness

    reference = json.loads((out / "reference.json").read_text())
    utterances = reference["utterances"]
    reference_text = " ".join(u["text"] for u in utterances)
    [transcript] = read_jsonl(out / "recording.jsonl")
    model, guide, processor = load_for_transcription(posterior)
    audio = load_audio(out / "recording.wav")
    duration = audio.size / 16_000

    # Long-form with the posterior mean alone, timed.
    features, mask = long_form_features(processor.feature_extractor, [audio])
    kwargs = with_language(model, None, language)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad(), model.hold_adapters(guide.means()):
        [mean] = long_form_decode(model.whisper, processor.tokenizer, features, mask, kwargs)
    mean_seconds, mean_cpu = time.perf_counter() - start, time.process_time() - cpu

    # The known utterances one by one (short-form, batches of 8), with the posterior mean.
    start, cpu = time.perf_counter(), time.process_time()
    pieces = []
    for i in range(0, len(utterances), 8):
        chunk = utterances[i:i + 8]
        clips = [audio[int(u["start"] * 16_000):int(u["end"] * 16_000)] for u in chunk]
        feats = log_mel_features(processor.feature_extractor, clips)
        pieces += [t.text for t in point_transcribe(model, guide.means(), feats, processor.tokenizer, language=language)]
    segment_seconds, segment_cpu = time.perf_counter() - start, time.process_time() - cpu
    segmented_text = " ".join(pieces)

    correct = word_correctness(transcript.text, reference_text, language)
    low = [1.0 - w.confidence for w in transcript.words]
    threshold = 0.5
    flagged = [w.confidence < threshold for w in transcript.words]
    errors = [not c for c in correct]
    results = {
        "duration_s": round(duration, 1),
        "utterances": len(utterances),
        "long_form_segments": len(transcript.segments or []),
        "unit": "mixed error rate (CJK characters + other words)" if language in ("zh", "ja", "ko", "yue") else "WER",
        "error_rate_long_form_chosen": error_rate(reference_text, transcript.text, language),
        "error_rate_long_form_mean_rerun": error_rate(reference_text, mean.text, language),
        "error_rate_segment_by_segment_mean": error_rate(reference_text, segmented_text, language),
        "error_rate_per_sample": [error_rate(reference_text, s, language) for s in transcript.samples],
        "rtf_long_form_mean_wall": round(mean_seconds / duration, 4),
        "rtf_long_form_mean_cpu": round(mean_cpu / duration, 4),
        "rtf_segment_by_segment_mean_wall": round(segment_seconds / duration, 4),
        "rtf_segment_by_segment_mean_cpu": round(segment_cpu / duration, 4),
        "rtf_transcribe_mean_plus_samples": (round(transcribe_seconds / duration, 4) if transcribe_seconds else None),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "num_samples": transcript.num_samples,
        "words": len(correct),
        "word_error_fraction": float(np.mean(errors)) if errors else None,
        "auroc_low_confidence_flags_errors": auroc(low, errors),
        f"low_confidence_words_below_{threshold}": int(sum(flagged)),
        f"precision_of_flags_below_{threshold}": (float(np.mean([e for e, f in zip(errors, flagged) if f])) if any(flagged) else None),
        f"recall_of_flags_below_{threshold}": (float(np.mean([f for e, f in zip(errors, flagged) if e])) if any(errors) else None),
        "uncertainty": transcript.uncertainty,
    }
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    (out / "segment_by_segment.txt").write_text(segmented_text + "\n")
    print(json.dumps(results, indent=1))


def timing(out: Path) -> None:
    """How far the long-form segments' starts lie from the nearest reference utterance start (seconds)."""
    from pyro_blora.predict.transcripts import read_jsonl

    starts = np.array([u["start"] for u in json.loads((out / "reference.json").read_text())["utterances"]])
    [transcript] = read_jsonl(out / "recording.jsonl")
    offsets = np.array([np.min(np.abs(starts - s.start)) for s in transcript.segments or []])
    print(json.dumps({"segments": int(offsets.size), "median_start_offset_s": round(float(np.median(offsets)), 3),
                      "p90_start_offset_s": round(float(np.percentile(offsets, 90)), 3),
                      "within_0.5_s": round(float(np.mean(offsets <= 0.5)), 3)}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--testbed", type=Path, required=True)
    b.add_argument("--domain", default="zh-en")
    b.add_argument("--minutes", type=float, default=5.0)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--posterior", type=Path, required=True)
    s.add_argument("--language", default="zh")
    s.add_argument("--transcribe-seconds", type=float, default=None, help="time of the transcribe run (wall or CPU)")
    t = sub.add_parser("timing")
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.testbed, args.domain, args.minutes, args.out, args.seed)
    elif args.command == "timing":
        timing(args.out)
    else:
        score(args.out, args.posterior, args.language, args.transcribe_seconds)


if __name__ == "__main__":
    main()
