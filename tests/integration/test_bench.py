"""The benchmark suite's smoke run: every section starts, measures and reports (timings unchecked).

It takes a minute or two, so the default run leaves it out: `python -m pytest -m bench` runs it.

Benchmarks report; they never fail on timing (docs/BENCHMARKS.md). This only keeps bench/ from
rotting: `bench/run.py --quick` must run every section against the real daemon and emulator,
print a report with every section and a targets table, stop what it started, and write the
results block of a copy of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

pytestmark = [
    pytest.mark.bench,  # left out of the default run: `pytest -m bench`
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bench reads /proc"),
]


def test_the_quick_bench_runs_every_section_and_writes_the_report(base: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        run = importlib.import_module("run")
        titles = [importlib.import_module(name).TITLE for name in run.SECTIONS]
    finally:
        sys.path.remove(str(BENCH))
    doc = base / "BENCHMARKS.md"
    shutil.copy(ROOT / "docs" / "BENCHMARKS.md", doc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEMAGENT_", "COVERAGE_"))}
    scratch = base / "t"  # the bench's temp dirs go here: short paths, and checked for leftovers
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--write", str(doc)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    assert "### Targets:" in report
    for title in titles:
        assert f"### {title}" in report, title
    written = doc.read_text()
    assert report.strip() in written
    assert written.startswith("# Benchmarks")  # the text around the block is kept
    # Only the load generator's build cache (bench/loadgen.py) is meant to outlive a run.
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("aemagent-bench-loadgen-")]
    assert not left, f"the bench left files behind: {left}"
