"""scripts/budget_coverage.py: coverage counts, their intervals and the paired in-domain table, on
evaluations built with known numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyro_blora.metrics.retention_bound import coverage_interval

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "budget_coverage.py"
IDS = [f"u{i}" for i in range(40)]


def _domain(errors: np.ndarray, ce_per_token: float) -> dict:
    tokens = np.full(len(IDS), 10)
    return {"ce": ce_per_token, "error_rate": errors.sum() / tokens.sum(),
            "per_utterance": {"ids": IDS, "errors": errors.tolist(), "ref_tokens": tokens.tolist(),
                              "ce_sum": (tokens * ce_per_token).tolist(), "ce_tokens": tokens.tolist()}}


def _write(folder: Path, en_ce: float, zh_errors: int, held: dict, trained: bool) -> None:
    folder.mkdir(parents=True)
    evaluation = {"results": {"en": _domain(np.zeros(len(IDS), int), en_ce),
                              "zh-en": _domain(np.full(len(IDS), zh_errors), 0.5)}}
    if trained:
        (folder / "result.json").write_text(json.dumps({"budget": held}))
    else:
        evaluation["retention_budget"] = held
    (folder / "eval.json").write_text(json.dumps(evaluation))


def _held(budget: float, upper: float, overhead: float | None = None, scale: float | None = None,
          beta: float | None = None) -> dict:
    return {"budget": {"budget": budget}, "retain_change": upper - 0.01, "retain_change_upper": upper,
            "utterances": 64, "overhead": overhead, "kept": "final", "met": True, "scale": scale, "final_beta": beta}


def test_coverage_counts_intervals_and_paired_differences(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"results": {"en": {"ce": 0.2}}}))
    root = tmp_path / "coverage"
    for seed in range(3):
        # post-hoc LoRA: +4% on test at a 5% budget (covers), 3 zh-en errors of 10 tokens per utterance
        _write(root / f"lora-posthoc-b0.05-s{seed}", 0.208, 3, _held(0.05, 0.04, scale=0.4375), trained=False)
        # the budgeted arm breaks its budget on test at seed 2 only (+7%), with 1 error fewer per utterance
        _write(root / f"blora-b0.05-s{seed}", 0.214 if seed == 2 else 0.2, 2,
               _held(0.05, 0.045, 0.1 * (seed + 1), scale=1.0, beta=0.3), trained=True)
    (root / "notes").mkdir()  # folders of other names are left alone
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), "--base", str(base), "--in-domain", "zh-en"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "coverage" / "coverage.json").read_text())
    rows = {(r["arm"], r["budget"]): r for r in report["coverage"]}
    assert rows[("blora", 0.05)]["covered"] == 2 and rows[("lora-posthoc", 0.05)]["covered"] == 3
    pooled = rows[("pooled", None)]
    assert (pooled["covered"], pooled["runs"]) == (5, 6)
    assert (pooled["low"], pooled["high"]) == pytest.approx(coverage_interval(5, 6))
    assert rows[("blora", 0.05)]["test_changes"] == pytest.approx([0.0, 0.0, 0.07])
    assert rows[("blora", 0.05)]["kept"] == ["β 0.3"] * 3 and rows[("lora-posthoc", 0.05)]["kept"] == ["×0.438"] * 3
    assert "language ID per seed" not in done.stdout  # the test evaluations carry no language ID
    (paired,) = report["in_domain"]
    assert paired["arm"] == "blora" and paired["seeds"] == [0, 1, 2]
    assert paired["in_domain_error"]["difference"] == pytest.approx(-0.1)  # 2 against 3 errors in 10 tokens
    assert paired["kept_ce"]["difference"] == pytest.approx((0.2 * 2 + 0.214) / 3 - 0.208)
    (overhead,) = report["overhead"]
    assert overhead["arm"] == "blora" and overhead["median"] == pytest.approx(0.2)
    assert (root / "coverage" / "coverage.png").stat().st_size > 1000
    assert "2 of 3" in done.stdout and "5 of 6" in done.stdout


def test_a_folder_whose_name_disagrees_with_its_budget_is_refused(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"results": {"en": {"ce": 0.2}}}))
    _write(tmp_path / "c" / "map-b0.02-s0", 0.2, 1, _held(0.05, 0.04), trained=True)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "c"), "--base", str(base)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "its name says budget 0.02 but it held 0.05" in done.stderr


def test_an_overhead_recorded_by_a_resume_after_the_last_step_is_left_out(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"results": {"en": {"ce": 0.2}}}))
    root = tmp_path / "coverage"
    whole = {**_held(0.05, 0.04, 0.3), "measurements": 7, "estimate_seconds": 30.0, "search_seconds": 0.0}
    # resumed at step 150: the process measured only its search, over a loop of no training steps
    resumed = {**_held(0.05, 0.04, 5e4), "measurements": 15, "estimate_seconds": 20.0, "search_seconds": 20.0}
    _write(root / "blora-b0.05-s0", 0.2, 2, whole, trained=True)
    _write(root / "lora-es-b0.05-s0", 0.2, 2, resumed, trained=True)
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), "--base", str(base)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "coverage" / "coverage.json").read_text())
    assert [(r["arm"], r["median"]) for r in report["overhead"]] == [("blora", 0.3)]
