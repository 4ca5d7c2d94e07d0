#!/usr/bin/env python3
"""Regenerate the lab's README figure and table, and the reference measurements `advise` ships with.

Runs the default `approxattn compare` (every registered method, the default real + synthetic inputs)
into ``reports/lab-default/`` (git-ignored) and copies

* ``pareto.png``, ``scaling.png``, ``heatmaps.png`` and ``table.md`` to ``docs/lab/``;
* the measure/scaling rows, compacted, to ``src/approxattn/lab/data/reference_measurements.jsonl.gz``
  (what `approxattn advise` uses on a machine that never ran `compare`).

Usage::

    .venv/bin/python scripts/make_lab_docs.py          # about 1.5-3 minutes on 2 CPU cores
    .venv/bin/python scripts/make_lab_docs.py --fresh  # discard earlier rows of reports/lab-default
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "reports" / "lab-default"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    from approxattn.lab.advise import REFERENCE_FILE, export_reference
    from approxattn.lab.cli import main as lab_main
    from approxattn.lab.store import read_jsonl

    argv = ["compare", "--out", args.out] + (["--fresh"] if args.fresh else [])
    code = lab_main(argv)
    if code:
        return code
    out = Path(args.out)
    docs = ROOT / "docs" / "lab"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("pareto.png", "scaling.png", "heatmaps.png", "table.md"):
        shutil.copyfile(out / name, docs / name)
    rows = {}
    for row in read_jsonl(out / "results.jsonl"):
        rows[row["key"]] = row
    n = export_reference(rows.values(), ROOT / "src" / "approxattn" / "lab" / "data" / REFERENCE_FILE)
    print(f"docs/lab/: pareto.png, scaling.png, heatmaps.png, table.md; {n} reference measurements for advise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
