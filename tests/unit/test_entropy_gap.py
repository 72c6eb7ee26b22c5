"""entropy_gap: per-position entropy and surprisal equal a naive per-prompt recomputation (own, derangement, supplied
text and token ids, second sample), on a random model and the shipped organism; the EOS cut and the alignment; the
ratio and its cluster bootstrap as exact computations; subsets, JSON, the summary; one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from knowlens.analyses import EntropyGap, entropy_gap, format_entropy_gap
from knowlens.analyses.entropy_gap import bootstrap_ratio
from knowlens.capture import generate
from knowlens.errors import KnowlensError
from tests.helpers import build_model

PROMPTS = [[0, 5, 7], [0, 9, 3, 4, 11], [1, 2], [3, 4, 5, 6, 7, 8, 9], [10, 20, 30, 40]]
NEW = 6


@pytest.fixture(scope="module")
def model():
    return build_model(seed=1)


@pytest.fixture(scope="module")
def organism():
    from knowlens.organism.store import load_organism

    return load_organism()


def naive(model, prompt, cont) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, S) at each continuation position from one unpadded ``model(tokens)`` pass, written out longhand."""
    prompt, cont = torch.as_tensor(prompt), torch.as_tensor(cont, dtype=torch.long)
    seq = torch.cat([prompt, cont])[None]
    with torch.no_grad():
        probs = torch.softmax(model(seq)[0].double(), dim=-1)
    H, S = [], []
    for j in range(len(cont)):
        col = len(prompt) + j  # the column holding c_{j+1}
        p = probs[col]
        H.append(float(-(p * p.log()).sum()))
        S.append(float(-probs[col - 1, cont[j]].log()))
    return torch.tensor(H, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)


def check_against_naive(model, prompts, gap: EntropyGap) -> None:
    for i, prompt in enumerate(prompts):
        m = min(len(gap.own_tokens[i]), len(gap.other_tokens[i]))
        assert gap.aligned_length[i] == m and not gap.aligned[i, m:].any()
        for side in ("own", "other"):
            H, S = naive(model, prompt, getattr(gap, f"{side}_tokens")[i])
            torch.testing.assert_close(getattr(gap, f"{side}_entropy")[i, :m], H[:m], rtol=0, atol=1e-5)
            torch.testing.assert_close(getattr(gap, f"{side}_surprisal")[i, :m], S[:m], rtol=0, atol=1e-5)
            assert (getattr(gap, f"{side}_entropy")[i, m:] == 0).all()


def check_summaries(gap: EntropyGap) -> None:
    """Per-position means, ratios and counts recomputed from the per-prompt matrices."""
    for side in ("own", "other"):
        for what in ("entropy", "surprisal"):
            mat = getattr(gap, f"{side}_{what}")
            for j in range(mat.shape[1]):
                vals = mat[gap.aligned[:, j], j]
                assert int(gap.n_by_position[j]) == vals.numel()
                assert float(getattr(gap, f"{side}_{what}_by_position")[j]) == pytest.approx(float(vals.mean()))
    for what in ("entropy", "surprisal"):
        own, other = getattr(gap, f"own_{what}")[gap.aligned], getattr(gap, f"other_{what}")[gap.aligned]
        assert getattr(gap, f"{what}_ratio") == pytest.approx(float(own.mean() / other.mean()), rel=1e-12)
    assert gap.n_positions == int(gap.n_by_position.sum()) == sum(gap.aligned_length)


def test_derangement_matches_naive_recomputation_and_generate(model):
    gap = entropy_gap(model, PROMPTS, max_new_tokens=NEW, n_bootstrap=200)
    rec = generate(model, PROMPTS, hooks=(), max_new_tokens=NEW)
    perm = gap.params["derangement"]
    assert sorted(perm) == list(range(len(PROMPTS))) and all(p != i for i, p in enumerate(perm))
    for i in range(len(PROMPTS)):
        cols = rec.generated_mask[i].nonzero().flatten()
        assert gap.own_tokens[i] == tuple(rec.tokens[i, cols].tolist())  # greedy, no EOS without a tokenizer
        assert gap.other_tokens[i] == gap.own_tokens[perm[i]]
        # the KV-cached loop's log-probabilities are the teacher-forced surprisal of the model's own tokens
        torch.testing.assert_close(gap.own_surprisal[i].float(), -rec.logprobs[i, cols], rtol=0, atol=1e-4)
    check_against_naive(model, PROMPTS, gap)
    check_summaries(gap)
    assert gap.others == "derange" and gap.n_prompts == len(PROMPTS) and gap.n_positions == NEW * len(PROMPTS)


