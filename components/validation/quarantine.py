"""The quarantine file (every rejected row with every reason and its original fields) and per-table counts.

``quarantine.parquet`` columns: ``table`` (string), ``row_index`` (int64, the row's position in its table as
read), ``row_id`` (string), ``reason`` (string, all reasons joined by ``"; "``), ``reasons`` (list<string>),
``record`` (string: the row's original fields as JSON).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.validation.engine import TableOutcome

QUARANTINE_FILE = "quarantine.parquet"
QUARANTINE_SCHEMA = pa.schema(
    [
        ("table", pa.string()),
        ("row_index", pa.int64()),
        ("row_id", pa.string()),
        ("reason", pa.string()),
        ("reasons", pa.list_(pa.string())),
        ("record", pa.string()),
    ]
)


def plain(value: Any) -> Any:
    """``value`` made JSON-safe: numpy scalars/arrays to Python, NaN/inf to None, unknown objects to str."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def to_json(value: Any) -> str:
    return json.dumps(plain(value), ensure_ascii=False, sort_keys=True, allow_nan=False)


@dataclass
class TableCounts:
    """How one table came out; ``input_rows == accepted + quarantined`` always."""

    table: str
    """Table name (as in the quarantine file)."""
    source: str
    """File(s) the rows came from, relative to the dataset root."""
    input_rows: int
    """Rows read."""
    accepted: int
    """Rows that passed every row rule."""
    quarantined: int
    """Rows written to the quarantine file."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Reason -> rows failing it (a row with two reasons counts in both)."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """Reason -> what it means."""
    failures: list[str] = field(default_factory=list)
    """Dataset-level failures of this table."""

    @property
    def bad_fraction(self) -> float:
        return self.quarantined / self.input_rows if self.input_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "source": self.source,
            "input_rows": self.input_rows,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "bad_fraction": round(self.bad_fraction, 6),
            "reasons": dict(sorted(self.reasons.items())),
            "descriptions": dict(sorted(self.descriptions.items())),
            "failures": list(self.failures),
            "passed": not self.failures,
        }


def count(outcome: TableOutcome, max_bad_fraction: float) -> TableCounts:
    """Counts for one table, adding the too-many-bad-rows failure; checks that the counts reconcile."""
    reasons = Counter(r for rs in outcome.row_reasons.values() for r in rs)
    counts = TableCounts(
        table=outcome.check.name,
        source=outcome.check.source,
        input_rows=outcome.rows,
        accepted=len(outcome.accepted_rows),
        quarantined=len(outcome.row_reasons),
        reasons=dict(reasons),
        descriptions=dict(outcome.reason_descriptions),
        failures=list(outcome.failures),
    )
    if counts.accepted + counts.quarantined != counts.input_rows:  # a bug in this step, never a data problem
        raise AssertionError(
            f"{counts.table}: {counts.input_rows} rows in, {counts.accepted} + {counts.quarantined} out"
        )
    if counts.bad_fraction > max_bad_fraction:
        counts.failures.append(
            f"too many bad rows: {counts.quarantined} of {counts.input_rows} ({counts.bad_fraction:.1%}) quarantined, "
            f"the limit is {max_bad_fraction:.1%}"
        )
    return counts


def quarantine_table(outcomes: list[TableOutcome]) -> pa.Table:
    """Every rejected row of every table, in table order then row order."""
    cols: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    for outcome in outcomes:
        check = outcome.check
        for i, reasons in sorted(outcome.row_reasons.items()):
            cols["table"].append(check.name)
            cols["row_index"].append(i)
            cols["row_id"].append(check.row_id(i))
            cols["reason"].append("; ".join(reasons))
            cols["reasons"].append(list(reasons))
            cols["record"].append(to_json(check.record(i)))
    return pa.Table.from_pydict(cols, schema=QUARANTINE_SCHEMA)


def rejected_row_ids(output_dir: str | Path, table: str) -> set[str]:
    """Row ids of ``table`` that a validation run quarantined (how later steps drop bad task rows).

    ``output_dir`` is the validate step's output folder, local or ``s3://``.
    """
    from components import storage

    data = storage.read_bytes(storage.join(str(output_dir), QUARANTINE_FILE))
    quarantine = pq.read_table(io.BytesIO(data), columns=["table", "row_id"])
    return {
        row_id
        for t, row_id in zip(
            quarantine.column("table").to_pylist(), quarantine.column("row_id").to_pylist(), strict=True
        )
        if t == table and row_id is not None
    }
