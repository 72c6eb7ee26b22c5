"""`knowlens capture generate|harvest` on a random-weight model with a tiny word-level tokenizer.

The model loader is replaced (monkeypatch) so these run without the shipped organism; the same verbs on
the organism itself are in test_capture_organism.py.
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from knowlens.capture import ActivationRecord, HarvestIndex, concat_records
from knowlens.cli import capture_cmd
from knowlens.cli.main import main
from knowlens.errors import KnowlensError
from knowlens.outputs import file_mode
from tests.helpers import word_level_model


@pytest.fixture(scope="module")
def word_model():
    return word_level_model()


@pytest.fixture
def cli(word_model, monkeypatch):
    loaded = []

    def fake_load(name, device):
        loaded.append((name, device))
        return word_model

    monkeypatch.setattr(capture_cmd, "_load_model", fake_load)
    return loaded


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("knowlens capture") and ": error:" in err[-1], err
    for word in words:
        assert word in err[-1]


def test_generate_from_txt_in_batches_writes_one_record(cli, word_model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3\n\nw4\nw5 w6\n")
    out = tmp_path / "rec.safetensors"
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    code = main(["capture", "generate", "--prompts", str(prompts), "--hooks", *hooks, "--max-new-tokens", "4",
                 "--batch-size", "2", "--out", str(out), "--no-progress", "--no-stop-at-eos"])
    assert code == 0 and cli == [("organism", "cpu")]
    rec = ActivationRecord.load(out)
    assert rec.batch_size == 3 and rec.hook_names == tuple(hooks)
    assert rec.prompt_mask.sum(1).tolist() == [4, 2, 3]  # BOS + words
    assert rec.generated_mask.sum(1).tolist() == [4, 4, 4]
    for row, text in enumerate(["w1 w2 w3", "w4", "w5 w6"]):
        assert rec.sequence(row)[: rec.prompt_mask[row].sum()].tolist() == word_model.to_tokens(text)[0].tolist()
        _, cache = word_model.run_with_cache(rec.sequence(row)[None])
        torch.testing.assert_close(rec.activation(hooks[0], row), cache[hooks[0]][0], atol=1e-4, rtol=1e-4)
    assert "3 prompts" in capsys.readouterr().err


def test_generate_from_jsonl_with_text_and_token_prompts(cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w7 w8"}) + "\n" + json.dumps({"tokens": [1, 9, 10, 11]}) + "\n")
    out = tmp_path / "rec.safetensors"
    code = main(["capture", "generate", "--prompts", str(prompts), "--hooks", "hook_embed", "--max-new-tokens", "3",
                 "--temperature", "1.0", "--seed", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    rec = ActivationRecord.load(out)
    assert rec.sequence(1)[:4].tolist() == [1, 9, 10, 11]
    assert rec.meta["seed"] == "4" and rec.eos_token_ids == (2,)


def test_harvest_from_jsonl_and_safetensors_and_resume(cli, word_model, tmp_path, capsys):
    rows = torch.randint(3, 50, (9, 6), generator=torch.Generator().manual_seed(1))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows.tolist()) + "\n")
    st = tmp_path / "t.safetensors"
    save_file({"tokens": rows}, str(st))
    args = ["--hooks", "blocks.0.hook_resid_post", "--batch-size", "4", "--shard-tokens", "24", "--no-progress"]
    assert main(["capture", "harvest", "--tokens", str(jsonl), "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["capture", "harvest", "--tokens", str(st), "--out", str(tmp_path / "b"), *args]) == 0
    a, b = HarvestIndex.read(tmp_path / "a"), HarvestIndex.read(tmp_path / "b")
    assert a.complete and a.source_fingerprint == b.source_fingerprint and [s.rows for s in a.shards] == [4, 4, 1]
    _, cache = word_model.run_with_cache(rows)
    shards = torch.cat([a.load_shard(i)["blocks.0.hook_resid_post"] for i in range(3)])
    torch.testing.assert_close(shards, cache["blocks.0.hook_resid_post"], atol=1e-5, rtol=1e-5)
    # running it again resumes: nothing left to do, same index
    assert main(["capture", "harvest", "--tokens", str(st), "--out", str(tmp_path / "b"), *args]) == 0
    assert HarvestIndex.read(tmp_path / "b") == b
    assert "9 rows in 3 shards" in capsys.readouterr().err


def test_no_mode_is_exit_2(capsys):
    assert main(["capture"]) == 2
    one_line_error(capsys, "name a mode")


def test_help_names_both_modes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["capture", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "harvest" in out


def test_words_outside_the_vocabulary_are_counted_and_warned(cli, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 Zorblax w2\nw3 Zorblax qq\n")
    out = tmp_path / "rec.safetensors"
    assert main(["capture", "generate", "--prompts", str(prompts), "--hooks", "hook_embed", "--max-new-tokens", "2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "knowlens capture generate: warning: 3 word(s) (2 distinct) are not in the model's vocabulary" in err
    assert "'Zorblax'" in err and "'qq'" in err


def test_the_record_names_the_model_that_made_it(cli, word_model, tmp_path):
    from knowlens.fingerprint import model_identity

    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2\n")
    out = tmp_path / "rec.safetensors"
    assert main(["capture", "generate", "--prompts", str(prompts), "--hooks", "hook_embed", "--max-new-tokens", "2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rec = ActivationRecord.load(out)
    assert rec.model == model_identity(word_model)
    assert out.stat().st_mode & 0o777 == file_mode()
    other = replace(rec, model={**rec.model, "fingerprint": "0" * 16})
    with pytest.raises(KnowlensError, match="different models"):
        concat_records([rec, other])


def test_tokenize_makes_rows_that_harvest_reads(cli, word_model, tmp_path, capsys):
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]) + "\n")
    tokens = tmp_path / "tokens.safetensors"
    assert main(["capture", "tokenize", "--texts", str(texts), "--seq-len", "4", "--out", str(tokens)]) == 0
    err = capsys.readouterr().err
    rows = load_file(str(tokens))["tokens"]
    stream = [1, 5, 6, 7, 2, 1, 8, 9, 2, 1, 10, 11, 12, 13, 2]  # <bos> words <eos>, per text
    assert rows.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert "3 rows x 4 tokens from 3 texts; dropped the last 3 tokens" in err
    assert main(["capture", "harvest", "--tokens", str(tokens), "--hooks", "blocks.0.hook_resid_post",
                 "--out", str(tmp_path / "acts"), "--no-progress"]) == 0  # fmt: skip
    assert HarvestIndex.read(tmp_path / "acts").rows_done == 3


def test_a_truncated_shard_is_redone_on_resume_and_said(cli, tmp_path, capsys):
    rows = torch.randint(3, 50, (9, 6), generator=torch.Generator().manual_seed(1))
    st = tmp_path / "t.safetensors"
    save_file({"tokens": rows}, str(st))
    argv = ["capture", "harvest", "--tokens", str(st), "--hooks", "blocks.0.hook_resid_post", "--batch-size", "4",
            "--shard-tokens", "24", "--out", str(tmp_path / "acts"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    shard = tmp_path / "acts" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "shard 1 (shard_00001.safetensors) is 1000 bytes, expected" in err and "redoing" in err
    index = HarvestIndex.read(tmp_path / "acts")
    assert all(index.shard_problem(i) is None for i in range(len(index.shards)))
