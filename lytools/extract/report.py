"""The per-module report (--report FILE.json|FILE.csv) and the summary printed after every run."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lytools.extract.factor import ModuleRecord
from lytools.io.writer import write_text_atomic

CSV_COLUMNS = (
    "name", "component", "kind", "shape", "stored", "rank", "alpha", "rel_error", "retained_energy",
    "diff_norm", "route", "clamp_added_error", "tucker_added_error", "sparse_nnz", "rel_error_with_sparse",
    "reason", "notes",
)
WORST_SHOWN = 3


@dataclass
class Summary:
    extracted: int = 0
    low_rank: int = 0
    full: int = 0
    skipped: int = 0
    retained_energy: float | None = None  # Σ‖ΔW_stored‖-retained over Σ‖D‖², extracted modules
    mean_rel_error: float | None = None
    worst: list[tuple[str, float]] = field(default_factory=list)  # (module, rel_error), worst first
    randomized: int = 0
    exact: int = 0
    retried: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    clamp_added_error: float | None = None  # mean over modules, when --clamp-quantile was used
    tucker_added_error: float | None = None  # mean over Tucker modules

    def line(self) -> str:
        """One line for stderr: counts, overall retained energy, the worst modules."""
        parts = [f"{self.extracted} modules extracted ({self.low_rank} low-rank, {self.full} stored whole)"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        if self.retained_energy is not None:
            parts.append(f"retained energy {100 * self.retained_energy:.2f}%")
        if self.clamp_added_error is not None:
            parts.append(f"clamping added {self.clamp_added_error:.4f} relative error on average")
        if self.tucker_added_error is not None:
            parts.append(f"the Tucker core added {self.tucker_added_error:.4f} on average")
        if self.worst:
            parts.append("worst: " + ", ".join(f"{name} ({error:.3f})" for name, error in self.worst))
        return "; ".join(parts)


def _reason_class(reason: str | None) -> str:
    if not reason:
        return "other"
    if reason.startswith("only in") or " only in " in reason:
        return "in one file only"
    if reason.startswith("shape") or ": shape" in reason:
        return "shape differs"
    if "min-diff" in reason or reason.startswith("identical"):
        return "unchanged / below min-diff"
    if reason.startswith("differs only by rounding"):
        return "unchanged but for the rounding to one file's lower precision"
    if reason.startswith("conv dim 0") or reason.startswith("linear dim 0"):
        return "dim 0"
    if reason.startswith("decomposition failed") or "NaN" in reason:
        return "failed"
    if reason.startswith("no kohya name"):
        return "without a kohya name (SD3.5 in diffusers layout: extract from the single-file checkpoints)"
    return "other"


def summarize(records: list[ModuleRecord]) -> Summary:
    """Return the totals of a run's records."""
    summary = Summary()
    kept = 0.0
    total = 0.0
    errors = []
    for record in records:
        if record.stored == "skipped":
            summary.skipped += 1
            reason = _reason_class(record.reason)
            summary.skip_reasons[reason] = summary.skip_reasons.get(reason, 0) + 1
            continue
        summary.extracted += 1
        if record.stored == "full":
            summary.full += 1
        else:
            summary.low_rank += 1
            summary.randomized += record.route == "randomized"
            summary.exact += record.route == "exact"
        summary.retried += any("retried" in note or "failed" in note for note in record.notes)
        if record.diff_norm is not None and record.rel_error is not None:
            energy = record.diff_norm ** 2
            total += energy
            kept += energy * (1.0 - record.rel_error ** 2)
            errors.append((record.name, record.rel_error))
    if total > 0:
        summary.retained_energy = kept / total
    for key in ("clamp_added_error", "tucker_added_error"):
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        if values:
            setattr(summary, key, sum(values) / len(values))
    if errors:
        summary.mean_rel_error = sum(e for _, e in errors) / len(errors)
        summary.worst = sorted(errors, key=lambda item: -item[1])[:WORST_SHOWN]
    return summary


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(path: Path, records: list[ModuleRecord], summary: Summary) -> Path:
    """Write the per-module report as JSON ({"summary", "modules"}) or CSV (one row per module), atomically
    (as resize's: lytools.io.writer.write_text_atomic)."""
    path = Path(path)
    rows = [record.as_dict() for record in records]
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            row = dict(row)
            row["shape"] = "x".join(str(d) for d in row["shape"])
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in CSV_COLUMNS})
        text = buffer.getvalue()
    else:
        document = {"summary": asdict(summary), "modules": [{k: _clean(v) for k, v in row.items()} for row in rows]}
        text = json.dumps(document, indent=1) + "\n"
    return write_text_atomic(path, text)
