"""The retention set of a forgetting budget: the utterances of the domain to keep, collated once.

Utterances without a transcript are labelled by the base model's own greedy transcripts (language
forced), decoded once and cached in the run folder (``retention-labels.json``), so a retention set
needs only audio. The budget that measures it: :mod:`pyro_blora.training.budget`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["BASE_MODEL_LABELS", "LABELS_FILE", "TRANSCRIPT_LABELS", "RetentionSet", "load_retention_set"]

# What the run's config says when retention labels are the base model's own greedy transcripts.
BASE_MODEL_LABELS = "base model's greedy transcripts"
TRANSCRIPT_LABELS = "transcripts"
LABELS_FILE = "retention-labels.json"


@dataclass
class RetentionSet:
    """The fixed retention batch, and where its labels come from."""

    # Collated batches (``input_features``, ``labels`` padded with -100), measured together.
    batches: list[dict[str, Any]]
    # "transcripts", or the base model's greedy transcripts (BASE_MODEL_LABELS).
    labels: str = TRANSCRIPT_LABELS
    # Where the utterances come from (a folder, a manifest), for the run's config.
    source: str | None = None
    split: str | None = None
    ids: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, dataset, collate: Callable[[list], dict], utterances: int, batch_size: int = 16,
                     **info: Any) -> "RetentionSet":
        """The first ``utterances`` items of ``dataset``, collated in batches of ``batch_size`` (so
        hundreds of utterances are measured without one huge batch)."""
        if len(dataset) == 0:
            raise ValueError("the retention set is empty; give utterances of the domain the model should keep")
        items = [dataset[i] for i in range(min(utterances, len(dataset)))]
        batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
        ids = [str(i) for batch in batches for i in (batch.get("ids") or [])] or [str(i) for i in range(len(items))]
        return cls(batches, ids=ids, **info)

    def __len__(self) -> int:
        return sum(int(b["labels"].shape[0]) for b in self.batches)

    def to(self, device: torch.device) -> "RetentionSet":
        moved = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in self.batches]
        return replace(self, batches=moved)

    def describe(self) -> dict[str, Any]:
        """What the run's config records: source, split, utterances and the origin of the labels."""
        return {"source": self.source, "split": self.split, "utterances": len(self), "labels": self.labels}


def load_retention_set(source: str | Path, processor, base_whisper, utterances: int, split: str = "dev",
                       cache_dir: str | Path | None = None, labels_file: str | Path | None = None,
                       n_frames: int | None = None, model_name: str | None = None) -> RetentionSet:
    """The first ``utterances`` utterances of ``split`` of ``source`` (falling back to ``test``, or to
    the source's only split, e.g. a folder of recordings), prepared for ``processor``. Utterances without a transcript get the greedy
    transcript of ``base_whisper`` (the base model, before any adapter), with its language forced;
    those are decoded once and kept in ``labels_file`` (a run folder's ``retention-labels.json``),
    which later calls with the same utterances and ``model_name`` read instead."""
    import datasets

    from pyro_blora.data import PreparedSpeechDataset, SpeechCollator, decoder_start_token_id, load_speech_dataset
    from pyro_blora.data import prepare_dataset

    loaded = load_speech_dataset(source)
    if isinstance(loaded, datasets.DatasetDict):
        only = next(iter(loaded)) if len(loaded) == 1 else None
        chosen = split if split in loaded else "test" if "test" in loaded else only
        if chosen is None:
            raise KeyError(f"the retention set {source} has no split {split!r}" + ("" if split == "test" else
                           " (nor 'test')") + f"; choose one of {', '.join(loaded)} (--retain-split)")
        rows, split = loaded[chosen], chosen
    else:
        rows = loaded
    rows = rows.select(range(min(utterances, len(rows))))
    missing = [row_id for row_id, text in zip(rows["id"], rows["text"]) if not text.strip()]
    labels = TRANSCRIPT_LABELS
    if missing:
        texts = _base_model_transcripts(rows, missing, processor, base_whisper, cache_dir, labels_file,
                                        key={"source": str(source), "split": split, "model": model_name})
        rows = rows.map(lambda row: {"text": texts.get(row["id"], row["text"])})
        labels = BASE_MODEL_LABELS if len(missing) == len(rows) else \
            f"{BASE_MODEL_LABELS} for {len(missing)} of {len(rows)} utterances, transcripts for the others"
    prepared, _ = prepare_dataset(rows, processor, cache_dir=cache_dir)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    if n_frames is not None:
        collate = replace(collate, n_frames=n_frames)
    return RetentionSet.from_dataset(PreparedSpeechDataset(prepared), collate, utterances, labels=labels,
                                     source=str(source), split=split)


def _base_model_transcripts(rows, missing: list[str], processor, whisper, cache_dir, labels_file,
                            key: Mapping[str, Any]) -> dict[str, str]:
    """Greedy transcripts of the base model for the rows named in ``missing``, read from
    ``labels_file`` when it holds them for the same source, split, model and ids."""
    from pyro_blora.data import prepare_dataset
    from pyro_blora.evaluation.scoring import EvalSet, greedy_transcripts

    path = Path(labels_file) if labels_file is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in key} == dict(key) and set(missing) <= set(saved["texts"]):
            return {row_id: saved["texts"][row_id] for row_id in missing}
    if whisper is None:
        raise ValueError("the retention set has utterances without transcripts and no base model was given to "
                         "label them; give transcripts or the base model")
    unlabelled = rows.filter(lambda row: row["id"] in set(missing))
    # A placeholder transcript lets the rows through preparation; only their features are used.
    prepared, _ = prepare_dataset(unlabelled.map(lambda row: {"text": "."}), processor, cache_dir=cache_dir)
    hypotheses = greedy_transcripts(whisper, processor, EvalSet("retention", prepared))
    texts = dict(zip(prepared["id"], hypotheses))
    if path is not None:
        from pyro_blora.checkpoint import atomic_write_json

        atomic_write_json(path, {**key, "labels": BASE_MODEL_LABELS, "texts": texts})
    return texts
