"""Regenerate the committed results tables from their committed inputs and compare them byte for byte.

    python scripts/regenerate_results.py           # exit 1, with a diff, where a committed table differs
    python scripts/regenerate_results.py --write   # overwrite the committed tables with the regenerated ones

Each table is written again, into a temporary folder, by the package function that wrote it when its
experiment ran, from the files committed next to it: the sequence matrices and comparisons from their
``matrix.json``, an inspection page from its ``inspect.json``. So a change to a formatter that would change
a committed table is seen, and the table is regenerated in the same commit. Tables written by an earlier
version of the code, or whose inputs are not committed (the paper table, the sweep summaries, the run
reports of ``results/paper_table``, and the main job's report, which also needs its Monte Carlo transcripts,
posteriors and exported models), are not regenerable and not listed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from pyro_blora.checkpoint import atomic_write_bytes, atomic_write_text
from pyro_blora.experiments.sequence_results import (INTERVALS_FILE, SequenceResult, comparison_intervals, comparison_page,
                                                     matrix_page)
from pyro_blora.report.pages import inspection_page

RESULTS = Path(__file__).resolve().parent.parent / "results"
# The strategies of the committed sequence comparisons, in their row order (the order they were run in);
# each comparison lists those of them it has.
COMPARED = ("lora", "lora-replay", "blora-fresh", "blora-prior", "map-anchor", "blora-prior-floor0.01", "laplace-prior")
# Each committed inspection and the runs it names, as they were given to `pyro-blora inspect`.
INSPECTED = {
    "faithful/inspect-seed0": ("faithful/paper/runs/blora-r32-beta0.5-sp0.01-matrix", "faithful/paper/runs/lora-r32"),
    "faithful/inspect-seed1-qk": ("paper/runs/blora-r32-beta0.5-sp0.01-matrix-s1", "paper/runs/map-r32-beta0.5-sp0.01-matrix-s1",
                                  "paper-qk/runs/blora-r32-beta0.5-sp0.01-matrix", "paper-qk/runs/lora-r32"),
}
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _comparison(results: Path, order: Path) -> str:
    """An order's comparison.md: its intervals bootstrapped again from the committed evaluations (their
    paths are relative to ``results``) where they are all there, else read from the committed JSON."""
    compared = [SequenceResult.load(order / s / "matrix.json") for s in COMPARED if (order / s / "matrix.json").is_file()]
    anchored = [replace(r, evaluations=[str(results / p) for p in r.evaluations]) for r in compared]
    return comparison_page(compared, comparison_intervals(anchored) or _read_json(order / INTERVALS_FILE))


def tables(results: Path) -> dict[str, Callable[[], str]]:
    """Every regenerable table, by its path under ``results``, with the function that writes it again."""
    found: dict[str, Callable[[], str]] = {}
    matrices = sorted(results.glob("sequential/*/*/matrix.json")) + sorted(results.glob("sequential-paper/*/*/*/matrix.json")) \
        + sorted(results.glob("sequential-converged/*/*/*/matrix.json"))
    for matrix in matrices:
        found[(matrix.parent / "matrix.md").relative_to(results).as_posix()] = \
            lambda matrix=matrix: matrix_page(SequenceResult.load(matrix))
    for order in sorted({matrix.parent.parent for matrix in matrices}):
        found[(order / "comparison.md").relative_to(results).as_posix()] = lambda order=order: _comparison(results, order)
    for folder, runs in INSPECTED.items():
        found[f"{folder}/inspect.md"] = \
            lambda folder=results / folder, runs=runs: inspection_page(runs, json.loads((folder / "inspect.json").read_text()))
    return found


def regenerate(results: Path, out: Path) -> list[str]:
    """Write every regenerable table of ``results`` again under ``out`` (same relative paths)."""
    written = tables(results)
    for name, page in written.items():
        atomic_write_text(out / name, page())
    return list(written)


def differences(results: Path, out: Path, names: Sequence[str]) -> dict[str, str]:
    """A unified diff for each regenerated table whose bytes differ from the committed one."""
    found = {}
    for name in names:
        committed, regenerated = results / name, out / name
        if not committed.is_file() or committed.read_bytes() != regenerated.read_bytes():
            before = committed.read_text().splitlines(keepends=True) if committed.is_file() else []
            diff = "".join(difflib.unified_diff(before, regenerated.read_text().splitlines(keepends=True),
                                                f"committed/{name}", f"regenerated/{name}"))
            found[name] = diff or f"{name}: the bytes differ, not the lines (line endings or encoding)\n"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder [the repository's]")
    parser.add_argument("--write", action="store_true", help="overwrite the committed tables that differ")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="regenerated-") as tmp:
        names = regenerate(args.results, Path(tmp))
        found = differences(args.results, Path(tmp), names)
        for name, diff in found.items():
            if args.write:
                atomic_write_bytes(args.results / name, (Path(tmp) / name).read_bytes())
                print(f"rewrote {name}")
            else:
                sys.stdout.write(diff)
    print(f"{len(names)} tables regenerated, {len(found)} {'rewritten' if args.write else 'differ'}")
    return 1 if found and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
