"""Pair selection, the Diffusion-DPO loss and its beta convention, the curriculum reference update."""
import math

import pytest
import torch

import dpo


def test_select_pair_takes_best_and_worst_and_skips_ties():
    assert dpo.select_pair(torch.tensor([0.2, 0.9, 0.1, 0.5])) == (1, 2)
    assert dpo.select_pair(torch.tensor([0.3, 0.3, 0.3, 0.3])) is None
    assert dpo.select_pair(torch.tensor([0.30, 0.31, 0.305]), min_gap=0.02) is None
    assert dpo.select_pair(torch.tensor([0.30, 0.31, 0.305]), min_gap=0.005) == (1, 0)


def test_policy_equal_to_reference_gives_log2_and_chance_accuracy():
    e = torch.tensor([0.7, 1.3, 0.2])
    loss, m = dpo.diffusion_dpo_loss(e, e * 2, e, e * 2, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["accuracy"] == 0.5 and m["kl"] == 0.0


def test_beta_convention():
    # (e_pol_w - e_ref_w) - (e_pol_l - e_ref_l) = (0.10 - 0.12) - (0.30 - 0.29) = -0.03
    pw, pl, rw, rl = (torch.tensor([v]) for v in (0.10, 0.30, 0.12, 0.29))
    loss, m = dpo.diffusion_dpo_loss(pw, pl, rw, rl, beta=100.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 100.0 * 0.03))), rel=1e-5)
    assert m["accuracy"] == 1.0 and m["margin"] == pytest.approx(1.5, rel=1e-5)


def test_one_gradient_step_favours_the_winner():
    """With a reference frozen at the start, one step on the loss lowers the policy's winner error
    relative to its loser error."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(8, 8)
    ref = torch.nn.Linear(8, 8).requires_grad_(False)
    dpo.update_reference(ref, policy)
    xw, xl, target_w, target_l = (torch.randn(4, 8) for _ in range(4))
    err = lambda net, x, y: (net(x) - y).pow(2).mean(1)
    before = (err(policy, xw, target_w) - err(policy, xl, target_l)).mean().item()
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    loss, _ = dpo.diffusion_dpo_loss(err(policy, xw, target_w), err(policy, xl, target_l),
                                     err(ref, xw, target_w), err(ref, xl, target_l), beta=10.0)
    loss.backward()
    opt.step()
    after = (err(policy, xw, target_w) - err(policy, xl, target_l)).mean().item()
    assert after < before


def test_update_reference_is_an_exact_copy():
    policy, ref = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    dpo.update_reference(ref, policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), ref.state_dict().values()))
