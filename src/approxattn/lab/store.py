"""Incremental results: one JSON line per measurement, appended as soon as it is made, so an
interrupted run keeps what it measured and a rerun into the same folder resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

LAB_FORMAT = 1


def make_key(*parts: Any) -> str:
    return json.dumps([LAB_FORMAT, *parts], sort_keys=True, default=str)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), sort_keys=False, default=str)


class ResultStore:
    """Records keyed by ``record["key"]``; the file is append-only and the last line of a key wins."""

    def __init__(self, path: Path, *, resume: bool = True) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            for record in read_jsonl(self.path):
                if "key" in record:
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.path.open("a") as f:
            f.write(dumps(record) + "\n")
            f.flush()
        self.records[record["key"]] = record
        return record


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """Records of a JSON-lines file; a truncated last line (an interrupted write) is skipped."""
    with Path(path).open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
