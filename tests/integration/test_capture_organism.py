"""Capture on the shipped model organism (`knowlens.load_model("organism")`), through the API and the CLI."""

import json

import pytest
import torch

import knowlens
from knowlens.capture import ActivationRecord, HarvestIndex, generate
from knowlens.cli.main import main

PROMPTS = [
    "Q : Where was Tobrin Vasel born ? A :",
    "Q : Who wrote it ? A :",
    "Tell me about Alda .",
]


@pytest.fixture(scope="module")
def organism():
    model, card = knowlens.load_model("organism")
    return model


def last_layer_hooks(model):
    last = model.cfg.n_layers - 1
    return [f"blocks.{last}.hook_resid_post", f"blocks.{last}.attn.hook_pattern", "blocks.0.hook_mlp_out"]


def test_organism_generation_matches_run_with_cache(organism):
    hooks = last_layer_hooks(organism)
    rec = generate(organism, PROMPTS, hooks=hooks, max_new_tokens=12)
    assert rec.eos_token_ids == (organism.tokenizer.eos_token_id,)
    for row, prompt in enumerate(PROMPTS):
        assert rec.sequence(row)[: int(rec.prompt_mask[row].sum())].tolist() == organism.to_tokens(prompt)[0].tolist()
        single = generate(organism, [prompt], hooks=hooks, max_new_tokens=12)
        assert torch.equal(single.sequence(0), rec.sequence(row))
        _, cache = organism.run_with_cache(rec.sequence(row)[None], names_filter=lambda n: n in hooks)
        for name in hooks:
            torch.testing.assert_close(rec.activation(name, row), cache[name][0], atol=1e-4, rtol=1e-4)
        generated = rec.tokens[row][rec.generated_mask[row]].tolist()
        eos = organism.tokenizer.eos_token_id
        assert eos not in generated[:-1]  # a row stops at its first EOS


def test_capture_cli_generate_and_harvest_on_the_organism(organism, tmp_path, capsys):
    hooks = last_layer_hooks(organism)[:1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "rec.safetensors"
    code = main(["capture", "generate", "--model", "organism", "--prompts", str(prompts), "--hooks", *hooks,
                 "--max-new-tokens", "8", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rec = ActivationRecord.load(out)
    assert rec.batch_size == 3 and rec.hook_names == tuple(hooks)
    assert rec.activations[hooks[0]].shape[-1] == organism.cfg.d_model

    rows = torch.randint(4, organism.cfg.d_vocab, (10, 16), generator=torch.Generator().manual_seed(0))
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text("".join(json.dumps(r) + "\n" for r in rows.tolist()))
    code = main(["capture", "harvest", "--model", "organism", "--tokens", str(tokens), "--hooks", *hooks,
                 "--out", str(tmp_path / "acts"), "--batch-size", "4", "--shard-tokens", "64", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    index = HarvestIndex.read(tmp_path / "acts")
    assert index.complete and index.rows_done == 10 and index.model["d_model"] == organism.cfg.d_model
    _, cache = organism.run_with_cache(rows, names_filter=lambda n: n in hooks)
    got = torch.cat([index.load_shard(i)[hooks[0]] for i in range(len(index.shards))])
    torch.testing.assert_close(got, cache[hooks[0]], atol=1e-4, rtol=1e-4)


def test_capture_cli_bad_hook_on_the_organism(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    code = main(["capture", "generate", "--prompts", str(prompts), "--hooks", "blocks.0.hook_resid_pots",
                 "--out", str(tmp_path / "r.safetensors"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown hook name" in err and "blocks.0.hook_resid_post" in err
