#!/usr/bin/env python3
"""Regenerate the public-domain text that ships inside approxattn.lab (package data).

The lab feeds real text through real models; it must work offline, so a small excerpt of two
Debian packages is committed as gzip files under ``src/approxattn/lab/data/``:

* ``kjv.txt.gz``: the King James Bible (public domain) from Debian's ``bible-kjv-text`` package,
  printed with the ``bible`` program of ``bible-kjv``; chapter headings and verse numbers are
  stripped and each book becomes one paragraph-per-chapter block. The first books up to about
  ``--kjv-bytes`` characters are kept.
* ``fortunes.txt.gz``: fortunes from Debian's ``fortunes`` and ``fortunes-min`` packages (topic files named by
  ``--fortune-topics``), kept in the ``%``-separated fortune format, up to ``--fortune-bytes``.

Usage (needs apt-get and dpkg; downloads .deb files only, installs nothing)::

    python scripts/make_lab_text.py            # writes src/approxattn/lab/data/{kjv,fortunes}.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "approxattn" / "lab" / "data"


def unpack(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv", "fortunes", "fortunes-min"], cwd=workdir, check=True)
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def chapters(raw: str) -> list[str]:
    """The chapters of ``bible`` output, one whitespace-normalised paragraph each: chapter headings
    and verse numbers stripped (also used by make_distill_text.py)."""
    found: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()) and not line.startswith(" "):
            if current:
                found.append(" ".join(current))
            current = []
            continue
        text = re.sub(r"^\s*\d+ ", "", line).strip()
        if text:
            current.append(text)
    if current:
        found.append(" ".join(current))
    return [re.sub(r"\s+", " ", chapter) for chapter in found]


def kjv_text(root: Path, limit: int) -> str:
    raw = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    out, size = [], 0
    for chapter in chapters(raw):
        if size + len(chapter) > limit:
            break
        out.append(chapter)
        size += len(chapter) + 2
    return "\n\n".join(out) + "\n"


def fortunes_text(root: Path, topics: list[str], limit: int) -> str:
    fortunes: list[str] = []
    for topic in topics:
        text = (root / "usr/share/games/fortunes" / topic).read_text(encoding="latin-1")
        fortunes += [f.strip("\n") for f in text.split("\n%\n") if f.strip()]
    out, size = [], 0
    for fortune in fortunes:
        if size + len(fortune) > limit:
            break
        out.append(fortune)
        size += len(fortune) + 3
    return "\n%\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kjv-bytes", type=int, default=400_000)
    parser.add_argument("--fortune-bytes", type=int, default=120_000)
    parser.add_argument("--fortune-topics", default="fortunes,science,literature,wisdom,people")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(Path(tmp))
        kjv = kjv_text(root, args.kjv_bytes)
        fortunes = fortunes_text(root, args.fortune_topics.split(","), args.fortune_bytes)
    for name, text in (("kjv.txt.gz", kjv), ("fortunes.txt.gz", fortunes)):
        path = DATA / name
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
            f.write(text.encode("utf-8"))
        print(f"{path.relative_to(ROOT)}: {len(text):,} characters, {path.stat().st_size:,} bytes gzip")


if __name__ == "__main__":
    main()
