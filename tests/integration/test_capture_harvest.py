"""Forward-only harvest: shards equal run_with_cache, disk use is as predicted, interrupted runs resume."""

import json

import pytest
import torch

from knowlens.capture import HarvestIndex, harvest
from knowlens.errors import KnowlensError, KnowlensWarning
from knowlens.fingerprint import weights_fingerprint
from knowlens.outputs import file_mode
from tests.helpers import build_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern"]


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (23, 10), generator=torch.Generator().manual_seed(0))


def no_hooks_left(model) -> bool:
    return all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def test_shards_hold_what_run_with_cache_computes(model, tokens, tmp_path):
    index = harvest(model, tokens, hooks=HOOKS, out_dir=tmp_path, batch_size=3, shard_tokens=80, progress=False)
    assert index.complete and index.rows_per_shard == 8
    assert [s.rows for s in index.shards] == [8, 8, 7]
    assert index.shapes == {HOOKS[0]: (10, 32), HOOKS[1]: (10, 4, 8), HOOKS[2]: (4, 10, 10)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in HOOKS)
    got = {name: [] for name in ["tokens", *HOOKS]}
    for i in range(len(index.shards)):
        shard = index.load_shard(i)
        for name in got:
            got[name].append(shard[name])
    assert torch.equal(torch.cat(got["tokens"]), tokens)
    for name in HOOKS:
        torch.testing.assert_close(torch.cat(got[name]), cache[name], atol=1e-5, rtol=1e-5)
    assert no_hooks_left(model)
    assert HarvestIndex.read(tmp_path) == index


def test_disk_use_is_as_predicted(model, tokens, tmp_path):
    index = harvest(model, tokens, hooks=HOOKS, out_dir=tmp_path, batch_size=4, shard_tokens=100, progress=False)
    per_row = 10 * 8 + (10 * 32 + 10 * 4 * 8 + 4 * 10 * 10) * 4
    assert index.bytes_per_row == per_row
    assert index.expected_bytes == 23 * per_row
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard_*.safetensors"))
    assert index.expected_bytes <= on_disk <= index.expected_bytes + 1024 * len(index.shards)
    data = json.loads((tmp_path / "index.json").read_text())
    assert data["expected_bytes"] == index.expected_bytes and data["source_fingerprint"]


def test_float16_storage_halves_activation_bytes(model, tokens, tmp_path):
    index = harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=8, dtype=torch.float16, progress=False)
    assert index.dtype == "float16" and index.bytes_per_row == 10 * 8 + 10 * 32 * 2
    assert index.load_shard(0)[HOOKS[0]].dtype == torch.float16


def test_stops_at_the_last_needed_layer(model, tokens, tmp_path):
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.append(1))]):
        harvest(model, tokens, hooks=["blocks.0.hook_mlp_out"], out_dir=tmp_path, batch_size=8, progress=False)
    assert seen == []  # block 1 never ran


def test_interrupted_harvest_resumes_where_it_stopped(model, tokens, tmp_path):
    class Interrupted(Exception):
        pass

    def crashing_source():
        for i, row in enumerate(tokens):
            if i == 19:
                raise Interrupted()
            yield row.tolist()

    with pytest.raises(Interrupted):
        harvest(model, crashing_source(), hooks=HOOKS, out_dir=tmp_path, batch_size=3, shard_tokens=50, progress=False)
    partial = HarvestIndex.read(tmp_path)
    assert not partial.complete and [s.rows for s in partial.shards] == [5, 5, 5]
    assert no_hooks_left(model)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.safetensors")}
    (tmp_path / "shard_00003.safetensors.tmp").write_bytes(b"half-written")  # a crash mid-write

    forwards = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: forwards.append(a.shape[0]))]):
        index = harvest(model, tokens, hooks=HOOKS, out_dir=tmp_path, batch_size=3, shard_tokens=50, progress=False)
    assert sum(forwards) == 1 + 23 - 15  # a 1-row shape probe, then only the rows not yet written
    assert index.complete and [s.rows for s in index.shards] == [5, 5, 5, 5, 3]
    for name, mtime in mtimes.items():
        assert (tmp_path / name).stat().st_mtime_ns == mtime  # finished shards were not rewritten
    assert not list(tmp_path.glob("*.tmp"))
    fresh = harvest(model, tokens, hooks=HOOKS, out_dir=tmp_path / "fresh", batch_size=3, shard_tokens=50, progress=False)
    assert fresh.source_fingerprint == index.source_fingerprint
    for i in range(5):
        a, b = index.load_shard(i), fresh.load_shard(i)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_shard_is_redone(model, tokens, tmp_path):
    harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    (tmp_path / "shard_00002.safetensors").unlink()
    index = harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    assert index.complete and len(index.shards) == 5
    assert (tmp_path / "shard_00002.safetensors").is_file()


