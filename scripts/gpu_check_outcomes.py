"""pytest plugin of `make gpu-check`: one JSON line per test outcome, appended as it happens.

Loaded with ``-p gpu_check_outcomes`` (scripts/ on PYTHONPATH) and GPU_CHECK_OUTCOMES naming
the file.  A shard killed by its stage's timeout has lost no outcome it reached, and a
module skipped at collection (a missing optional package) is recorded with its reason
instead of vanishing from the counts.
"""

from __future__ import annotations

import json
import os

_PATH = os.environ.get("GPU_CHECK_OUTCOMES")


def _write(record: dict) -> None:
    if _PATH:
        with open(_PATH, "a") as f:
            f.write(json.dumps(record) + "\n")


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def pytest_runtest_logreport(report) -> None:
    # One record per test: its call, or the setup/teardown that skipped or failed it.
    if report.when == "call" or (report.when != "call" and not report.passed):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        _write({"test": report.nodeid, "outcome": outcome, "when": report.when,
                "seconds": round(report.duration, 3), "reason": "" if report.passed else _reason(report)})  # fmt: skip


def pytest_collectreport(report) -> None:
    if not report.passed:
        _write({"test": report.nodeid, "outcome": f"collect {report.outcome}", "reason": _reason(report)})
