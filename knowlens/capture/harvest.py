"""Forward-only activation harvesting over a token data set, to resumable safetensors shards.

Each batch runs the model up to the last layer a requested hook needs (``stop_at_layer``); hooks copy
into a shard buffer preallocated on the model's device, which is moved to the host once per shard and
written to a temporary name, then ``os.replace``d into place, and only then listed in ``index.json``
(with its size and checksum). An interrupted harvest therefore leaves only whole shards behind, and
running the same call again verifies them (token hashes, sizes, checksums), redoes any that are damaged,
and continues with the next shard.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from knowlens.capture.harvest_index import (
    INDEX_NAME,
    HarvestIndex,
    ShardInfo,
    file_sha256,
    human_bytes,
    model_fingerprint,
    tokens_sha256,
)
from knowlens.capture.hooks import stop_layer_for, validate_hook_names
from knowlens.errors import KnowlensError, KnowlensWarning
from knowlens.fingerprint import check_same_model
from knowlens.outputs import atomic_write, check_output_dir
from knowlens.types import Int, Tensor

TokenSource = Tensor | Iterable[Sequence[int]] | Iterable[Tensor]


def harvest(
    model: Any,
    token_source: TokenSource,
    *,
    hooks: Sequence[str],
    out_dir: str | os.PathLike[str],
    batch_size: int,
    shard_tokens: int = 1 << 20,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> HarvestIndex:
    """Capture ``hooks`` on every token of ``token_source`` and write them to ``out_dir`` as shards.

    Args:
        token_source: a 2-D int tensor ``(rows, seq_len)``, or an iterable of equal-length token rows
            (lists of ints or 1-D tensors; a generator works, and is re-read from the start on resume).
        batch_size: rows per forward pass.
        shard_tokens: target tokens per shard; a shard holds ``max(1, shard_tokens // seq_len)`` rows.
            Disk use is ``rows * (seq_len * 8 + sum over hooks of per-row elements * itemsize)`` bytes
            (``HarvestIndex.bytes_per_row``, ``expected_bytes``), known before any shard is written.
        dtype: store activations in this dtype (e.g. ``torch.float16``); default: as the model computes them.
        progress: show a tqdm bar (rows), whose label gives the expected size on disk.
        overwrite: delete a harvest already in ``out_dir`` and start again (default: resume it).

    Returns the final `HarvestIndex` (also in ``out_dir/index.json``). Raises KnowlensError for bad
    input, or if ``out_dir`` holds a harvest of other hooks, settings, model weights or tokens. On resume,
    every listed shard's size and checksum are verified; bad shards are redone, with a `KnowlensWarning`.
    Everything is checked before the first forward pass; a run that fails before writing a shard leaves
    no folder and no index behind.
    """
    names = validate_hook_names(model, hooks)
    if not names:
        raise KnowlensError("name at least one hook to harvest (e.g. blocks.0.hook_resid_post)")
    if batch_size < 1 or shard_tokens < 1:
        raise KnowlensError(f"batch_size and shard_tokens must be >= 1 (got {batch_size}, {shard_tokens})")
    check_output_dir(out_dir, flag="out_dir")
    rows_iter, n_rows, first = _open_source(token_source)
    seq_len = int(first.numel())
    _check_row(model, first, 0, seq_len)
    if isinstance(token_source, (torch.Tensor, Sequence)):  # in memory: check every row before any work
        for _ in _chunks((torch.as_tensor(r) for r in token_source), 4096, model, seq_len):
            pass
    device = model.embed.W_E.device
    stop = stop_layer_for(model, names)
    shapes, act_dtype = _probe(model, first.to(device), names, stop)
    store_dtype = dtype or act_dtype
    item = torch.empty((), dtype=store_dtype).element_size()
    bytes_per_row = seq_len * 8 + sum(_numel(s) for s in shapes.values()) * item
    plan = HarvestIndex(
        out_dir=Path(out_dir),
        hooks=names,
        dtype=str(store_dtype).removeprefix("torch."),
        seq_len=seq_len,
        rows_per_shard=max(1, shard_tokens // seq_len),
        shapes=shapes,
        bytes_per_row=bytes_per_row,
        n_rows=n_rows,
        model=model_fingerprint(model),
    )
    index, redo = _resume_or_start(plan, overwrite=overwrite)
    for i, why in redo.items():
        warnings.warn(
            f"{index.out_dir}: shard {i} ({index.shards[i].file}) is {why}; redoing it", KnowlensWarning, stacklevel=2
        )

    from tqdm.auto import tqdm

    created = not index.out_dir.exists()
    index.out_dir.mkdir(exist_ok=True)
    _remove_stale_temporaries(index.out_dir)  # left by a run that was killed mid-write
    if overwrite:
        _remove_harvest_files(index.out_dir)
    bar = tqdm(
        total=n_rows,
        unit="row",
        disable=not progress,
        desc=f"harvest ~{human_bytes(plan.expected_bytes)}",
    )
    buffers = {
        name: torch.empty((index.rows_per_shard, *shape), dtype=store_dtype, device=device)
        for name, shape in shapes.items()
    }
    window = [0, 0]
    fwd_hooks = [(name, partial(_copy_rows, buf=buffers[name], window=window)) for name in names]
    shard_no = 0
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
            for chunk in _chunks(itertools.chain([first], rows_iter), index.rows_per_shard, model, seq_len):
                digest = tokens_sha256(chunk)
                listed = shard_no < len(index.shards)
                if listed and (index.shards[shard_no].tokens_sha256 != digest or index.shards[shard_no].rows != len(chunk)):
                    raise KnowlensError(
                        f"{index.out_dir} holds a harvest of other tokens (shard {shard_no} differs); "
                        "use another output folder or --overwrite"
                    )
                if not listed or shard_no in redo:
                    _run_chunk(model, chunk.to(device), batch_size, stop, window)
                    index = index.with_shard(shard_no, _write_shard(index, shard_no, chunk, buffers, digest))
                    index.write()
                bar.update(len(chunk))
                shard_no += 1
    except BaseException:
        if created and not index.shards:  # nothing worth resuming: leave no folder behind
            shutil.rmtree(index.out_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
    if shard_no < len(index.shards):
        raise KnowlensError(
            f"{index.out_dir} holds more rows than this token source; use another output folder or --overwrite"
        )
    index = index.finished()
    index.write()
    return index


def _open_source(source: TokenSource) -> tuple[Iterator[Tensor], int | None, Tensor]:
    """(iterator over the rows after the first, number of rows if known, first row)."""
    if isinstance(source, torch.Tensor):
        if source.ndim != 2:
            raise KnowlensError(
                f"a token tensor must be 2-D (rows, seq_len), got shape {tuple(source.shape)}"
            )
        if source.is_floating_point() or source.dtype == torch.bool:
            raise KnowlensError(f"a token tensor must hold integer ids, got dtype {source.dtype}")
        if source.shape[0] == 0 or source.shape[1] == 0:
            raise KnowlensError(f"the token tensor is empty (shape {tuple(source.shape)})")
        rows: Iterator[Any] = iter(source)
        n_rows: int | None = int(source.shape[0])
    else:
        n_rows = len(source) if hasattr(source, "__len__") else None  # type: ignore[arg-type]
        rows = iter(source)
    first = next(rows, None)
    if first is None:
        raise KnowlensError("the token source is empty")
    return (torch.as_tensor(r) for r in rows), n_rows, torch.as_tensor(first).to(torch.long)


def _check_row(model: Any, row: Tensor, i: int, seq_len: int) -> None:
    if row.ndim != 1 or row.numel() != seq_len:
        raise KnowlensError(
            f"token row {i} has shape {tuple(row.shape)}; every row must have {seq_len} tokens"
        )
    if seq_len == 0:
        raise KnowlensError("token rows are empty")
    if seq_len > model.cfg.n_ctx:
        raise KnowlensError(
            f"token rows have {seq_len} tokens, more than the model's context ({model.cfg.n_ctx})"
        )


def _chunks(rows: Iterable[Tensor], size: int, model: Any, seq_len: int) -> Iterator[Int[Tensor, "rows seq"]]:
    """Group rows into ``(<= size, seq_len)`` int64 CPU tensors, checking each row."""
    d_vocab = int(model.cfg.d_vocab)
    start = 0
    it = iter(rows)
    while True:
        group = list(itertools.islice(it, size))
        if not group:
            return
        for j, row in enumerate(group):
            _check_row(model, row, start + j, seq_len)
        chunk = torch.stack([r.detach().to("cpu", torch.long) for r in group])
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= d_vocab:
            raise KnowlensError(
                f"token id {low if low < 0 else high} (rows {start}..{start + len(group) - 1}) "
                f"is outside the vocabulary (d_vocab={d_vocab})"
            )
        yield chunk
        start += len(group)


def _probe(
    model: Any, row: Tensor, names: tuple[str, ...], stop: int | None
) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Per-row shape of each hook (from a 1-row forward pass) and the dtype the model computes them in."""
    seen: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any, *, name: str) -> None:
        seen[name] = act

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, partial(grab, name=n)) for n in names]):
        _forward(model, row[None], stop)
    missing = [n for n in names if n not in seen]
    if missing:
        raise KnowlensError(f"hook(s) {', '.join(missing)} did not fire in a forward pass of this model")
    return {n: tuple(int(d) for d in seen[n].shape[1:]) for n in names}, seen[names[0]].dtype