def test_refuses_to_mix_harvests(model, tokens, tmp_path):
    harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    with pytest.raises(KnowlensError, match="another hooks"):
        harvest(model, tokens, hooks=HOOKS[:2], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    with pytest.raises(KnowlensError, match="another rows_per_shard"):
        harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=100, progress=False)
    other = tokens.flip(0)
    with pytest.raises(KnowlensError, match="other tokens"):
        harvest(model, other, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    with pytest.raises(KnowlensError, match="more rows"):
        harvest(model, tokens[:10], hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (torch.zeros(0, 5, dtype=torch.long), "empty"),
        ([], "empty"),
        (torch.zeros(4, dtype=torch.long), "2-D"),
        (torch.zeros(2, 3), "integer ids"),
        ([[1, 2, 3], [4, 5]], "token row 1 has shape"),
        ([[1, 2, 3], [4, 5, 77]], "token id 77"),
        (torch.zeros(2, 65, dtype=torch.long), "more than the model's context"),
    ],
)
def test_bad_token_sources(model, tmp_path, source, match):
    with pytest.raises(KnowlensError, match=match):
        harvest(model, source, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=2, progress=False)
    assert no_hooks_left(model)


def test_needs_a_hook_and_a_readable_index(model, tokens, tmp_path):
    with pytest.raises(KnowlensError, match="at least one hook"):
        harvest(model, tokens, hooks=[], out_dir=tmp_path, batch_size=2, progress=False)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(KnowlensError, match="index.json"):
        HarvestIndex.read(tmp_path)
    with pytest.raises(KnowlensError, match="does not exist"):
        HarvestIndex.read(tmp_path / "nowhere")


def _shards(index):
    return [index.load_shard(i) for i in range(len(index.shards))]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_detected_and_redone(model, tokens, tmp_path, damage):
    kwargs = dict(hooks=HOOKS[:2], batch_size=4, shard_tokens=50, progress=False)
    first = harvest(model, tokens, out_dir=tmp_path / "a", **kwargs)
    shard = tmp_path / "a" / first.shards[1].file
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:1000])
    else:  # same size, one byte of the activations changed: only the checksum can tell
        shard.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    untouched = (tmp_path / "a" / first.shards[0].file).stat().st_mtime_ns
    with pytest.warns(KnowlensWarning, match=r"shard 1 \(shard_00001.safetensors\) is .*redoing it"):
        again = harvest(model, tokens, out_dir=tmp_path / "a", **kwargs)
    # the redone shard holds the same tensors (its file checksum may differ: safetensors writes its
    # metadata map in no fixed order)
    assert [(s.rows, s.tokens_sha256, s.bytes) for s in again.shards] == [
        (s.rows, s.tokens_sha256, s.bytes) for s in first.shards
    ]
    assert again.shard_problem(1) is None and again.complete
    assert (tmp_path / "a" / first.shards[0].file).stat().st_mtime_ns == untouched
    fresh = harvest(model, tokens, out_dir=tmp_path / "b", **kwargs)
    for x, y in zip(_shards(again), _shards(fresh)):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_resuming_with_another_models_weights_is_refused(model, tokens, tmp_path):
    kwargs = dict(hooks=HOOKS[:1], batch_size=4, shard_tokens=50, progress=False)

    def stop_after_two_shards():
        for i, row in enumerate(tokens):
            if i == 10:
                raise KeyboardInterrupt
            yield row

    with pytest.raises(KeyboardInterrupt):
        harvest(model, stop_after_two_shards(), out_dir=tmp_path, **kwargs)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    other = build_model(seed=7)  # same shape, other weights
    with pytest.raises(KnowlensError) as info:
        harvest(other, tokens, out_dir=tmp_path, **kwargs)
    mine, theirs = HarvestIndex.read(tmp_path).model["fingerprint"], weights_fingerprint(other)
    assert mine != theirs and mine in str(info.value) and theirs in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # the same model resumes; --overwrite-style restart with the other model works too
    assert harvest(model, tokens, out_dir=tmp_path, **kwargs).complete
    redone = harvest(other, tokens, out_dir=tmp_path, overwrite=True, **kwargs)
    assert redone.complete and redone.model["fingerprint"] == theirs


def test_index_and_shards_get_the_same_permissions(model, tokens, tmp_path):
    harvest(model, tokens, hooks=HOOKS[:1], out_dir=tmp_path, batch_size=4, shard_tokens=50, progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {file_mode()}, modes
