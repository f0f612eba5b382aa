"""Report tables: the formats of their cells, evaluation tables, and the CSV/JSON twin of a results table.

Every table goes through the one formatter, :func:`pyro_blora.markdown.markdown_table` (re-exported
here), so that a committed table regenerates byte for byte from its run folders
(``scripts/regenerate_results.py``)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from pyro_blora.checkpoint import atomic_write_text
from pyro_blora.markdown import cell, markdown_table
from pyro_blora.evaluation.scoring import ce_scope, relative_changes
from pyro_blora.metrics import Interval
from pyro_blora.metrics.bootstrap import DEFAULT_SAMPLES

__all__ = [
    "BASE_INTERVALS",
    "INTERVAL_NOTE",
    "LORA_INTERVALS",
    "cell",
    "change_cell",
    "evaluation_table",
    "formatted_cell",
    "interval_cell",
    "markdown_table",
    "mean_std_cell",
    "metric_cell",
    "write_rows",
]

# Paired differences with intervals: (interval name, column header, cell style).
BASE_INTERVALS = (
    ("in_domain_error_vs_base", "in-domain Δ vs base (95% CI)", "error"),
    ("backward_error_vs_base", "backward Δ vs base (95% CI)", "error"),
    ("backward_ce_vs_base", "backward CE Δ vs base (95% CI)", "ce"),
)
LORA_INTERVALS = (
    ("backward_gain", "backward gain (95% CI)", "relative"),
    ("degradation_reduction", "degradation reduction (95% CI)", "relative"),
    ("in_domain_drop", "in-domain drop (95% CI)", "relative"),
    ("backward_error_vs_lora", "backward Δ vs LoRA (95% CI)", "error"),
    ("in_domain_error_vs_lora", "in-domain Δ vs LoRA (95% CI)", "error"),
)
INTERVAL_NOTE = (f"Intervals: 95% paired bootstrap over test utterances ({DEFAULT_SAMPLES} resamples; seeds pooled by pairing seed s "
                 "with seed s and concatenating their utterances); \"-\" where an eval.json has no per-utterance "
                 "records. Degradation reduction = 1 - (M - base) / (LoRA - base) on the backward error.")

# How each interval is written: differences of error rates in percentage points, of CE in nats,
# relative numbers in percent.
_INTERVAL_STYLES = {"error": ("{:+.1f}", 100.0, " pt"), "ce": ("{:+.3f}", 1.0, ""), "relative": ("{:+.0f}", 100.0, "%")}
# Metrics in nats per token; every other metric of an evaluation is a rate, written in percent.
_CE_METRICS = ("ce", "ce_all_tokens", "prompt_ce")


# ----------------------------------------------------------------------------------- the formatter
def write_rows(rows: Sequence[Mapping[str, Any]], stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` of a results table, each written whole (atomically)."""
    stem = Path(stem)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, text.getvalue())
    atomic_write_text(json_path, json.dumps(list(rows), indent=1, default=str))
    return csv_path, json_path


# ----------------------------------------------------------------------------------- cells
def interval_cell(interval: Interval | None, style: str) -> str:
    """``+1.2 [-0.4, +2.9] pt``: estimate and interval, or "-" where there is none."""
    if interval is None:
        return "-"
    number, factor, unit = _INTERVAL_STYLES[style]
    low, high = (number.format(factor * v) for v in (interval.low, interval.high))
    return f"{number.format(factor * interval.estimate)}{unit} [{low}, {high}]"


def metric_cell(value: float | None, metric: str) -> str:
    """An evaluation metric: CE with three decimals, a rate in percent with one; "-" where missing."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if metric in _CE_METRICS else f"{100 * value:.1f}%"


def mean_std_cell(row: Mapping[str, Any], column: str, percent: bool = True) -> str:
    """``<column>_mean ± <column>_std`` of a row summarised over seeds; the mean alone for one seed."""
    if f"{column}_mean" not in row:
        return "-"
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    if len(str(row.get("seeds", "")).split(",")) == 1:  # one seed: no spread to show
        return f"{100 * mean:.1f}%" if percent else f"{mean:.3f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}%" if percent else f"{mean:.3f} ± {std:.3f}"


def change_cell(value: float | None, sign: float = 1.0, digits: int = 0) -> str:
    """A relative change in signed percent (``sign`` -1 turns a degradation into an improvement)."""
    return "-" if value is None else f"{100 * sign * value:+.{digits}f}%"


def formatted_cell(value: float | None, style: str) -> str:
    """``style.format(value)``, or "-" where there is no value."""
    return "-" if value is None else style.format(value)


# ----------------------------------------------------------------------------------- tables
def evaluation_table(results: Mapping[str, Mapping[str, Mapping]], baseline: str | None = None) -> str:
    """Evaluations side by side: one row per (model, domain), error rate / CE / language ID, and the
    change of each against the ``baseline`` model's row (relative, in percent); aligned, for a
    terminal and a page alike. Where the results mix CE scopes, each CE cell names its scope."""
    mixed = len({ce_scope(entry) for domains in results.values() for entry in domains.values()}) > 1
    rows = []
    for model, domains in results.items():
        changes = relative_changes(domains, results[baseline]) if baseline and model != baseline else {}
        for domain, entry in domains.items():
            delta = changes.get(domain, {})
            ce = metric_cell(entry.get("ce"), "ce")
            rows.append({
                "model": model, "domain": domain, "error rate": metric_cell(entry.get("error_rate"), "error_rate"),
                "CE": ce + (f" ({ce_scope(entry)})" if mixed and "ce" in entry else ""),
                "LID": metric_cell(entry.get("language_id"), "language_id"),
                "Δ error": f"{100 * delta['error_rate']:+.0f}%" if "error_rate" in delta else "",
                "Δ CE": f"{100 * delta['ce']:+.0f}%" if "ce" in delta else "",
            })
    return markdown_table(rows, aligned=True)
