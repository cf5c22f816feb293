"""The per-module report of a resize run (--report FILE.json|FILE.csv)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from lytools.io.writer import write_text_atomic
from lytools.resize.modules import ModuleReport

COLUMNS = (
    "module", "algo", "kind", "action", "rank_in", "rank_out", "rank_rule", "alpha_in", "alpha_out",
    "sum_kept", "fro_kept", "max_ratio", "note",
)


def report_text(path: Path, reports: Iterable[ModuleReport]) -> str:
    """Return the report as JSON (a list of rows) or CSV, chosen by the file suffix."""
    rows = [report.as_row() for report in reports]
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row[key] is None else row[key] for key in COLUMNS})
        return buffer.getvalue()
    return json.dumps({"modules": rows}, indent=1) + "\n"


def write_report(path: Path, reports: Iterable[ModuleReport]) -> Path:
    """Write the report atomically (temporary file in the same folder, then rename)."""
    return write_text_atomic(path, report_text(Path(path), reports))