def test_supplied_others_of_other_lengths_align_on_the_shorter(model):
    others = [[1, 2], list(range(10, 20)), [7], [8] * NEW, torch.tensor([3, 3, 3, 3])]
    gap = entropy_gap(model, PROMPTS, others=others, max_new_tokens=NEW, n_bootstrap=200)
    assert gap.others == "supplied"
    assert gap.aligned_length == (2, NEW, 1, NEW, 4)
    assert gap.other_tokens[1] == tuple(range(10, 20))  # kept whole; only the aligned part is compared
    assert gap.n_by_position.tolist() == [5, 4, 3, 3, 2, 2]
    check_against_naive(model, PROMPTS, gap)
    check_summaries(gap)


def test_second_sample_is_generate_at_temperature_one(model):
    gap = entropy_gap(model, PROMPTS, others="sample", max_new_tokens=NEW, seed=3, n_bootstrap=100)
    rec = generate(model, PROMPTS, hooks=(), max_new_tokens=NEW, temperature=1.0, seed=4)
    for i in range(len(PROMPTS)):
        assert gap.other_tokens[i] == tuple(rec.tokens[i, rec.generated_mask[i]].tolist())
    check_against_naive(model, PROMPTS, gap)


def test_continuations_are_cut_before_the_first_eos(model):
    plain = entropy_gap(model, PROMPTS, max_new_tokens=NEW, n_bootstrap=50)
    eos = next(t for t in plain.own_tokens[0] if t != plain.own_tokens[0][0])  # not the first token: k >= 1
    k = plain.own_tokens[0].index(eos)
    first = (eos + 1) % model.cfg.d_vocab
    gap = entropy_gap(model, PROMPTS, others=[[first, eos, 6]] * len(PROMPTS), max_new_tokens=NEW,
                      eos_token_id=eos, n_bootstrap=50)  # fmt: skip
    for own, before in zip(gap.own_tokens, plain.own_tokens):
        cut = before.index(eos) if eos in before else len(before)
        assert own == before[:cut]  # generation stops at the EOS; it and what follows are dropped
    assert gap.own_tokens[0] == plain.own_tokens[0][:k] and k >= 1
    assert all(other == (first,) for other in gap.other_tokens)
    assert gap.aligned_length == tuple(min(len(o), 1) for o in gap.own_tokens)
    assert gap.n_empty == sum(len(o) == 0 for o in gap.own_tokens)
    check_against_naive(model, PROMPTS, gap)
    check_summaries(gap)


def test_own_text_as_other_gives_ratio_one_exactly(model):
    first = entropy_gap(model, PROMPTS, max_new_tokens=NEW, n_bootstrap=50)
    gap = entropy_gap(model, PROMPTS, others=[list(t) for t in first.own_tokens], max_new_tokens=NEW, n_bootstrap=300)
    assert gap.n_identical == len(PROMPTS)
    torch.testing.assert_close(gap.own_entropy, gap.other_entropy, rtol=0, atol=1e-12)
    assert gap.entropy_ratio == pytest.approx(1.0, abs=1e-12) and gap.surprisal_ratio == pytest.approx(1.0, abs=1e-12)
    for lo, hi in (gap.entropy_interval, gap.surprisal_interval):
        assert lo == pytest.approx(1.0, abs=1e-12) and hi == pytest.approx(1.0, abs=1e-12)


def test_bootstrap_resamples_clusters_and_stays_between_cluster_ratios():
    gen = torch.Generator().manual_seed(0)
    den = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    num = den * (0.5 + torch.rand(40, generator=gen, dtype=torch.float64))
    (lo, hi), (clo, chi) = bootstrap_ratio([(num, den), (2 * den, den)], n_bootstrap=500, confidence=0.9, seed=7)
    per = num / den
    assert float(per.min()) <= lo < hi <= float(per.max())  # weighted mediants of the per-cluster ratios
    assert clo == pytest.approx(2.0) and chi == pytest.approx(2.0)
    # the same resamples as a longhand loop: percentile of sum(num[idx]) / sum(den[idx])
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(40, (500, 40), generator=g)
    ratios = torch.tensor([float(num[r].sum() / den[r].sum()) for r in idx], dtype=torch.float64)
    q = torch.quantile(ratios, torch.tensor([0.05, 0.95], dtype=torch.float64))
    assert (lo, hi) == pytest.approx(tuple(q.tolist()), rel=1e-12)
    assert bootstrap_ratio([(num, den)], n_bootstrap=500, confidence=0.9, seed=7) == [(lo, hi)]  # seeded
    # a resample drawing only zero-denominator clusters is dropped; none left -> NaN
    nan = bootstrap_ratio([(torch.zeros(3), torch.zeros(3))], n_bootstrap=20, confidence=0.9, seed=0)[0]
    assert all(math.isnan(x) for x in nan)