def _forward(model: Any, tokens: Tensor, stop: int | None) -> None:
    mask = torch.ones_like(tokens)  # every token is real, whatever the tokenizer's padding side
    if stop is not None:
        model(tokens, attention_mask=mask, stop_at_layer=stop)
    else:
        model(tokens, attention_mask=mask, return_type="logits")


def _copy_rows(act: Tensor, hook: Any, *, buf: Tensor, window: list[int]) -> None:
    buf[window[0] : window[1]].copy_(act)


def _run_chunk(model: Any, chunk: Tensor, batch_size: int, stop: int | None, window: list[int]) -> None:
    for start in range(0, chunk.shape[0], batch_size):
        batch = chunk[start : start + batch_size]
        window[0], window[1] = start, start + batch.shape[0]
        _forward(model, batch, stop)


def _write_shard(
    index: HarvestIndex, shard_no: int, chunk: Tensor, buffers: dict[str, Tensor], digest: str
) -> ShardInfo:
    rows = int(chunk.shape[0])
    tensors = {"tokens": chunk.contiguous()}
    for name, buf in buffers.items():
        tensors[name] = buf[:rows].to("cpu").contiguous()
    name = f"shard_{shard_no:05d}.safetensors"
    path = index.out_dir / name
    sums: dict[str, str | int] = {}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"shard": str(shard_no), "tokens_sha256": digest})
        sums.update(bytes=tmp.stat().st_size, sha256=file_sha256(tmp))

    atomic_write(path, write)
    return ShardInfo(file=name, rows=rows, tokens_sha256=digest, bytes=int(sums["bytes"]), sha256=str(sums["sha256"]))


