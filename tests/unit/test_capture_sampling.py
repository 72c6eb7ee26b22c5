"""Next-token choice and the statistics of the model's own next-token distribution."""

import math

import torch

from knowlens.capture.sampling import choose_next, next_token_stats


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    assert choose_next(logits, temperature=0.0, top_p=None, generator=None).tolist() == [1, 0]


def test_seeded_sampling_repeats_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    draw = lambda seed: choose_next(  # noqa: E731
        logits, temperature=1.0, top_p=None, generator=torch.Generator().manual_seed(seed)
    )
    a, b = draw(1), draw(1)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3000, 1)
    out = choose_next(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    freq = (out == 0).float().mean().item()
    assert abs(freq - 0.5 / 0.8) < 0.04


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.6, 0.4]])).repeat(4000, 1)
    cold = choose_next(logits, temperature=0.25, top_p=None, generator=torch.Generator().manual_seed(0))
    p0 = 0.6**4 / (0.6**4 + 0.4**4)
    assert abs((cold == 0).float().mean().item() - p0) < 0.03


def test_stats_are_those_of_softmax_at_temperature_one():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logits = torch.log(probs)  # includes -inf logits
    logp, entropy, top1 = next_token_stats(logits, torch.tensor([1, 0]))
    assert torch.allclose(logp, torch.tensor([math.log(0.25), 0.0]))
    assert torch.allclose(entropy, torch.tensor([1.5 * math.log(2), 0.0]))
    assert torch.allclose(top1, torch.tensor([0.5, 1.0]))
    assert logp.dtype == torch.float32


def test_stats_are_float32_for_half_logits():
    logits = torch.randn(3, 10).to(torch.bfloat16)
    logp, entropy, top1 = next_token_stats(logits, torch.zeros(3, dtype=torch.long))
    assert logp.dtype == entropy.dtype == top1.dtype == torch.float32
