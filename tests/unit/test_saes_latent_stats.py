"""latent_statistics: streamed per-latent statistics equal the same figures computed on every token at once,
whatever the batching; masks and the first position are left out; stream_rows packs as pack_texts does, lazily."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from knowlens.capture import pack_texts, stream_rows
from knowlens.errors import KnowlensError
from knowlens.saes import latent_statistics
from knowlens.saes.activations import active_counts
from knowlens.saes.latent_stats import row_batches
from tests.helpers import WORDS, word_level_model

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return word_level_model()


@pytest.fixture(scope="module")
def sae(model):
    torch.manual_seed(1)
    s = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=24, metadata=SAEMetadata(hook_name=HOOK))).eval()
    with torch.no_grad():  # random weights; latents 0-3 can never fire (a dead-latent case)
        s.W_enc.normal_(0, 0.3)
        s.b_enc.normal_(0, 0.5)
        s.b_enc[:4] = -1e3
    return s


def reference(model, sae, tokens, mask):
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    feats = sae.encode(cache[HOOK]).double()
    keep = mask.clone()
    keep[:, 0] = False
    return feats[keep].detach()


def test_streamed_statistics_equal_all_at_once(model, sae):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.cfg.d_vocab, (10, 12), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[3, 7:] = False  # padding that must not count
    f = reference(model, sae, tokens, mask)
    assert 0 < int((f > 0).any(0).sum()) < f.shape[1]  # some latents fire, some never: a real test of both
    for batch in (1, 3, 10):
        s = latent_statistics(model, sae, row_batches(tokens, mask, batch))
        assert s.n_tokens == int(mask[:, 1:].sum()) == len(f)
        assert torch.equal(s.active, (f > 0).sum(0))
        torch.testing.assert_close(s.mean, f.mean(0))
        torch.testing.assert_close(s.std, f.std(0, correction=0))
        torch.testing.assert_close(s.max, f.max(0).values)
        torch.testing.assert_close(s.frequency, (f > 0).double().mean(0))
        active_mean = torch.where((f > 0).any(0), f.sum(0) / (f > 0).sum(0).clamp(min=1), 0.0)
        torch.testing.assert_close(s.mean_when_active, active_mean)
        assert torch.equal(s.dead, (f > 0).sum(0) == 0)
    counts, n = active_counts(model, sae, HOOK, tokens, mask, 4)
    assert n == len(f) and torch.equal(counts, (f > 0).sum(0))
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_plain_token_batches_count_every_position_but_the_first(model, sae):
    tokens = torch.randint(4, model.cfg.d_vocab, (4, 9), generator=torch.Generator().manual_seed(2))
    s = latent_statistics(model, sae, iter([tokens[:2], tokens[2:]]))
    assert s.n_tokens == 4 * 8
    torch.testing.assert_close(s.mean, reference(model, sae, tokens, torch.ones_like(tokens, dtype=torch.bool)).mean(0))


def test_a_wrong_hook_is_refused(model, sae):
    with pytest.raises(KnowlensError, match="blocks.9"):
        latent_statistics(model, sae, [torch.ones(1, 4, dtype=torch.long)], hook="blocks.9.hook_resid_post")


def test_stream_rows_packs_lazily_as_pack_texts(model):
    texts = [" ".join(WORDS[4 + (i * 7 + j) % 40] for j in range(3 + i % 5)) for i in range(30)]
    packed = pack_texts(model, texts, seq_len=8).tokens
    consumed = []

    def source():
        for t in texts:
            consumed.append(t)
            yield t

    stream = stream_rows(model, source(), seq_len=8, rows=3)
    first = next(stream)
    assert first.shape == (3, 8) and len(consumed) < len(texts)  # read only what the first batch needed
    got = torch.cat([first, *stream])
    assert torch.equal(got, packed)
    with pytest.raises(KnowlensError, match="rows"):
        next(stream_rows(model, texts, seq_len=8, rows=0))
