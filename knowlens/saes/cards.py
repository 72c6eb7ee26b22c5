"""Result files: tensors in safetensors plus a JSON card beside them (format, version, knowlens version, the tensor
file's SHA-256), each written atomically and read back without unpickling; a mismatch is one KnowlensError line."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from knowlens.errors import KnowlensError
from knowlens.outputs import atomic_write, atomic_write_text
from knowlens.types import Tensor


def card_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_with_card(path: str | os.PathLike[str], tensors: dict[str, Tensor], card: dict[str, Any], *, fmt: str,
                   version: int) -> Path:  # fmt: skip
    """Write ``tensors`` to ``path`` (safetensors; ``.safetensors`` appended if missing) and ``card`` (JSON-safe,
    non-finite floats as null) with the format, the knowlens version and the tensor file's SHA-256 to the
    ``.json`` beside it, each atomically; return the tensor file."""
    from safetensors.torch import save_file

    from knowlens.version import __version__

    tensors_path, card_path = card_paths(path)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(tensors_path, lambda tmp: save_file(plain, str(tmp), metadata={"format": fmt}))
    full = {"format": fmt, "format_version": version, **{k: json_safe(v) for k, v in card.items()},
            "knowlens_version": __version__, "tensors_sha256": hashlib.sha256(tensors_path.read_bytes()).hexdigest()}
    atomic_write_text(card_path, json.dumps(full, indent=2, allow_nan=False) + "\n")
    return tensors_path


def load_with_card(path: str | os.PathLike[str], *, fmt: str, version: int, what: str
                   ) -> tuple[dict[str, Any], dict[str, Tensor], tuple[Path, Path]]:  # fmt: skip
    """Read what `save_with_card` wrote, never unpickling: (card, tensors, (tensor file, card file)).
    KnowlensError (one line, ``what`` and the file) for a missing file, an unreadable or foreign card, another
    format version, or a tensor file that does not match the card's SHA-256 (truncated or replaced)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    tensors_path, card_path = card_paths(path)
    for p in (tensors_path, card_path):
        if not p.is_file():
            raise KnowlensError(f"{what} {p}: no such file")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise KnowlensError(f"{what} {card_path}: not a readable JSON card ({one_line(err)})") from None
    if not isinstance(card, dict) or card.get("format") != fmt:
        raise KnowlensError(f"{what} {card_path}: not a {fmt} card")
    if card.get("format_version") != version:
        raise KnowlensError(f"{what} {card_path}: format version {card.get('format_version')!r}, this knowlens "
                            f"reads {version}")  # fmt: skip
    data = tensors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != card.get("tensors_sha256"):
        raise KnowlensError(f"{what} {tensors_path}: does not match {card_path.name} (truncated or replaced)")
    try:
        return card, load_bytes(data), (tensors_path, card_path)
    except (SafetensorError, ValueError) as err:
        raise KnowlensError(f"{what} {tensors_path}: not a readable safetensors file ({one_line(err)})") from None