def test_organism_true_answers_subset_json_and_summary(organism):
    from knowlens.organism.corpus import answer_for

    model, world = organism.model, organism.world
    items = [h for h in organism.corpus.held_out if h.attribute is not None][:8]
    prompts = [h.prompt for h in items]
    truths = [answer_for(world, world.by_name[h.entity], h.attribute) for h in items]
    gap = entropy_gap(model, prompts, others=truths, max_new_tokens=24, n_bootstrap=400)
    eos = model.tokenizer.eos_token_id
    for i, t in enumerate(truths):
        assert gap.other_tokens[i] == tuple(model.to_tokens(t, prepend_bos=False)[0].tolist())
        assert eos not in gap.own_tokens[i]
    rows = [model.to_tokens(p)[0] for p in prompts]
    check_against_naive(model, rows, gap)
    check_summaries(gap)
    lo, hi = gap.entropy_interval
    assert lo <= gap.entropy_ratio <= hi
    assert gap.surprisal_interval[0] <= gap.surprisal_ratio <= gap.surprisal_interval[1]
    # a subset is the study on those prompts alone
    sub = gap.subset([1, 3, 4])
    alone = entropy_gap(model, [prompts[i] for i in (1, 3, 4)], others=[truths[i] for i in (1, 3, 4)],
                        max_new_tokens=24, n_bootstrap=400)  # fmt: skip
    assert sub.own_tokens == alone.own_tokens and sub.other_tokens == alone.other_tokens
    assert sub.entropy_ratio == pytest.approx(alone.entropy_ratio, rel=1e-9)
    assert sub.entropy_interval == pytest.approx(alone.entropy_interval, rel=1e-9)
    whole = gap.subset(range(len(prompts)))
    assert (whole.entropy_ratio, whole.entropy_interval) == (gap.entropy_ratio, gap.entropy_interval)
    d = json.loads(json.dumps(gap.to_dict(), allow_nan=False))
    assert d["entropy"]["ratio"] == gap.entropy_ratio and d["entropy"]["interval"] == list(gap.entropy_interval)
    assert d["n_positions"] == gap.n_positions and len(d["by_position"]["n"]) == gap.aligned.shape[1]
    assert d["per_prompt"]["aligned_length"] == list(gap.aligned_length)
    text = format_entropy_gap(gap)
    assert f"{gap.entropy_ratio:.3f}" in text and f"{gap.n_prompts} prompts" in text


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "no prompts"),
        ([[0, 1], []], {}, "prompt 1 is empty"),
        ([[0, 1], [2, 3]], {"others": [[1]]}, "1 continuations for 2 prompts"),
        ([[0, 1], [2, 3]], {"others": [[1], []]}, "other continuation 1 is empty"),
        ([[0, 1], [2, 3]], {"others": [[1], [99]]}, "outside the vocabulary"),
        ([[0, 1], [2, 3]], {"others": ["a", "b"]}, "need a model with a tokenizer"),
        ([[0, 1]], {}, "at least two prompts"),
        ([[0, 1], [2, 3]], {"others": "shuffle"}, "others must be"),
        ([[0, 1], [2, 3]], {"n_bootstrap": 0}, "n_bootstrap"),
        ([[0, 1], [2, 3]], {"confidence": 1.0}, "confidence"),
        ([[0, 1], [2, 3]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([list(range(10)) * 7, [2, 3]], {}, "no room left"),
    ],
)
def test_bad_input_is_one_line(model, prompts, kwargs, message):
    with pytest.raises(KnowlensError, match=message) as err:
        entropy_gap(model, prompts, **kwargs)
    assert "\n" not in str(err.value)


def test_empty_string_prompt_is_refused(organism):
    with pytest.raises(KnowlensError, match="prompt 1 is empty"):
        entropy_gap(organism.model, ["Q : Who ? A :", ""])
