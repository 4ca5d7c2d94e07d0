#!/usr/bin/env python3
"""Regenerate the KJV texts of ``approxattn distill`` (package data).

Distillation trains on the lab's KJV excerpt (Genesis onwards, ``approxattn.lab`` data; 96 K
SmolLM2 tokens) or, with ``--train-split train-full``, on every book before Hebrews (Genesis to
Philemon, ~1 M tokens), and reports perplexity on text no model was distilled on: the last books
of the Bible, Hebrews to Revelation. The text comes from Debian's ``bible-kjv-text`` package printed
by ``bible-kjv``'s ``bible`` program. Chapter headings and verse numbers are stripped as in
``scripts/make_lab_text.py``; each chapter becomes one paragraph.

Usage (the project venv: the file names come from the package; needs apt-get and dpkg; downloads
.deb files only, installs nothing)::

    .venv/bin/python scripts/make_distill_text.py                     # src/approxattn/distill/data/kjv_heldout.txt.gz
    .venv/bin/python scripts/make_distill_text.py --split train-full  # src/approxattn/distill/data/kjv_train.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import tempfile
from pathlib import Path

from make_lab_text import chapters  # noqa: E402  (same folder: the lab's KJV chapter parser)

from approxattn.distill.data import PACKAGE_FILES  # the file names the package reads

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "approxattn" / "distill" / "data"
# split → (passage range, file); the held-out books follow Philemon, so the two never overlap
PASSAGES = {"heldout": "Heb1:1-Rev22:21", "train-full": "Gen1:1-Phm1:25"}
SPLITS = {split: (passages, PACKAGE_FILES[split]) for split, passages in PASSAGES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="heldout", help="which text to write")
    args = parser.parse_args()
    passages, name = SPLITS[args.split]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=work, check=True)
        root = work / "root"
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        raw = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), passages],
                             check=True, capture_output=True, text=True).stdout
    text = "\n\n".join(chapters(raw)) + "\n"
    out = DATA / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    print(f"wrote {out} ({len(text)} characters)")


if __name__ == "__main__":
    main()
