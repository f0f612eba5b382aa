"""What a sequence measured, and the pages that compare its strategies.

One :class:`SequenceResult` per strategy and order holds the accuracy matrices (rows: the start model, then
each step; columns: the evaluated domains); ``matrix.md`` and ``heatmap.png`` show one strategy,
``comparison.md`` every strategy of one order, with paired bootstrap intervals from the per-utterance records
of their evaluations. Running the sequences is :mod:`pyro_blora.experiments.sequence`'s job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pyro_blora.checkpoint import atomic_write_json, atomic_write_text
from pyro_blora.metrics.bootstrap import bootstrap_sequences, has_records
from pyro_blora.metrics.continual import sequence_metrics
from pyro_blora.report.plots import plot_matrix, save_figure
from pyro_blora.report.tables import markdown_table, metric_cell

if TYPE_CHECKING:
    from pyro_blora.experiments.sequence import SequenceConfig

__all__ = [
    "INTERVALS_FILE",
    "SequenceResult",
    "comparison_intervals",
    "comparison_page",
    "matrix_page",
    "write_comparison",
    "write_matrix",
]

# Beside each comparison.md: the intervals its second table shows.
INTERVALS_FILE = "comparison-intervals.json"


@dataclass
class SequenceResult:
    """The accuracy matrices of one strategy on one order: rows are steps (row 0: start model),
    columns the evaluated domains; one matrix per metric (``error_rate``, ``ce``)."""

    strategy: str
    domains: tuple[str, ...]
    rows: list[str]
    columns: list[str]
    learned_at: list[int]
    matrices: dict[str, list[list[float]]]
    runs: list[str] = field(default_factory=list)
    # The eval file of every row (row 0: the start model), whose per-utterance records give intervals.
    evaluations: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        """The headline metric: the error rate when decoded, else teacher-forced CE."""
        return "error_rate" if "error_rate" in self.matrices else "ce"

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {name: sequence_metrics(m, self.columns, self.learned_at) for name, m in self.matrices.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metric": self.metric, "metrics": self.metrics()}

    @classmethod
    def load(cls, path: str | Path) -> "SequenceResult":
        """A result from its ``matrix.json`` (e.g. to compare strategies run by separate processes)."""
        data = json.loads(Path(path).read_text())
        return cls(data["strategy"], tuple(data["domains"]), data["rows"], data["columns"], data["learned_at"],
                   data["matrices"], data.get("runs", []), data.get("evaluations", []))

    @classmethod
    def from_evaluations(cls, config: SequenceConfig, evaluations: Sequence[Mapping[str, Any]],
                         rows: Sequence[str], runs: Sequence[str], files: Sequence[str] = ()) -> "SequenceResult":
        columns = list(config.columns)
        matrices = {
            metric: [[float(e["results"][d][metric]) for d in columns] for e in evaluations]
            for metric in ("error_rate", "ce")
            if all(metric in e["results"][d] for e in evaluations for d in columns)
        }
        return cls(config.name, config.domains, list(rows), columns, list(config.learned_at), matrices, list(runs),
                   list(files))

    def read_evaluations(self) -> list[dict[str, Any]] | None:
        """The eval results of every row, or None when a file is missing (e.g. a result read back
        from a folder that holds only the matrices)."""
        paths = [Path(p) for p in self.evaluations]
        if not paths or len(paths) != len(self.rows) or not all(p.is_file() for p in paths):
            return None
        return [json.loads(p.read_text()) for p in paths]


def _title(result: SequenceResult) -> str:
    return f"{result.strategy}: {' → '.join(result.domains)}"


def matrix_page(result: SequenceResult) -> str:
    """``matrix.md``: each matrix of one strategy (rows: after each step) with its average final error,
    BWT and forgetting per domain; the headline metric first, also when read back from ``matrix.json``
    (whose keys are sorted)."""
    lines = [f"# {_title(result)}", ""]
    for metric, matrix in sorted(result.matrices.items(), key=lambda item: item[0] != result.metric):
        rows = [{"after": row, **{c: metric_cell(v, metric) for c, v in zip(result.columns, values)}}
                for row, values in zip(result.rows, matrix)]
        summary = sequence_metrics(matrix, result.columns, result.learned_at)
        lines += [f"## {metric}", "", markdown_table(rows), "",
                  f"Average final: {metric_cell(summary['average_final'], metric)}; BWT: "
                  f"{metric_cell(summary['bwt'], metric)} (positive = forgetting); forgetting per domain: "
                  + ", ".join(f"{d} {metric_cell(v, metric)}" for d, v in summary["forgetting"].items()), ""]
    return "\n".join(lines)


def _comparison_rows(results: Sequence[SequenceResult]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metric = result.metric
        summary = sequence_metrics(result.matrices[metric], result.columns, result.learned_at)
        rows.append({"strategy": result.strategy, "metric": metric,
                     "average final": metric_cell(summary["average_final"], metric),
                     "BWT": metric_cell(summary["bwt"], metric),
                     **{f"forgetting {d}": metric_cell(v, metric) for d, v in summary["forgetting"].items()}})
    return rows


def comparison_page(results: Sequence[SequenceResult], intervals: Mapping[str, Any] | None = None) -> str:
    """A Markdown page comparing strategies on one order: one summary row per strategy, in the given
    order; with ``intervals`` (:func:`comparison_intervals`) a second table gives their 95% intervals
    and each strategy's paired difference to every one before it."""
    orders = {" → ".join(r.domains) for r in results}
    lines = [
        f"# Sequential adaptation: {', '.join(sorted(orders))}", "",
        "Average final: mean error over every domain after the last step. BWT: mean over domains learned "
        "before the last step of (final error - error right after learning it); positive = forgetting. "
        "Forgetting: final error - best error since the domain was learned. Original domains count as "
        "learned at step 0 (the start model).", "",
        markdown_table(_comparison_rows(results)), "",
    ]
    if intervals:
        metric = intervals["metric"]
        cell = lambda i: f"{metric_cell(i['estimate'], metric)} [{metric_cell(i['low'], metric)}, {metric_cell(i['high'], metric)}]"  # noqa: E731
        lines += [f"95% bootstrap intervals ({intervals['samples']} resamples of the test utterances within each "
                  "domain, the same draws for every step and strategy, so the differences are paired):", "",
                  markdown_table([{"": name, "average final": cell(values["average_final"]), "BWT": cell(values["bwt"])}
                                  for name, values in intervals["sequences"].items()]), ""]
    return "\n".join(lines)


