"""What every benchmark script shares: timing statistics, the machine and versions, and writing
its own section of BENCHMARKS.md (the rest of the file is kept)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pyro_blora.report.tables import markdown_table

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def timed(call: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """``call()``'s result, its wall seconds and this process's CPU seconds (CPU time is less sensitive
    to other processes on the machine; with several torch threads it also counts their spinning)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: device, CPU, cores, threads, versions, date and load average."""
    import peft
    import pyro
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{device}; {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"pyro {pyro.__version__}, peft {peft.__version__}; {datetime.date.today().isoformat()}; "
            f"load average at the end {load}")


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section ``## title`` of BENCHMARKS.md."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def table(rows: dict[str, Sequence[float]], unit: str, scale: float = 1.0,
          extra: dict[str, dict[str, str]] | None = None) -> str:
    """min / median / max of each row; ``extra`` adds columns (title: text per row name)."""
    extra = extra or {}
    columns = ["", f"min ({unit})", f"median ({unit})", f"max ({unit})", *extra]
    body = []
    for name, values in rows.items():
        s = spread([v * scale for v in values])
        cells = [name, f"{s['min']:.3g}", f"{s['median']:.3g}", f"{s['max']:.3g}", *(column[name] for column in extra.values())]
        body.append(dict(zip(columns, cells)))
    return markdown_table(body, columns)
