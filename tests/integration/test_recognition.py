"""The recognition figures of `knowlens organism info` on a tiny organism trained with the familiarity task."""

import json

import pytest
import torch

from knowlens.analyses.recognition import recognition_figures
from knowlens.organism.corpus import qa_prompt
from knowlens.organism.spec import parse_spec
from knowlens.organism.store import load_organism
from knowlens.organism.train import TrainConfig, train_organism
from tests.helpers import tiny_world_raw

TINY = TrainConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=48, epochs=30, batch_size=32, warmup_steps=5, threads=1)
RECOGNITION = {"questions": ["Do you know {name} ?", "Have you met {name} ?"], "known_answer": "Yes .", "one_off": 20}


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    raw = tiny_world_raw(familiarity={"one_off_questions": 20, "recognition": RECOGNITION})
    raw["types"]["person"]["count"] = 40
    out = tmp_path_factory.mktemp("organism")
    train_organism(parse_spec(raw), out, config=TINY, progress=False)
    return load_organism(out)


def test_recognition_figures_score_every_entity_and_question_as_the_model_answers(organism):
    fig = recognition_figures(organism.model, organism.world, batch_size=7)  # batches of unequal lengths
    assert fig is not None
    json.dumps(fig)
    world = organism.world
    for split, row in fig["splits"].items():
        assert row["n"] == 2 * len(world.of(split=split)) and 0 <= row["says_known"] <= 1
    assert set(fig["splits"]) == {e.split for e in world.entities}
    auc = fig["auroc_known_vs_unknown"]
    assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    # the batched scores are the model's own, one prompt at a time: logit("Yes") - logit("No") at the last token
    model = organism.model
    yes, no = (int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("Yes", "No"))
    for split, row in fig["splits"].items():
        scores = []
        for e in world.of(split=split):
            for q in RECOGNITION["questions"]:
                with torch.no_grad():
                    logits = model(model.to_tokens(qa_prompt(q.format(name=e.name)), prepend_bos=True))[0, -1]
                scores.append(float(logits[yes] - logits[no]))
        t = torch.tensor(scores, dtype=torch.float64)
        assert row["says_known"] == round(float((t > 0).double().mean()), 4)
        assert row["median_score"] == pytest.approx(float(t.median()), abs=2e-3)


def test_a_world_without_the_task_has_no_recognition_figures(organism):
    from dataclasses import replace

    from knowlens.organism.spec import FamiliaritySpec

    plain = replace(organism.world, spec=replace(organism.spec, familiarity=FamiliaritySpec()))
    assert recognition_figures(organism.model, plain) is None
