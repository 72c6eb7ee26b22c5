"""Reading the text files users hand in (world specs, prompts, texts): one-line reasons for every failure."""

from __future__ import annotations

import os
from pathlib import Path

from knowlens.errors import KnowlensError


def read_text_file(path: str | os.PathLike[str], *, what: str) -> str:
    """The UTF-8 text of ``path``; KnowlensError naming ``what`` and the problem (missing, a folder, binary,
    not UTF-8, unreadable)."""
    path = Path(path)
    if path.is_dir():
        raise KnowlensError(f"{what} {path}: is a folder, not a file")
    if not path.exists():
        raise KnowlensError(f"{what} {path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KnowlensError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise KnowlensError(f"{what} {path}: a binary file (NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KnowlensError(f"{what} {path}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None
