"""locate_entity_known: its statistics equal a naive recomputation (per-type minimum, held-out AUROC); a latent
planted on known names ranks first and the frequency filter drops one that is also generic; FeatureSet round trip
and refusals; contrast sets: the JSONL loader's errors, fabricated names never in the training texts, the name
extractor, self-generated entities; no hook left behind."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from knowlens.errors import KnowlensError
from knowlens.saes import (
    EntitySet,
    FeatureSet,
    capitalised_names,
    fabricated_names,
    load_contrast_jsonl,
    load_entity_list,
    locate_entity_known,
    self_generated_entities,
)
from knowlens.saes.contrast import first_sentence
from knowlens.saes.entity import entity_prompts, entity_residuals
from knowlens.saes.stats import auroc, auroc_interval, column_aurocs, welch_t
from tests.helpers import build_model, word_level_model

KNOWN = [f"w{i} w{i + 1}" for i in range(20, 32, 2)]  # last name tokens w21, w23, ... w31
UNKNOWN = [f"w{i} w{i + 1}" for i in range(32, 44, 2)]  # w33 ... w43
TEMPLATES = ("w5 w6 {name} w7", "w8 {name} w9")
HOOK = "blocks.1.hook_resid_post"


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


def word_id(model, word: str) -> int:
    return int(model.tokenizer.convert_tokens_to_ids(word))


@pytest.fixture(scope="module")
def model():
    return word_level_model()


def random_sae(d_sae=24, seed=0):
    torch.manual_seed(seed)
    return StandardSAE(StandardSAEConfig(d_in=32, d_sae=d_sae, metadata=SAEMetadata(hook_name=HOOK))).eval()


def planted_sae(model):
    """An SAE on hook_embed (the activation is the token's embedding row) whose latents are functions of the token:
    3 fires on the last token of every known name, 4 on every unknown one's, 7 (constant 5.0: an infinite Welch t)
    on known last tokens *and* on the template word w5 (a generic token), 0 on every token."""
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=12, metadata=SAEMetadata(hook_name="hook_embed"))).eval()
    emb = model.W_E.detach()
    known_last = {word_id(model, n.split()[1]) for n in KNOWN}
    unknown_last = {word_id(model, n.split()[1]) for n in UNKNOWN}
    w5 = word_id(model, "w5")

    def encode(x):
        tok = torch.cdist(x.reshape(-1, x.shape[-1]).float(), emb.float()).argmin(-1).reshape(x.shape[:-1])
        out = torch.zeros(*x.shape[:-1], 12, dtype=x.dtype)
        is_known = torch.isin(tok, torch.tensor(sorted(known_last)))
        out[..., 3] = is_known * (2.0 + (tok % 3))  # varies: a finite Welch t
        out[..., 4] = torch.isin(tok, torch.tensor(sorted(unknown_last))) * 1.5
        out[..., 7] = (is_known | (tok == w5)) * 5.0
        out[..., 0] = 1.0
        return out

    sae.encode = encode
    return sae


def test_statistics_equal_a_naive_recomputation(model):
    sae = random_sae()
    types_k, types_u = ["a", "b"] * 3, ["a", "b", "b", "a", "a", "b"]
    known = EntitySet(names=tuple(KNOWN), types=tuple(types_k))
    unknown = EntitySet(names=tuple(UNKNOWN), types=tuple(types_u))
    found = locate_entity_known(model, sae, known, unknown, templates=TEMPLATES, max_frequency=1.0, top=5,
                                holdout=0.5, seed=3, batch_size=5, rank_by="separation")  # fmt: skip
    assert set(found) == {("name", "known"), ("name", "unknown"), ("answer", "known"), ("answer", "unknown")}
    held = found["name", "known"].params["heldout"]
    assert len(held["known"]) == 2 and len(held["unknown"]) == 2  # a half of each (side, type) stratum of 3
    names, kinds = KNOWN + UNKNOWN, types_k + types_u
    generic_on, generic_n = torch.zeros(24), 0
    per_pos: dict[str, dict[str, torch.Tensor]] = {"name": {}, "answer": {}}
    with torch.no_grad():
        for name in names:  # one prompt at a time, no padding: the reference
            rows = {"name": [], "answer": []}
            for t in TEMPLATES:
                text = t.format(name=name)
                toks = model.to_tokens(text)
                _, cache = model.run_with_cache(toks)
                feats = sae.encode(cache[HOOK][0])  # (pos, d_sae)
                words = ["<bos>", *text.split()]
                last_name = words.index(name.split()[1])
                rows["name"].append(feats[last_name])
                rows["answer"].append(feats[-1])
                generic = [i for i, w in enumerate(words) if i > 0 and i < len(words) - 1 and w not in name.split()]
                generic_on += (feats[generic] > 0).float().sum(0)
                generic_n += len(generic)
            for pos in rows:
                per_pos[pos][name] = torch.stack(rows[pos]).double()
    for pos in ("name", "answer"):
        fs = found[pos, "known"]
        pick = [n for n in names if n not in held["known"] + held["unknown"]]
        a = {n: per_pos[pos][n].mean(0) for n in names}
        on = {n: (per_pos[pos][n] > 0).double().mean(0) for n in names}
        pk = [n for n in pick if n in KNOWN]
        pu = [n for n in pick if n in UNKNOWN]
        for j in range(24):
            f_k = sum(float(on[n][j]) for n in pk) / len(pk)
            f_u = sum(float(on[n][j]) for n in pu) / len(pu)
            by_type = []
            for t in ("a", "b"):
                kt = [n for n in pk if kinds[names.index(n)] == t]
                ut = [n for n in pu if kinds[names.index(n)] == t]
                by_type.append(sum(float(on[n][j]) for n in kt) / len(kt) - sum(float(on[n][j]) for n in ut) / len(ut))
            assert float(fs.per_latent["f_known"][j]) == pytest.approx(f_k)
            assert float(fs.per_latent["f_unknown"][j]) == pytest.approx(f_u)
            assert float(fs.per_latent["s_known"][j]) == pytest.approx(min(by_type))
            assert float(fs.per_latent["s_unknown"][j]) == pytest.approx(min(-x for x in by_type))
            xk, xu = [float(a[n][j]) for n in pk], [float(a[n][j]) for n in pu]
            assert float(fs.per_latent["mean_diff"][j]) == pytest.approx(sum(xk) / len(xk) - sum(xu) / len(xu), abs=1e-6)
            vk = sum((x - sum(xk) / len(xk)) ** 2 for x in xk) / (len(xk) - 1)
            vu = sum((x - sum(xu) / len(xu)) ** 2 for x in xu) / (len(xu) - 1)
            if vk + vu > 0:
                want_t = (sum(xk) / len(xk) - sum(xu) / len(xu)) / math.sqrt(vk / len(xk) + vu / len(xu))
                assert float(fs.per_latent["welch_t"][j]) == pytest.approx(want_t, rel=1e-5, abs=1e-6)
            assert float(fs.per_latent["generic_frequency"][j]) == pytest.approx(float(generic_on[j]) / generic_n)
            by_type_auc = []  # Mann-Whitney AUROC of the mean activation within each type, known vs unknown
            for t in ("a", "b"):
                kt = [float(a[n][j]) for n in pk if kinds[names.index(n)] == t]
                ut = [float(a[n][j]) for n in pu if kinds[names.index(n)] == t]
                by_type_auc.append(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in kt for y in ut) / (len(kt) * len(ut)))
            assert float(fs.per_latent["auroc_known"][j]) == pytest.approx(min(by_type_auc))
            assert float(fs.per_latent["auroc_unknown"][j]) == pytest.approx(min(1 - x for x in by_type_auc))
        # ranked by s_known, ties by t; scores are the ranked latents' s_known; held-out AUROC by pair counting
        s = fs.per_latent["s_known"]
        assert fs.scores.tolist() == s[fs.latents].tolist()
        assert all(fs.scores[i] >= fs.scores[i + 1] for i in range(len(fs) - 1))
        assert float(fs.scores[0]) == float(s.max())
        for j, got in zip(fs.latents.tolist(), fs.heldout_auroc.tolist()):
            pairs = [(float(a[k][j]), float(a[u][j])) for k in held["known"] for u in held["unknown"]]
            want = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)
            assert got == pytest.approx(want)
        torch.testing.assert_close(fs.decoder, sae.W_dec.detach()[fs.latents])
    assert hooks_left(model) == []


def test_planted_latent_ranks_first_and_the_filter_drops_a_generic_one(model):
    sae = planted_sae(model)
    found = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, max_frequency=0.02, top=3)
    fk, fu = found["name", "known"], found["name", "unknown"]
    assert fk.latents[0] == 3 and float(fk.scores[0]) == 1.0 and float(fk.heldout_auroc[0]) == 1.0
    assert fu.latents[0] == 4 and float(fu.heldout_auroc[0]) == 1.0
    assert 7 not in fk.latents.tolist() and 0 not in fk.latents.tolist()
    assert float(fk.per_latent["generic_frequency"][7]) == pytest.approx(1 / 3)  # w5 of w5, w6, w8
    assert float(fk.per_latent["generic_frequency"][0]) == 1.0
    assert fk.params["n_kept_latents"] == 10
    # no filter: the generic latent separates as well and has the larger t (constant 5.0): it ranks first
    loose = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, max_frequency=1.0, top=3)
    assert loose["name", "known"].latents[:2].tolist() == [7, 3]
    by_t = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, max_frequency=1.0, rank_by="welch_t")
    assert by_t["name", "known"].latents[0] == 7 and float(by_t["name", "known"].scores[0]) == math.inf
    by_auc = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, max_frequency=0.02, rank_by="auroc")
    assert by_auc["name", "known"].latents[0] == 3 and float(by_auc["name", "known"].scores[0]) == 1.0
    assert by_auc["name", "unknown"].latents[0] == 4
    # a generic sample given explicitly: w5 absent from it, so latent 7 is kept
    gen = torch.tensor([[1] + [word_id(model, f"w{i}") for i in (10, 11, 12, 13)]] * 3)
    given = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, generic_tokens=gen, top=3)
    assert given["name", "known"].latents[:2].tolist() == [7, 3]
    assert given["name", "known"].params["n_generic_tokens"] == 12
    assert hooks_left(model) == []


def test_types_take_the_minimum_over_types(model):
    sae = planted_sae(model)  # a type on one side only ("c") is left out of the minimum over types
    known = EntitySet(names=tuple(KNOWN), types=("a", "a", "a", "b", "b", "c"))
    unknown = EntitySet(names=tuple(UNKNOWN), types=("a", "a", "a", "b", "b", "b"))
    found = locate_entity_known(model, sae, known, unknown, templates=TEMPLATES, top=2, holdout=0)
    fs = found["name", "known"]
    assert fs.params["types_compared"] == ["a", "b"]
    assert fs.latents[0] == 3 and fs.heldout_auroc.isnan().all()


def test_feature_set_round_trip_and_refusals(model, tmp_path):
    found = locate_entity_known(model, random_sae(), KNOWN, UNKNOWN, templates=TEMPLATES, top=4, max_frequency=1.0)
    fs = found["answer", "unknown"]
    path = fs.save(tmp_path / "fs")
    assert path.name == "fs.safetensors" and (tmp_path / "fs.json").is_file()
    back = FeatureSet.load(path, model=model)
    for name in ("latents", "scores", "decoder", "heldout_auroc"):
        torch.testing.assert_close(getattr(back, name), getattr(fs, name))
    assert back.per_latent.keys() == fs.per_latent.keys()
    for k in fs.per_latent:
        torch.testing.assert_close(back.per_latent[k], fs.per_latent[k])
    assert (back.hook, back.sae_label, back.name, back.position) == (fs.hook, fs.sae_label, "entity-unknown", "answer")
    assert back.contrast == fs.contrast and back.contrast["known"]["names"] == KNOWN
    assert back.params["templates"] == list(TEMPLATES) and back.model == fs.model

    other = build_model(d_vocab=50, seed=1)
    with pytest.raises(KnowlensError, match="fingerprint"):
        FeatureSet.load(path, model=other)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KnowlensError, match="truncated or replaced"):
        FeatureSet.load(path)
    path.write_bytes(data)
    card = json.loads((tmp_path / "fs.json").read_text())
    (tmp_path / "fs.json").write_text(json.dumps({**card, "format": "something else"}))
    with pytest.raises(KnowlensError, match="not a knowlens.feature_set card"):
        FeatureSet.load(path)
    (tmp_path / "fs.json").write_text("{")
    with pytest.raises(KnowlensError, match="not a readable JSON card"):
        FeatureSet.load(path)
    with pytest.raises(KnowlensError, match="no such file"):
        FeatureSet.load(tmp_path / "missing")


def test_no_hook_left_after_an_exception(model):
    sae = random_sae()

    def boom(x):
        raise RuntimeError("encode failed")

    sae.encode = boom
    with pytest.raises(RuntimeError, match="encode failed"):
        locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES)
    assert hooks_left(model) == []


def test_bad_arguments_are_one_line_errors(model):
    sae = random_sae()
    cases = [
        (dict(known=KNOWN, unknown=[KNOWN[0], UNKNOWN[0]]), "in both"),
        (dict(known=KNOWN[:1], unknown=UNKNOWN), "2 or more"),
        (dict(templates=("no name here",)), "exactly once"),
        (dict(positions=("middle",)), "positions"),
        (dict(rank_by="luck"), "rank_by"),
        (dict(holdout=1.0), "holdout"),
        (dict(max_frequency=2.0), "max_frequency"),
        (dict(known=KNOWN[:2], unknown=UNKNOWN[:2], holdout=0.5), None),  # one to pick, one held out: fine
        (dict(templates=("{name}",)), "generic token sample is empty"),
    ]
    for overrides, match in cases:
        kw = {"known": KNOWN, "unknown": UNKNOWN, "templates": TEMPLATES, **overrides}
        known, unknown = kw.pop("known"), kw.pop("unknown")
        if match is None:
            locate_entity_known(model, sae, known, unknown, **kw)
            continue
        with pytest.raises(KnowlensError, match=match) as err:
            locate_entity_known(model, sae, known, unknown, **kw)
        assert "\n" not in str(err.value)
    assert hooks_left(model) == []


def test_prompt_spans_cover_the_name(model):
    rows, spans = entity_prompts(model, ["w20 w21"], ("w5 w6 {name} w7", "{name}"))
    b, w = 1, {f"w{i}": word_id(model, f"w{i}") for i in (5, 6, 7, 20, 21)}
    assert rows == [[b, w["w5"], w["w6"], w["w20"], w["w21"], w["w7"]], [b, w["w20"], w["w21"]]]
    assert spans == [(3, 4), (1, 2)]


def test_stats_helpers():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    t = welch_t(torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert float(t[0]) == pytest.approx((3 - 0.5) / math.sqrt(4 / 3 + 0.5 / 2))
    assert float(t[1]) == math.inf


# -------------------------------------------------------------------------------------------- contrast sets


def test_contrast_jsonl_loader(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"name": "Tav Pel", "label": "known", "type": "person"}\n\n'
                    '{"name": "Ros Wen", "label": "known", "type": "city"}\n'
                    '{"name": "Zed Nim", "label": "unknown", "type": "city", "note": "x"}\n')  # fmt: skip
    c = load_contrast_jsonl(good)
    assert c.known.names == ("Tav Pel", "Ros Wen") and c.known.types == ("person", "city")
    assert c.unknown.names == ("Zed Nim",) and c.known.method == "user list"
    cases = {
        'not json\n': ":1: not JSON",
        '{"label": "known"}\n': ':1: "name"',
        '{"name": "A B", "label": "known"}\n{"name": "C D", "label": "maybe"}\n': ':2: "label"',
        '{"name": "A B", "label": "known"}\n{"name": "A B", "label": "unknown"}\n': ":2: 'A B' is listed again (first on line 1)",
        '["A B"]\n': ":1: expected an object",
        '{"name": "A B", "label": "known", "type": 3}\n': ':1: "type"',
        '{"name": "A B", "label": "known"}\n': "no unknown entities",
        '{"name": "A B", "label": "known", "type": "x"}\n{"name": "C D", "label": "known"}\n'
        '{"name": "E F", "label": "unknown"}\n': "some known entities have a type",
    }
    for text, match in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(KnowlensError, match=re.escape(match)) as err:
            load_contrast_jsonl(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(KnowlensError, match="no such file"):
        load_contrast_jsonl(tmp_path / "missing.jsonl")
    txt = tmp_path / "known.txt"
    txt.write_text("Tav Pel\nRos Wen\n")
    assert load_entity_list(txt, "known").names == ("Tav Pel", "Ros Wen")
    one = tmp_path / "one.jsonl"
    one.write_text('{"name": "Tav Pel"}\n{"name": "Ros Wen", "label": "unknown"}\n')
    with pytest.raises(KnowlensError, match=":2: labelled 'unknown' in a list of known entities"):
        load_entity_list(one, "known")


def test_fabricated_names_never_occur_in_the_excluded_texts():
    pieces = ["Ab", "Bel", "Cor", "Dav", "Elm", "Fen"]
    texts = ["Ab Bel was born in Cor Dav .", "The river of Elm Fen is cold .", "Q : Who wrote Bel Ab ? A : Fen Cor Ab"]
    got = fabricated_names(n=40, pieces=pieces, seed=1, lengths=(2, 3), exclude_texts=texts, exclude_names=["Dav Ab"])
    words = [t.split() for t in texts]
    runs = {" ".join(w[i:j]) for w in words for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
    assert got.names and not set(got.names) & runs
    assert got.rejected and set(got.rejected) <= runs
    assert {"Ab Bel", "Cor Dav", "Elm Fen", "Bel Ab", "Fen Cor", "Cor Ab", "Fen Cor Ab"} >= set(got.rejected)
    assert "Dav Ab" not in got.names
    assert all(len(n.split()) in (2, 3) and len(set(n.split())) == len(n.split()) for n in got.names)
    assert len(set(got.names)) == len(got.names) == 40  # 30 pairs + 120 triples, less the rejected: enough
    assert fabricated_names(n=40, pieces=pieces, seed=1, lengths=(2, 3), exclude_texts=texts,
                            exclude_names=["Dav Ab"]) == got  # fmt: skip
    assert got.params["checked_against"] == "3 training texts"
    # the lengths follow the list even where one length is mostly rejected: 2 of 30 pairs left, triples plentiful
    pairs_taken = [f"{a} {b}" for a in pieces for b in pieces if a != b and (a, b) not in (("Ab", "Bel"), ("Cor", "Dav"))]
    mixed = fabricated_names(n=8, pieces=pieces, seed=0, lengths=(2, 2, 3, 3), exclude_texts=pairs_taken)
    assert sorted(len(n.split()) for n in mixed.names) == [2, 2, 3, 3, 3, 3]  # not 6 triples for 2 pairs
    assert mixed.params["not_found_by_length"] == {"2": 2}
    small = fabricated_names(n=50, pieces=["Ab", "Bel"], seed=0, exclude_texts=["Ab Bel"])
    assert small.names == ("Bel Ab",) and small.rejected == ("Ab Bel",)  # fewer than asked when none are left
    with pytest.raises(KnowlensError, match="lengths"):
        fabricated_names(n=3, pieces=["Ab", "Bel"], lengths=(3,))


def test_capitalised_names_drop_sentence_openers():
    texts = ["The birthplace of Tav Pel is Ros Wen .", "By trade Mor Tav is a smith .", "By Wen Cal Ost was here",
             "Q : Who or what is Ab Cor ? A : Ab Cor was born in Ketheria .", "I know Zed ."]  # fmt: skip
    assert capitalised_names(texts) == ["Tav Pel", "Ros Wen", "Mor Tav", "Wen Cal Ost", "Ab Cor", "Ab Cor"]
    assert "Ketheria" in capitalised_names(texts, min_words=1)
    # a piece that once starts a garbled sentence ("Fal was born") but mostly sits in names is no opener
    garbled = ["Fal was born in Ros Wen .", "Fal Ros lies in Kel Ost .", "Cor Fal is a smith ."]
    assert capitalised_names(garbled) == ["Ros Wen", "Fal Ros", "Kel Ost", "Cor Fal"]
    assert capitalised_names([*garbled, "Fal was here .", "Fal is there ."]) == ["Ros Wen", "Kel Ost", "Cor Fal"]  # mostly an opener now
    assert first_sentence("  was born in\nRos Wen . Ros Wen lies") == "was born in Ros Wen ."
    assert first_sentence("no end") == "no end"


def test_self_generated_entities_machinery(model):
    def pairs(texts):  # any two leading words of a text "name" an entity in this random model
        return [" ".join(t.split()[:2]) for t in texts if len(t.split()) >= 2 and "<" not in t]

    kw = dict(n_samples=12, k=4, max_new_tokens=5, continuation_tokens=4, extract=pairs, rounds=2, max_candidates=10)
    a = self_generated_entities(model, threshold=0.0, seed=0, **kw)
    assert a == self_generated_entities(model, threshold=0.0, seed=0, **kw)  # deterministic for a seed
    assert 0 < len(a.names) <= 10 and not a.rejected and a.method == "self-generated"
    assert all(0 < s <= 1 for s in a.scores) and list(a.scores) == sorted(a.scores, reverse=True)
    assert a.params["n_candidates"] == len(a.names)
    strict = self_generated_entities(model, threshold=1.0, seed=0, **kw)
    assert set(strict.names) | set(strict.rejected) == set(a.names)
    assert all(s == 1.0 for s in strict.scores)
    with pytest.raises(KnowlensError, match="threshold"):
        self_generated_entities(model, threshold=1.5)
    assert hooks_left(model) == []


def test_entity_sets_are_checked():
    with pytest.raises(KnowlensError, match="more than once"):
        EntitySet(names=("A B", "A B"))
    with pytest.raises(KnowlensError, match="not a name"):
        EntitySet(names=("A B", " "))
    with pytest.raises(KnowlensError, match="2 types for 1 names"):
        EntitySet(names=("A B",), types=("x", "y"))
    s = EntitySet(names=("A B", "C D"), types=("x", "y"), scores=(0.5, 1.0), rejected=("E F",), params={"k": 1})
    assert EntitySet.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert list(itertools.islice(s.names, 1)) == ["A B"]


def test_auroc_interval_brackets_the_auroc_and_narrows_with_more_entities():
    gen = torch.Generator().manual_seed(0)

    def draw(n):
        labels = torch.arange(n) % 3 == 0
        return torch.randn(n, generator=gen) + 1.0 * labels, labels

    s, y = draw(60)
    lo, hi = auroc_interval(s, y, n=400, seed=1)
    assert lo < auroc(s, y) < hi and 0 <= lo and hi <= 1
    assert auroc_interval(s, y, n=400, seed=1) == (lo, hi)  # seeded
    s2, y2 = draw(600)
    lo2, hi2 = auroc_interval(s2, y2, n=400, seed=1)
    assert hi2 - lo2 < 0.6 * (hi - lo)
    perfect = torch.arange(10.0)
    assert auroc_interval(perfect, perfect >= 5, n=50) == (1.0, 1.0)
    assert all(math.isnan(v) for v in auroc_interval(perfect, torch.zeros(10, dtype=torch.bool), n=50))


def test_entity_residuals_are_the_hook_activation_at_each_position(model):
    names = KNOWN[:3] + UNKNOWN[:2]
    res = entity_residuals(model, HOOK, names, templates=TEMPLATES, batch_size=2)
    assert set(res) == {"name", "answer"} and res["name"].shape == (len(names), len(TEMPLATES), 32)
    with torch.no_grad():
        for i, name in enumerate(names):
            for j, t in enumerate(TEMPLATES):
                text = t.format(name=name)
                _, cache = model.run_with_cache(model.to_tokens(text))
                words = ["<bos>", *text.split()]
                act = cache[HOOK][0]
                torch.testing.assert_close(res["name"][i, j], act[words.index(name.split()[1])].float())
                torch.testing.assert_close(res["answer"][i, j], act[-1].float())
    assert hooks_left(model) == []


def test_column_aurocs_match_the_mann_whitney_auroc_per_column():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (23, 9), generator=gen).double()  # small integers: many ties
    y = torch.rand(23, generator=gen) < 0.4
    got = column_aurocs(a, y)
    assert got.tolist() == pytest.approx([auroc(a[:, j], y) for j in range(9)])
    assert torch.isnan(column_aurocs(a, torch.ones(23, dtype=torch.bool))).all()
