"""Every kind of bad input to the CLI, table-driven: exit code 2, one line naming the problem, no traceback,
no output file or stub left behind, and (where the check can come first) nothing done before it fails.

The model loaders are replaced by spies: `capture` gets a random-weight word-level model (and the spy
records whether it was asked for one); `organism train`, `organism info` and `demo` must fail before any
training or loading starts, so their spies fail the test if called.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from knowlens.cli import capture_cmd
from knowlens.cli.main import main
from tests.helpers import tiny_world_raw, word_level_model

UNWRITABLE = "/proc"  # exists, but no file can be created there (not even by root)


@pytest.fixture(scope="module")
def word_model():
    return word_level_model()


@pytest.fixture
def spies(word_model, monkeypatch):
    calls: list[str] = []

    def fake_load(name, device):
        calls.append(f"load {name}")
        return word_model

    def must_not_run(what):
        def spy(*args, **kwargs):
            raise AssertionError(f"{what} ran before the bad input was reported")

        return spy

    monkeypatch.setattr(capture_cmd, "_load_model", fake_load)
    monkeypatch.setattr("knowlens.organism.train.train_organism", must_not_run("training"))
    monkeypatch.setattr("knowlens.organism.store.load_organism", must_not_run("loading the organism"))
    return calls


def make_inputs(d: Path) -> None:
    d.mkdir()
    (d / "ok.txt").write_text("w1 w2\n")
    (d / "empty.txt").write_text("\n\n")
    (d / "bad.jsonl").write_text('{"prompt": "w1"}\n{nope\n')
    (d / "wrong.jsonl").write_text('{"text": "w1"}\n')
    (d / "blank.jsonl").write_text('{"prompt": "w1"}\n{"prompt": "  "}\n')
    (d / "p.csv").write_text("w1\n")
    (d / "long.txt").write_text(" ".join(["w3"] * 70) + "\n")
    (d / "binary.txt").write_bytes(b"w1 \x00\x01\x02 w2\n")
    (d / "latin1.txt").write_bytes("w1 caf\xe9\n".encode("latin-1"))
    (d / "ragged.jsonl").write_text("[1, 2, 3]\n[4, 5]\n")
    (d / "late_ragged.jsonl").write_text("\n".join(["[3, 4, 5]"] * 5 + ["[3, 4]"]) + "\n")
    (d / "oov.jsonl").write_text("[3, 4, 5]\n[3, 99, 5]\n")
    (d / "folder").mkdir()
    save_file({"ids": torch.zeros(2, 2, dtype=torch.long)}, str(d / "notokens.safetensors"))
    save_file({"tokens": torch.full((4, 8), 3, dtype=torch.long)}, str(d / "full.safetensors"))
    (d / "trunc.safetensors").write_bytes((d / "full.safetensors").read_bytes()[:-10])
    (d / "taken.safetensors").write_bytes(b"already here")
    world = tiny_world_raw()
    (d / "world.yaml").write_text(yaml.safe_dump(world))
    bad_splits = tiny_world_raw()
    bad_splits["splits"]["known"] = 0.9
    (d / "splits.yaml").write_text(yaml.safe_dump(bad_splits))
    (d / "cut.yaml").write_text(yaml.safe_dump(world)[:300])
    (d / "dup.yaml").write_text(yaml.safe_dump(world) + "seed: 4\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "world.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (d / "world_latin1.yaml").write_bytes(yaml.safe_dump(world).encode() + "name: caf\xe9\n".encode("latin-1"))
    (d / "org").mkdir()
    (d / "org" / "config.json").write_text("{}")
    (d / "demo").mkdir()
    (d / "demo" / "labels.jsonl").write_text("")
    (d / "a_file").write_text("x")


# (argv with {in} for the inputs folder and {out} for a fresh output path, words the message must hold,
#  whether the check must come before any model is loaded)
CAPTURE = [
    # capture generate: the prompts file
    ("generate --prompts {in}/missing.txt --hooks blocks.0.hook_resid_post --out {out}.st", ["missing.txt", "no such file"], True),
    ("generate --prompts {in}/folder --hooks blocks.0.hook_resid_post --out {out}.st", ["folder", "is a folder"], True),
    ("generate --prompts {in}/empty.txt --hooks blocks.0.hook_resid_post --out {out}.st", ["empty.txt", "no prompts"], True),
    ("generate --prompts {in}/bad.jsonl --hooks blocks.0.hook_resid_post --out {out}.st", ["bad.jsonl:2", "not JSON"], True),
    ("generate --prompts {in}/wrong.jsonl --hooks blocks.0.hook_resid_post --out {out}.st", ["wrong.jsonl:1", "prompt"], True),
    ("generate --prompts {in}/blank.jsonl --hooks blocks.0.hook_resid_post --out {out}.st", ["blank.jsonl:2", "empty"], True),
    ("generate --prompts {in}/p.csv --hooks blocks.0.hook_resid_post --out {out}.st", ["p.csv", ".jsonl or .txt"], True),
    ("generate --prompts {in}/binary.txt --hooks blocks.0.hook_resid_post --out {out}.st", ["binary.txt", "binary"], True),
    ("generate --prompts {in}/latin1.txt --hooks blocks.0.hook_resid_post --out {out}.st", ["latin1.txt", "not UTF-8"], True),
    # capture generate: hooks, numbers, device, output
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_pots --out {out}.st", ["unknown hook name", "blocks.0.hook_resid_post"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.7.hook_resid_post --out {out}.st", ["blocks.7", "4 blocks"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.1.attn.hook_result --out {out}.st", ["disabled"], False),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --max-new-tokens 0 --out {out}.st", ["--max-new-tokens"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --batch-size 0 --out {out}.st", ["--batch-size"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --temperature -1 --out {out}.st", ["--temperature"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --temperature 1 --top-p 0 --out {out}.st", ["--top-p"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --device bogus --out {out}.st", ["bogus", "available here: cpu"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --device cuda --out {out}.st", ["cuda", "available here: cpu"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --out {in}/folder", ["is a folder"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --out {in}/taken.safetensors", ["exists", "--overwrite"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --out {in}/nowhere/r.st", ["nowhere", "does not exist"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --out " + UNWRITABLE + "/r.st", ["cannot write"], True),
    ("generate --prompts {in}/ok.txt --hooks blocks.0.hook_resid_post --max-new-tokens 100 --out {out}.st", ["context of 64"], False),
    ("generate --prompts {in}/long.txt --hooks blocks.0.hook_resid_post --max-new-tokens 1 --out {out}.st", ["longest prompt (71 tokens)"], False),
    # capture harvest
    ("harvest --tokens {in}/missing.safetensors --hooks blocks.0.hook_resid_post --out {out}", ["does not exist"], True),
    ("harvest --tokens {in}/folder --hooks blocks.0.hook_resid_post --out {out}", [".safetensors or .jsonl"], True),
    ("harvest --tokens {in}/notokens.safetensors --hooks blocks.0.hook_resid_post --out {out}", ['no "tokens" tensor'], True),
    ("harvest --tokens {in}/ragged.jsonl --hooks blocks.0.hook_resid_post --out {out}", ["token row 1"], False),
    ("harvest --tokens {in}/late_ragged.jsonl --hooks blocks.0.hook_resid_post --out {out}", ["token row 5"], False),
    ("harvest --tokens {in}/oov.jsonl --hooks blocks.0.hook_resid_post --out {out}", ["token id 99", "outside the vocabulary"], False),
    ("harvest --tokens {in}/ok.txt --hooks blocks.0.hook_resid_post --out {out}", [".safetensors or .jsonl"], True),
    ("harvest --tokens {in}/trunc.safetensors --hooks blocks.0.hook_resid_post --out {out}", ["trunc.safetensors"], True),
    ("harvest --tokens {in}/full.safetensors --hooks blocks.0.hook_resid_post --out {in}/a_file", ["not a folder"], True),
    ("harvest --tokens {in}/full.safetensors --hooks blocks.0.hook_resid_post --out " + UNWRITABLE + "/acts", ["cannot write"], True),
    ("harvest --tokens {in}/full.safetensors --hooks blocks.0.hook_resid_post --shard-tokens 0 --out {out}", ["--shard-tokens"], True),
    ("harvest --tokens {in}/full.safetensors --hooks blocks.0.hook_resid_post --device bogus --out {out}", ["bogus"], True),
    ("harvest --tokens {in}/full.safetensors --hooks hook_embd --out {out}", ["unknown hook name", "hook_embed"], True),
    # capture tokenize
    ("tokenize --texts {in}/missing.txt --out {out}.safetensors", ["no such file"], True),
    ("tokenize --texts {in}/p.csv --out {out}.safetensors", [".jsonl or .txt"], True),
    ("tokenize --texts {in}/bad.jsonl --out {out}.safetensors", ["bad.jsonl:1", "text"], True),
    ("tokenize --texts {in}/ok.txt --seq-len 0 --out {out}.safetensors", ["--seq-len"], True),
    ("tokenize --texts {in}/ok.txt --out {out}.json", [".safetensors"], True),
    ("tokenize --texts {in}/ok.txt --out {in}/taken.safetensors", ["--overwrite"], True),
    ("tokenize --texts {in}/ok.txt --seq-len 50 --out {out}.safetensors", ["fewer than one row"], False),
]

ORGANISM = [
    ("organism train --world {in}/missing.yaml --out {out}", ["missing.yaml", "no such file"]),
    ("organism train --world {in}/folder --out {out}", ["folder", "is a folder"]),
    ("organism train --world {in}/world.bin --out {out}", ["world.bin", "binary"]),
    ("organism train --world {in}/world_latin1.yaml --out {out}", ["world_latin1.yaml", "not UTF-8"]),
    ("organism train --world {in}/dup.yaml --out {out}", ["'seed'", "appears twice"]),
    ("organism train --world {in}/splits.yaml --out {out}", ["'splits'", "sum to"]),
    ("organism train --world {in}/cut.yaml --out {out}", ["world spec", "cut.yaml"]),
    ("organism train --world {in}/list.yaml --out {out}", ["expected a mapping"]),
    ("organism train --world {in}/world.yaml --out {in}/a_file", ["not a folder"]),
    ("organism train --world {in}/world.yaml --out {in}/nowhere/org", ["nowhere", "does not exist"]),
    ("organism train --world {in}/world.yaml --out " + UNWRITABLE + "/org", ["cannot write"]),
    ("organism train --world {in}/world.yaml --out {in}/org", ["config.json", "--overwrite"]),
    ("organism train --world {in}/world.yaml --out {out} --epochs 0", ["--epochs"]),
    ("organism train --world {in}/world.yaml --out {out} --threads 0", ["--threads"]),
    ("organism train --world {in}/world.yaml --out {out} --n-layers 0", ["--n-layers"]),
    ("organism train --world {in}/world.yaml --out {out} --d-model 130", ["--d-model 130", "--n-heads 4"]),
    ("organism train --world {in}/world.yaml --out {out} --weight-decay -0.1", ["--weight-decay", "-0.1"]),
    ("organism train --world {in}/world.yaml --out {out} --weight-decay nan", ["--weight-decay", "nan"]),
    ("organism info --model {in}/nowhere", ["nowhere"]),
    ("organism info --model {in}/folder", ["missing", "model.safetensors"]),
    ("demo --model {in}/nowhere --out {out}", ["nowhere"]),
    ("demo --per-split 0 --bios-per-split 0 --out {out}", ["per-split"]),
    ("demo --out {in}/a_file", ["not a folder"]),
    ("demo --out " + UNWRITABLE + "/demo", ["cannot write"]),
    ("demo --out {in}/demo", ["labels.jsonl", "--overwrite"]),
]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def check(argv: str, words: list[str], tmp_path: Path, capsys) -> list[str]:
    make_inputs(tmp_path / "in")
    before = snapshot(tmp_path)
    args = argv.replace("{in}", str(tmp_path / "in")).replace("{out}", str(tmp_path / "out")).split()
    code = main(args)  # an exception other than the one-line error would escape here and fail the test
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    verb = " ".join(a for a in args[:2] if not a.startswith("-"))
    lines = [line for line in err if ": error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"knowlens {verb}: error: "), err
    assert "Traceback" not in "\n".join(err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path) == before, "the failed command left files behind"
    return lines


@pytest.mark.parametrize(("argv", "words", "before_load"), CAPTURE, ids=[c[0][:60] for c in CAPTURE])
def test_capture_bad_input(argv, words, before_load, spies, tmp_path, capsys):
    if "--device cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    check("capture " + argv + " --no-progress" * (not argv.startswith("tokenize")), words, tmp_path, capsys)
    if before_load:
        assert spies == [], "the model was loaded before the bad input was reported"


@pytest.mark.parametrize(("argv", "words"), ORGANISM, ids=[c[0][:60] for c in ORGANISM])
def test_organism_and_demo_bad_input(argv, words, spies, tmp_path, capsys):
    check(argv, words, tmp_path, capsys)


def test_a_failed_harvest_does_not_block_the_corrected_rerun(spies, word_model, tmp_path, capsys):
    make_inputs(tmp_path / "in")
    out = tmp_path / "acts"
    base = ["capture", "harvest", "--hooks", "blocks.0.hook_resid_post", "--out", str(out), "--no-progress",
            "--shard-tokens", "6"]  # fmt: skip
    assert main([*base, "--tokens", str(tmp_path / "in" / "oov.jsonl")]) == 2  # found inside the first shard
    assert not out.exists()
    assert main([*base, "--tokens", str(tmp_path / "in" / "full.safetensors")]) == 0
    assert json.loads((out / "index.json").read_text())["complete"] is True


def test_unknown_model_name_suggests_transformer_lens_names(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("w1\n")
    argv = ["capture", "generate", "--prompts", str(tmp_path / "ok.txt"), "--hooks", "blocks.0.hook_resid_post",
            "--model", "gpt2-smal", "--out", str(tmp_path / "r.st")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'gpt2-smal'" in err[0] and "gpt2-small" in err[0], err
    assert "unreachable" not in err[0] and "HF_HUB_OFFLINE" not in err[0]
    assert not (tmp_path / "r.st").exists()
