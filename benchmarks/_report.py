"""Shared by the benchmark scripts: timing helpers and the RESULTS.md writer (one section per script)."""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99 in microseconds."""
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": statistics.fmean(ordered) / 1000}


def machine() -> str:
    import os

    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}"
    )


def record(section: str, markdown: str) -> None:
    """Replace this script's section of RESULTS.md (keeps the other scripts' sections)."""
    text = (
        RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by its script.\n"
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = f"<!-- {section}:start -->\n## {section}\n\n_{stamp} · {machine()} · `python {' '.join(sys.argv)}`_\n\n{markdown.strip()}\n<!-- {section}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    RESULTS.write_text(text)
