"""The ``index.json`` of an activation harvest: what was captured, from what, and which shards are done.

Folder layout::

    out_dir/index.json                 this index (rewritten atomically after every shard)
    out_dir/shard_00000.safetensors    "tokens" (rows, seq_len) int64 + one tensor per hook (rows, ...)
    ...

Every shard but the last holds ``rows_per_shard`` rows; shard ``k`` holds source rows
``[k * rows_per_shard, k * rows_per_shard + rows)``. Each shard records the SHA-256 of its token rows, so
a resumed harvest can check that it reads the same data, and the size and SHA-256 of its file, so a resume
can check that the shard is whole (a truncated or altered shard is redone); the source fingerprint is the
SHA-256 of the token hashes, set once the harvest is complete. ``model`` holds the model's weight
``fingerprint`` and ``shape_fingerprint`` (knowlens.fingerprint): a resume with other weights is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from knowlens.errors import KnowlensError
from knowlens.fingerprint import shape_fingerprint, weights_fingerprint
from knowlens.outputs import atomic_write_text
from knowlens.types import Int, Tensor

INDEX_NAME = "index.json"
FORMAT = "knowlens.activation_harvest"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: file name (relative to the folder), row count, SHA-256 of its token rows,
    and the size in bytes and SHA-256 of the shard file itself."""

    file: str
    rows: int
    tokens_sha256: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class HarvestIndex:
    """The parsed ``index.json``. ``shapes[hook]`` is the per-row shape (without the row axis)."""

    out_dir: Path
    hooks: tuple[str, ...]
    dtype: str
    seq_len: int
    rows_per_shard: int
    shapes: dict[str, tuple[int, ...]]
    bytes_per_row: int
    n_rows: int | None
    model: dict[str, Any]
    shards: tuple[ShardInfo, ...] = ()
    complete: bool = False
    source_fingerprint: str | None = None

    @property
    def rows_done(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def expected_bytes(self) -> int | None:
        """Bytes of tensor data the whole harvest writes (headers add a few KiB per shard); None if unknown."""
        return None if self.n_rows is None else self.n_rows * self.bytes_per_row

    def shard_path(self, i: int) -> Path:
        return self.out_dir / self.shards[i].file

    def load_shard(self, i: int, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Shard ``i`` as ``{"tokens": (rows, seq_len), hook: (rows, ...)}``; KnowlensError if unreadable."""
        path = self.shard_path(i)
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as err:
            raise KnowlensError(f"cannot read harvest shard {path}: {str(err).splitlines()[0]}") from None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("out_dir")
        data["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        data["hooks"] = list(self.hooks)
        data["expected_bytes"] = self.expected_bytes
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def write(self) -> None:
        """Write ``index.json`` atomically (temp file, then ``os.replace``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / INDEX_NAME, json.dumps(self.to_json(), indent=1) + "\n")

    def with_shard(self, i: int, shard: ShardInfo) -> HarvestIndex:
        """This index with shard ``i`` set to ``shard`` (appended when ``i`` is the next shard)."""
        if i == len(self.shards):
            return replace(self, shards=(*self.shards, shard))
        return replace(self, shards=(*self.shards[:i], shard, *self.shards[i + 1 :]))

    def shard_problem(self, i: int) -> str | None:
        """Why shard ``i``'s file is not the one the index recorded (missing, size, checksum), or None."""
        info, path = self.shards[i], self.shard_path(i)
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != info.bytes:
            return f"{size} bytes, expected {info.bytes}"
        if file_sha256(path) != info.sha256:
            return "checksum differs"
        return None

    def finished(self) -> HarvestIndex:
        digest = hashlib.sha256("".join(s.tokens_sha256 for s in self.shards).encode()).hexdigest()
        return replace(self, complete=True, source_fingerprint=digest, n_rows=self.rows_done)

    @classmethod
    def read(cls, out_dir: str | os.PathLike[str]) -> HarvestIndex:
        """Parse ``out_dir/index.json``; KnowlensError (one line, naming the file) if it is missing or bad."""
        path = Path(out_dir) / INDEX_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"not a knowlens harvest index (format={data.get('format')!r})")
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"format version {data.get('format_version')}, this knowlens reads {FORMAT_VERSION} "
                    "(version 1 had no weight fingerprint or shard checksums); harvest into a new folder"
                )
            return cls(
                out_dir=Path(out_dir),
                hooks=tuple(data["hooks"]),
                dtype=str(data["dtype"]),
                seq_len=int(data["seq_len"]),
                rows_per_shard=int(data["rows_per_shard"]),
                shapes={k: tuple(int(d) for d in v) for k, v in data["shapes"].items()},
                bytes_per_row=int(data["bytes_per_row"]),
                n_rows=None if data["n_rows"] is None else int(data["n_rows"]),
                model=dict(data["model"]),
                shards=tuple(
                    ShardInfo(str(s["file"]), int(s["rows"]), str(s["tokens_sha256"]), int(s["bytes"]), str(s["sha256"]))
                    for s in data["shards"]
                ),
                complete=bool(data["complete"]),
                source_fingerprint=data.get("source_fingerprint"),
            )
        except FileNotFoundError:
            raise KnowlensError(f"harvest index {path} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise KnowlensError(f"cannot read harvest index {path}: {str(err).splitlines()[0]}") from None


def tokens_sha256(rows: Int[Tensor, "rows seq"]) -> str:
    """SHA-256 of token rows as contiguous little-endian int64."""
    return hashlib.sha256(rows.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What must match for a resumed harvest to continue one made by another model instance."""
    cfg = model.cfg
    return {
        "model_name": str(getattr(cfg, "model_name", "")),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "n_ctx": int(cfg.n_ctx),
        "fingerprint": weights_fingerprint(model),
        "shape_fingerprint": shape_fingerprint(model),
    }


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"
