"""The committed results tables regenerate byte for byte from their committed inputs
(``scripts/regenerate_results.py``), and a changed byte is caught."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
_spec = importlib.util.spec_from_file_location("regenerate_results", ROOT / "scripts" / "regenerate_results.py")
regenerate_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regenerate_results)


def test_committed_tables_regenerate_byte_identical(tmp_path):
    names = regenerate_results.regenerate(RESULTS, tmp_path)
    assert {"faithful/inspect-seed0/inspect.md", "faithful/inspect-seed1-qk/inspect.md",
            "sequential/zh-en_es-en_ar-en/comparison.md", "sequential/ar-en_es-en_zh-en/lora-replay/matrix.md",
            "sequential-converged/s0/zh-en_es-en/comparison.md",
            "sequential-converged/s0/es-en_zh-en/laplace-prior/matrix.md"} <= set(names)
    assert len(names) == len(regenerate_results.tables(RESULTS)) >= 13
    assert regenerate_results.differences(RESULTS, tmp_path, names) == {}


def test_a_changed_byte_is_reported_and_rewritten(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    page = results / "sequential" / "zh-en_es-en_ar-en" / "lora" / "matrix.md"
    committed = page.read_bytes()
    page.write_bytes(committed.replace(b"| start | 4.9% |", b"| start | 4.8% |", 1))
    assert page.read_bytes() != committed
    assert regenerate_results.main(["--results", str(results)]) == 1
    out = capsys.readouterr().out
    assert "committed/sequential/zh-en_es-en_ar-en/lora/matrix.md" in out and "-| start | 4.8% |" in out
    assert f"{len(regenerate_results.tables(results))} tables regenerated, 1 differ" in out
    assert regenerate_results.main(["--results", str(results), "--write"]) == 0
    assert page.read_bytes() == committed
    assert regenerate_results.main(["--results", str(results)]) == 0