def comparison_intervals(results: Sequence[SequenceResult], samples: int = 2000) -> dict[str, Any] | None:
    """Intervals of every strategy's average final error and BWT and of its paired difference to every
    strategy before it, from the per-utterance records of their evaluations; None when a result lacks them."""
    evaluations = {r.strategy: r.read_evaluations() for r in results}
    first = results[0]
    if any(e is None for e in evaluations.values()) or any(
            (r.columns, r.learned_at, r.metric) != (first.columns, first.learned_at, first.metric) for r in results):
        return None
    if not all(has_records(evaluation, domain, first.metric)
               for rows in evaluations.values() for evaluation in rows for domain in first.columns):
        return None  # evaluations written before per-utterance records were kept
    found = bootstrap_sequences(evaluations, first.columns, first.learned_at, first.metric,
                                all_pairs=True, samples=samples)
    return {"metric": first.metric, "samples": samples,
            "sequences": {name: {k: v.to_dict() for k, v in values.items()} for name, values in found.items()}}


def write_comparison(results: Sequence[SequenceResult], path: str | Path) -> Path:
    """:func:`comparison_page` written to ``path``, with the intervals (also kept as JSON beside the page,
    ``comparison-intervals.json``) when every strategy's evaluations have per-utterance records."""
    path = Path(path)
    intervals = comparison_intervals(results)
    if intervals is not None:
        atomic_write_json(path.with_name(INTERVALS_FILE), intervals)
    atomic_write_text(path, comparison_page(results, intervals))
    return path


def write_matrix(result: SequenceResult, folder: str | Path) -> Path:
    """One strategy's ``matrix.json``, ``matrix.md`` and ``heatmap.png`` (of the headline metric) in ``folder``."""
    folder = Path(folder)
    atomic_write_json(folder / "matrix.json", result.to_dict())
    atomic_write_text(folder / "matrix.md", matrix_page(result))
    save_figure(plot_matrix(result.matrices[result.metric], result.rows, result.columns, result.metric, _title(result)),
                folder / "heatmap.png")
    return folder / "matrix.md"
