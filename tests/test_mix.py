"""Weighted mixes of reward dimensions (reward.mix): the scaling that makes them commensurable."""
import pytest
import torch

import reward


def test_within_prompt_std_pools_the_spread_inside_each_prompt():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])  # two prompts, far apart, each spread by 1
    assert reward.within_prompt_std(s, 3).item() == pytest.approx(1.0)
    assert reward.within_prompt_std(s, torch.tensor([7, 7, 7, 2, 2, 2])).item() == pytest.approx(1.0)
    assert reward.within_prompt_std(s, None).item() == pytest.approx(s.std().item())  # no groups: plain std
    assert reward.within_prompt_std(s, 1).item() == pytest.approx(s.std().item())  # each prompt scored once


def test_a_mix_ignores_each_rewards_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(12, generator=g), torch.rand(12, generator=g)
    spec = "a=1,b=0.5"
    base = reward.pick({"a": a, "b": b}, spec, group=4)
    moved = reward.pick({"a": 1000 * a - 7, "b": 0.01 * b + 3}, spec, group=4)  # VideoScore 1..4 vs 0..1 alike
    assert torch.allclose(base, moved, atol=1e-4)
    # one dimension weighted 1 on its own ranks as that dimension does
    one = reward.pick({"a": a, "b": b}, "a=1", group=4)
    assert torch.equal(one.view(3, 4).argsort(1), a.view(3, 4).argsort(1))


def test_a_dimension_that_does_not_vary_contributes_nothing():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    flat = torch.full((4,), 3.0)
    assert torch.allclose(reward.pick({"a": a, "f": flat}, "a=1,f=5", group=2), reward.pick({"a": a}, "a=1", group=2))


def test_global_and_single_dimensions_keep_their_raw_values():
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 6.0])}
    assert reward.pick(scores, "b").tolist() == [3.0, 6.0]
    assert reward.pick(scores, "global").tolist() == [2.0, 4.0]  # paper Table 4b: the plain mean
