"""The default model's corpus: the King James Version of the Bible (public domain), as
shipped by Debian's `bible-kjv-text` package and decoded by its `bible` program.

A document is one chapter: its verses one per line, without references. Documents are
separated by a blank line in the text files. The held-out split is every HELDOUT_EVERY-th
chapter, so it samples every part of the book rather than its last pages."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HELDOUT_EVERY = 40  # 1189 chapters -> 29 held out (~2.5 % of the text)
DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text")
ALL_VERSES = "gen1:1-rev22:21"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_verses(raw: str) -> list[str]:
    """`bible -f` output ("Ge1:1 In the beginning ...", a verse a line) -> chapters."""
    chapters: list[list[str]] = []
    current: tuple[str, str] | None = None
    for line in raw.splitlines():
        match = _VERSE.match(line)
        if match is None:
            raise ValueError(f"unexpected line in the bible output: {line[:80]!r}")
        book, chapter, _, text = match.groups()
        if (book, chapter) != current:
            chapters.append([])
            current = (book, chapter)
        chapters[-1].append(text.strip())
    return ["\n".join(verses) for verses in chapters]


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """-> (train, heldout): every HELDOUT_EVERY-th document, offset by half, is held out."""
    held = {i for i in range(len(documents)) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2}
    train = [d for i, d in enumerate(documents) if i not in held]
    return train, [documents[i] for i in sorted(held)]


def join_documents(documents: list[str]) -> str:
    return "\n\n".join(documents) + "\n"


def read_documents(path: str | Path) -> list[str]:
    """A text file (gzipped if its name ends in .gz) of documents separated by blank lines."""
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    return [d for d in data.decode("utf-8").strip().split("\n\n") if d]


def _run_bible(binary: str, data_dir: str) -> str:
    cmd = [binary, "-f", "-p", data_dir, ALL_VERSES]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def load_debian_kjv() -> list[str]:
    """All 1189 chapters, from the installed Debian package or, failing that, from the
    packages fetched with `apt-get download` and unpacked in a temporary directory (no
    root and no install needed)."""
    if shutil.which("bible") and Path("/usr/lib/bible.data").is_file():
        return parse_verses(_run_bible("bible", "/usr/lib"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=tmp, check=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], check=True)
        return parse_verses(_run_bible(f"{tmp}/root/usr/bin/bible", f"{tmp}/root/usr/lib"))
