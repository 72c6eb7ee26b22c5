"""Capture: a KV-cached generation loop that records hook points at every token, and forward-only harvest.

Public API (re-exports only):

* `generate(model, prompts, *, hooks, max_new_tokens, ...) -> ActivationRecord`; `StepState` (``on_step``)
* `ActivationRecord` (``.save(path)``, ``ActivationRecord.load(path)``), `concat_records(records)`
* `harvest(model, token_source, *, hooks, out_dir, batch_size, ...) -> HarvestIndex`;
  `HarvestIndex.read(out_dir)`, ``index.load_shard(i)``
* `pack_texts(model, texts, *, seq_len) -> PackedTokens`; `stream_rows(model, texts, *, seq_len, rows)`: the same
  packing, lazily, a batch of rows at a time (memory bounded by the batch)
"""

from knowlens.capture.generate import StepState, generate
from knowlens.capture.harvest import harvest
from knowlens.capture.harvest_index import HarvestIndex, ShardInfo
from knowlens.capture.record import ActivationRecord, concat_records
from knowlens.capture.tokenize import PackedTokens, pack_texts, stream_rows

__all__ = ["generate", "StepState", "ActivationRecord", "concat_records", "harvest", "HarvestIndex", "ShardInfo",
           "pack_texts", "PackedTokens", "stream_rows"]
