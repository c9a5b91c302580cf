"""``RUN_DIR/metrics.csv``, read and checked in one place.

One row per evaluation: ``iteration``, ``meta_step``, ``loss``, one score column per
evaluation split (``train_acc``, ``test_acc``, ... or ``test_mse``) and ``wall_s``.
Every cell of a row the trainer wrote holds a number (``nan`` included), so a row
with an empty or unreadable cell, a missing or extra cell, or an iteration that does
not increase was not written whole by one run: a crash in the middle of a write, or an
edit.  The trainer drops such rows when it resumes (:func:`rows_to_keep`); ``plot``
refuses them, naming the file and the line (:func:`read_columns`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

METRICS_NAME = "metrics.csv"
FIXED_COLUMNS = ("iteration", "meta_step", "loss", "wall_s")


class MetricsError(ValueError):
    """A metrics.csv that cannot be used; the message is one line naming the file."""


def _rows(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """The header and the ``(line number, cells)`` of every other non-empty line."""
    try:
        with open(path, newline="") as f:
            lines = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row]
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a text file, so not a reptile-fused metrics.csv") from None
    except csv.Error as exc:
        raise MetricsError(f"{path}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise MetricsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not lines:
        return None, []
    return lines[0][1], lines[1:]


def _parse(header: list[str], cells: list[str]) -> dict[str, float] | str:
    """The row's values, or why it is not a whole row."""
    if len(cells) != len(header):
        return f"{len(cells)} cells, the header has {len(header)} (a partly written row?)"
    values = {}
    for name, cell in zip(header, cells):
        if not cell.strip():
            return f"no value for {name} (a partly written row?)"
        try:
            values[name] = float(cell)
        except ValueError:
            return f"{name} is {cell!r}, not a number"
    it = values.get("iteration")
    if it is not None and (math.isnan(it) or it != int(it) or it < 0):
        return f"iteration is {cells[header.index('iteration')]!r}, not an iteration number"
    return values


def check_header(path: Path, header: list[str] | None, expected: list[str] | None = None) -> list[str]:
    """The header, refused in one line when it is not a reptile-fused one (or not ``expected``)."""
    if header is None:
        raise MetricsError(f"{path}: empty, no header (is it a reptile-fused metrics.csv?)")
    if expected is not None and header != list(expected):
        raise MetricsError(
            f"{path}: its header ({','.join(header)}) is not this run's ({','.join(expected)}): it was edited or "
            "belongs to another run; restore it, or move the file away to start the rows afresh"
        )
    missing = [c for c in FIXED_COLUMNS if c not in header]
    if missing:
        raise MetricsError(f"{path}: no {', '.join(missing)} column in its header ({','.join(header)}): "
                           "not a reptile-fused metrics.csv")
    return header


def read_columns(path) -> dict[str, list[float]]:
    """Every row as columns of floats; any row that is not whole is refused (file and line named)."""
    path = Path(path)
    header, lines = _rows(path)
    check_header(path, header)
    columns: dict[str, list[float]] = {name: [] for name in header}
    last = -1
    for n, cells in lines:
        values = _parse(header, cells)
        if isinstance(values, str):
            raise MetricsError(f"{path}, line {n}: {values}; delete that line (a resumed run drops it)")
        if values["iteration"] <= last:
            raise MetricsError(f"{path}, line {n}: iteration {int(values['iteration'])} after {int(last)}; rows must "
                               "increase (was it edited, or written by two runs?)")
        last = values["iteration"]
        for name, v in values.items():
            columns[name].append(v)
    return columns


def rows_to_keep(path, expected: list[str], before: int) -> tuple[list[list[str]], str | None]:
    """The rows a run resumed at iteration ``before`` keeps: the whole rows of iterations
    below ``before``, in increasing order (as written, cells untouched).  Rows of later
    iterations are dropped (written after the checkpoint), and so are rows that are not
    whole or not in order (a crash mid-write, an edit): then the second value is a
    one-line note naming the file and those lines (else ``None``).  The header must be
    ``expected``."""
    path = Path(path)
    header, lines = _rows(path)
    if header is None:  # an empty file: nothing to keep
        return [], None
    check_header(path, header, expected)
    kept: list[list[str]] = []
    damaged: list[int] = []
    last = -1
    for n, cells in lines:
        values = _parse(header, cells)
        if isinstance(values, str):
            damaged.append(n)
        elif values["iteration"] >= before:
            continue
        elif values["iteration"] <= last:
            damaged.append(n)
        else:
            last = values["iteration"]
            kept.append(cells)
    if not damaged:
        return kept, None
    where = f"line {damaged[0]}" if len(damaged) == 1 else f"lines {', '.join(map(str, damaged))}"
    return kept, (f"note: {path}: dropped {where}, not a whole row in order (a partly written or edited row); "
                  f"kept {len(kept)} rows before iteration {before:,}")


def has_rows(path) -> bool:
    """Whether ``path`` exists and holds anything beyond a header."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, newline="") as f:
            return sum(1 for line in f if line.strip()) > 1
    except (OSError, UnicodeDecodeError):
        return path.stat().st_size > 0


def set_aside(path) -> Path:
    """Rename ``metrics.csv`` to the first free ``metrics.earlier-N.csv`` beside it."""
    path = Path(path)
    n = 1
    while (target := path.with_name(f"{path.stem}.earlier-{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target
