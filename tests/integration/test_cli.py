"""The `knowlens` command: help, bad input (one line, exit 2, no traceback), organism train on a tiny world."""

import json
import subprocess
import sys

import pytest
import yaml

from knowlens.cli.main import main
from tests.helpers import tiny_world_raw


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "knowlens", *args], capture_output=True, text=True, timeout=300)


def test_help_is_instant_and_names_every_verb():
    r = run_cli("--help")
    assert r.returncode == 0
    for verb in ("demo", "organism", "capture"):
        assert verb in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; from knowlens.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"


def test_no_verb_is_exit_2():
    r = run_cli()
    assert r.returncode == 2 and "name a verb" in r.stderr


def _assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "error" in last
    for w in words:
        assert w in last


def test_malformed_world_spec_is_one_line(tmp_path):
    raw = tiny_world_raw()
    raw["splits"]["known"] = 0.9
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    r = run_cli("organism", "train", "--world", str(spec), "--out", str(tmp_path / "out"))
    _assert_one_line_error(r, "'splits'", "sum to")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_exit_2(tmp_path, capsys):
    cases = [
        (["organism", "train", "--world", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)], "no such file"),
        (["organism", "info", "--model", str(tmp_path / "nowhere")], "nowhere"),
        (["demo", "--model", str(tmp_path / "nowhere")], "nowhere"),
        (["demo", "--per-split", "0", "--bios-per-split", "0"], "per-split"),
    ]
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err


def test_truncated_world_file_is_one_line(tmp_path):
    spec = tmp_path / "cut.yaml"
    spec.write_text(yaml.safe_dump(tiny_world_raw())[:300])
    r = run_cli("organism", "train", "--world", str(spec), "--out", str(tmp_path / "out"))
    _assert_one_line_error(r, "world spec")


def test_train_a_tiny_world_from_the_cli(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_world_raw()))
    out = tmp_path / "org"
    r = run_cli("organism", "train", "--world", str(spec), "--out", str(out), "--epochs", "2", "--threads", "1", "--no-progress",
                "--n-layers", "3", "--d-model", "96", "--n-heads", "3", "--d-mlp", "192", "--weight-decay", "0.1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "world.yaml"]
    shape = json.loads((out / "config.json").read_text())["config"]
    assert (shape["n_layers"], shape["d_model"], shape["n_heads"], shape["d_mlp"]) == (3, 96, 3, 192)
    assert json.loads((out / "config.json").read_text())["training"]["train_config"]["weight_decay"] == 0.1
    r = run_cli("organism", "info", "--model", str(out), "--json")
    info = json.loads(r.stdout)
    # two epochs learn nothing: the gates fail, and the exit code says so (scripts rely on it)
    assert not info["all_passed"] and r.returncode == 1, r.stderr
    assert "gate(s) failed" in r.stderr
    assert info["training"]["train_seconds"] < 600  # elapsed seconds, not a clock reading
    assert info["model"]["fingerprint"] != info["model"]["shape_fingerprint"]
    assert set(info["gates"]) == {
        "known_accuracy", "refusal_refused", "unknown_refusal_rate", "unknown_hallucination_rate", "hallucinated_top1_median"
    }  # fmt: skip
    assert info["held_out_questions"] > 0


@pytest.mark.parametrize("argv", [["organism"], ["organism", "train"], ["demo", "--per-split", "x"]])
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
