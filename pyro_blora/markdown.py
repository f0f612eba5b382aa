"""The one Markdown table formatter, on the bottom floor so that every page can use it: reports, the
testbed's data card and the Hub's model card alike."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["cell", "markdown_table"]


def cell(value: Any) -> str:
    """``-`` for a missing value (None, NaN), four significant digits for a float, else ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                   aligned: bool = False) -> str:
    """A GitHub Markdown table of ``rows`` (columns: given, or every key in first-seen order).
    ``aligned`` pads every column to its widest cell, so that the table also reads in a terminal."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(text) for text in [c, *(r[i] for r in body)]) if aligned else 0 for i, c in enumerate(columns)]
    rule = "|" + "|".join("-" * max(3, w + 2) for w in widths) + "|" if aligned else "|" + "---|" * len(columns)
    lines = ["| " + " | ".join(text.ljust(w) for text, w in zip(cells, widths)) + " |" for cells in [columns, *body]]
    return "\n".join([lines[0], rule, *lines[1:]])