def _resume_or_start(plan: HarvestIndex, *, overwrite: bool) -> tuple[HarvestIndex, dict[int, str]]:
    """The harvest to continue in ``plan.out_dir`` and the listed shards to redo (index -> why).

    Raises KnowlensError (before anything is written) if the folder holds a harvest of other hooks,
    settings or model weights, or shards without an index; ``overwrite`` starts afresh instead.
    """
    out = plan.out_dir
    if overwrite or not (out / INDEX_NAME).exists():
        if not overwrite and out.is_dir() and any(out.glob("shard_*.safetensors")):
            raise KnowlensError(f"{out} holds shards but no {INDEX_NAME}; use another output folder or --overwrite")
        return plan, {}
    old = HarvestIndex.read(out)
    check_same_model(
        {"name": old.model.get("model_name"), "fingerprint": old.model.get("fingerprint")},
        {"name": plan.model.get("model_name"), "fingerprint": plan.model.get("fingerprint")},
        what=f"the harvest in {out}",
        error=KnowlensError,
    )
    for field in ("hooks", "dtype", "seq_len", "rows_per_shard", "shapes"):
        if getattr(old, field) != getattr(plan, field):
            raise KnowlensError(
                f"{out} holds a harvest with another {field} ({getattr(old, field)} vs "
                f"{getattr(plan, field)}); use another output folder or --overwrite"
            )
    redo = {i: why for i in range(len(old.shards)) if (why := old.shard_problem(i)) is not None}
    return replace(plan, shards=old.shards), redo


def _remove_stale_temporaries(out: Path) -> None:
    for pattern in (".shard_*.tmp", f".{INDEX_NAME}.*.tmp", "shard_*.safetensors.tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _remove_harvest_files(out: Path) -> None:
    for path in [out / INDEX_NAME, *out.glob("shard_*.safetensors")]:
        path.unlink(missing_ok=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
