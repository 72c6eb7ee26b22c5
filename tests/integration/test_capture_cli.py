"""`knowlens capture generate|harvest` on a random-weight model with a tiny word-level tokenizer.

The model loader is replaced (monkeypatch) so these run without the shipped organism; the same verbs on
the organism itself are in test_capture_organism.py.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from knowlens.capture import ActivationRecord, HarvestIndex
from knowlens.cli import capture_cmd
from knowlens.cli.main import main
from tests.helpers import DEFAULT_MODEL_CFG

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(46)]


def tokenizer_model():
    """A random-weight HookedTransformer with a 50-word tokenizer (pad 0, bos 1, eos 2), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        name_or_path="knowlens-test-words",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**DEFAULT_MODEL_CFG, device="cpu"), tokenizer=fast)
    return model.eval()


@pytest.fixture(scope="module")
def word_model():
    return tokenizer_model()


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
    assert err and err[-1].startswith("knowlens capture: error:"), err
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


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["generate", "--prompts", "{tmp}/missing.txt"], ["missing.txt", "does not exist"]),
        (["generate", "--prompts", "{tmp}/empty.txt"], ["empty.txt", "no prompts"]),
        (["generate", "--prompts", "{tmp}/bad.jsonl"], ["bad.jsonl:2", "not JSON"]),
        (["generate", "--prompts", "{tmp}/wrong.jsonl"], ["wrong.jsonl:1", "prompt"]),
        (["generate", "--prompts", "{tmp}/p.csv"], ["p.csv", ".jsonl or .txt"]),
        (["generate", "--prompts", "{tmp}/ok.txt", "--hooks", "blocks.7.hook_resid_post"], ["unknown hook name"]),
        (["generate", "--prompts", "{tmp}/ok.txt", "--max-new-tokens", "0"], ["max_new_tokens"]),
        (["generate", "--prompts", "{tmp}/ok.txt", "--max-new-tokens", "100"], ["context of 64"]),
        (["generate", "--prompts", "{tmp}/long.txt", "--max-new-tokens", "1"], ["longest prompt (71 tokens)"]),
        (["harvest", "--tokens", "{tmp}/missing.safetensors"], ["does not exist"]),
        (["harvest", "--tokens", "{tmp}/notokens.safetensors"], ['no "tokens" tensor']),
        (["harvest", "--tokens", "{tmp}/ragged.jsonl"], ["token row 1"]),
        (["harvest", "--tokens", "{tmp}/ok.txt"], [".safetensors or .jsonl"]),
        (["harvest", "--tokens", "{tmp}/trunc.safetensors"], ["trunc.safetensors"]),
    ],
)
def test_bad_input_is_exit_2_with_one_line(cli, tmp_path, capsys, argv, words):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "w1"}\n{nope\n')
    (tmp_path / "wrong.jsonl").write_text('{"text": "w1"}\n')
    (tmp_path / "p.csv").write_text("w1\n")
    (tmp_path / "ok.txt").write_text("w1 w2\n")
    (tmp_path / "long.txt").write_text(" ".join(["w3"] * 70) + "\n")
    (tmp_path / "ragged.jsonl").write_text("[1, 2, 3]\n[4, 5]\n")
    save_file({"ids": torch.zeros(2, 2, dtype=torch.long)}, str(tmp_path / "notokens.safetensors"))
    save_file({"tokens": torch.zeros(4, 8, dtype=torch.long)}, str(tmp_path / "full.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:-10])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--hooks" not in argv:
        argv += ["--hooks", "blocks.0.hook_resid_post"]
    argv += ["--out", str(tmp_path / "out"), "--no-progress"]
    assert main(["capture", *argv]) == 2
    one_line_error(capsys, *words)


def test_no_mode_is_exit_2(capsys):
    assert main(["capture"]) == 2
    one_line_error(capsys, "name a mode")


def test_help_names_both_modes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["capture", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "harvest" in out
