"""GRPO (grpo.py) in Flow-GRPO's formulation: the SDE step's log-density, the group advantages, the clipped ratio,
the KL to the reference, and a run of the tiny model. Parity with Flow-GRPO's own step: README."""
import json
import math
import os

import pytest
from conftest import refusal
import torch

import grpo
import opensora as osr
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = [1.0, 0.9, 0.7, 0.4, 0.0]


def test_the_sde_steps_log_density_is_the_gaussians():
    g = torch.Generator().manual_seed(0)
    z, v, noise = (torch.randn(3, 4, 2, 5, 5, generator=g) for _ in range(3))
    for i in range(len(SIGMAS) - 1):
        prev, log_prob, mean = grpo.sde_step(z, v, SIGMAS, i, 0.7, noise=noise)
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        std = 0.7 * math.sqrt(s / (1 - (SIGMAS[1] if s == 1 else s))) * math.sqrt(s - s_next)
        direct = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1).mean(1)
        assert torch.allclose(log_prob, direct, rtol=1e-5, atol=1e-5)
        assert torch.allclose(prev, mean + std * noise, atol=1e-6)
        # a stored step's density under the same z and v is the same number
        assert torch.allclose(grpo.sde_step(z, v, SIGMAS, i, 0.7, prev=prev)[1], log_prob)
    # without noise the mean is the sampler's Euler step z + v (s - s'): Open-Sora's v = x0 - noise
    _, _, mean = grpo.sde_step(z, v, SIGMAS, 1, 1e-9, noise=noise)
    assert torch.allclose(mean, z + v * (SIGMAS[1] - SIGMAS[2]), atol=1e-6)


def test_the_first_step_is_at_s_1_under_open_soras_timestep_shift():
    """Open-Sora's timestep shift maps t = 1000 to s = 1.0000001 at 480p:51 and 0.9999997 at 8x8:17 (float32): the
    first step is still Flow-GRPO's clipped one at s = 1 (it divided by 3e-7, or failed on a negative root)."""
    starts = [float(osr.timestep_transform(torch.tensor(1000.0), h, w, f)) / 1000 for h, w, f in
              [(480, 854, 51), (8, 8, 17), (240, 426, 51)]]
    assert starts[0] > 1 and starts[1] < 1  # the case is real
    exact = grpo.step_std([1.0, 0.6, 0.0], 0, 0.7)
    assert exact == pytest.approx(0.7 * math.sqrt(1 / 0.4))
    for s in starts:
        assert grpo.step_std([s, 0.6, 0.0], 0, 0.7) == pytest.approx(exact, rel=1e-6)


def test_advantages_ratio_and_kl():
    r = torch.tensor([[0.1, 0.3, 0.5, 0.7], [2.0, 2.0, 2.0, 2.0]])
    adv = grpo.group_advantages(r)
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0), atol=1e-6) and adv[0].std(unbiased=False) > 0.99
    assert torch.equal(adv[1], torch.zeros(4))  # zero variance: exactly no signal (skipped, counted as a tie)
    assert grpo.group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), clip=1.5).max() == 1.5
    lp = torch.tensor([-1.0, -2.0])
    loss, ratio = grpo.clipped_loss(lp, lp, torch.tensor([0.5, -2.0]), 1e-3)
    assert torch.equal(ratio, torch.ones(2)) and torch.equal(loss, torch.tensor([-0.5, 2.0]))  # -A at ratio 1
    loss, _ = grpo.clipped_loss(lp + 0.1, lp, torch.tensor([1.0, 1.0]), 1e-3)
    assert torch.allclose(loss, torch.full((2,), -(1 + 1e-3)))  # a positive advantage gains at most 1 + clip
    mean = torch.randn(2, 3, 4)
    assert torch.equal(grpo.step_kl(mean, mean, SIGMAS, 1, 0.7), torch.zeros(2))
    assert (grpo.step_kl(mean, mean + 0.1, SIGMAS, 1, 0.7) > 0).all()
    assert grpo.train_steps(10, 0.99) == list(range(9)) and grpo.train_steps(10, 0.3) == [0, 1, 2]


def test_a_tiny_grpo_run_starts_at_ratio_one_and_zero_kl(tmp_path):
    train.main(["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "3",
                "--batch-size", "2", "--lr", "1e-3", "--method", "grpo", "--steps", "2",
                "--prompts", os.path.join(ROOT, "prompts/train.txt"), "--out", str(tmp_path)])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = rows[0]
    assert first["method"] == "grpo" and first["pairs"] + 3 * first["ties"] == 6  # samples trained or tied groups
    assert first["ratio"] == pytest.approx(1.0, abs=1e-4) and first["clipped"] == 0.0  # rollout = policy at step 1
    assert first["kl"] == pytest.approx(0.0, abs=1e-9)  # policy = reference before the first update
    assert rows[1]["kl"] > 0  # after it, the policy has moved away from the (never updated, K = 0) reference
    assert 0 <= first["reward/temporal_consistency"] <= 1


def test_micro_batches_give_the_same_update(tmp_path):
    """--grpo-micro-batch splits the update's forward/backward into chunks of videos (here 3, 3 and 2 of 2 prompts x
    N 4, in one sample batch): the same gradient, so the same step."""
    from safetensors.torch import load_file

    base = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "4",
            "--batch-size", "2", "--sample-batch", "2", "--lr", "1e-3", "--method", "grpo", "--steps", "1",
            "--prompts", os.path.join(ROOT, "prompts/train.txt")]
    rows, weights = {}, {}
    for m in (0, 3):
        out = tmp_path / f"micro{m}"
        train.main(base + ["--grpo-micro-batch", str(m), "--out", str(out)])
        weights[m] = load_file(str(out / "checkpoint-1" / "model.safetensors"))
        rows[m] = json.loads(open(out / "metrics.jsonl").readline())
    assert rows[0]["pairs"] == rows[3]["pairs"] == 8
    for key in ("grad_norm", "loss", "kl", "reward_mean"):
        assert rows[3][key] == pytest.approx(rows[0][key], rel=1e-5, abs=1e-9), key
    for key, value in weights[0].items():  # AdamW's first step moves a weight by about +-lr = 1e-3 (the gradient's
        # sign): a chunk left out or counted twice flips many; rounding moves one whose gradient is ~0 by up to 1e-5
        torch.testing.assert_close(weights[3][key], value, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_trained_reward_rises_and_follows_its_sign(tmp_path):
    """A tiny GRPO run raises the reward it is trained on (the rollouts' colorfulness under PixelReward), and the
    same run trained on its negative (--reward-dim colorfulness=-1: the same rollouts at step 1, advantages negated)
    ends lower: the update follows the reward, not a drift of its own."""
    last = {}
    for sign in ("1", "-1"):
        out = tmp_path / f"sign{sign}"
        train.main(["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "4", "--reward", "pixel",
                    "--reward-dim", f"colorfulness={sign}", "--method", "grpo", "--n", "4", "--batch-size", "2",
                    "--lr", "3e-3", "--steps", "6", "--prompts", os.path.join(ROOT, "prompts/train.txt"),
                    "--out", str(out)])
        curve = [json.loads(line)["reward/colorfulness"] for line in open(out / "metrics.jsonl")]
        last[sign] = (curve[0], sum(curve[-2:]) / 2)
    assert last["1"][0] == last["-1"][0]  # the same first rollouts
    # measured with two updates per sampling round (the second off-policy, clipped at 1e-3): 0.754 -> 0.765 and
    # 0.705 for the negated reward (one update per round, at lr 1e-3: 0.754 -> 0.808 against 0.692)
    assert last["1"][1] > last["1"][0]
    assert last["1"][1] > last["-1"][1] + 0.04


GRPO_RUN = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "3", "--batch-size",
            "2", "--lr", "1e-2", "--method", "grpo", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def test_a_sampling_round_feeds_two_updates_and_the_clip_binds_after_the_first(tmp_path):
    """Flow-GRPO's updates (--grpo-steps-per-round 2, the default): the round's first step is on-policy (ratio 1,
    nothing clipped); the second trains on the same round's rollouts after one update, so its ratio departs from 1,
    and a clip range that binds changes the weights there (and only there)."""
    from safetensors.torch import load_file

    rows, weights = {}, {}
    for clip in ("1e-6", "1e6"):
        out = tmp_path / clip
        train.main(GRPO_RUN + ["--steps", "2", "--save-every", "2", "--grpo-clip", clip, "--out", str(out)])
        rows[clip] = [json.loads(line) for line in open(out / "metrics.jsonl")]
        weights[clip] = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    first, second = rows["1e-6"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["clipped"] == 0.0
    assert abs(second["ratio"] - 1) > 1e-3 and second["clipped"] > 0
    assert rows["1e6"][1]["clipped"] == 0.0 and rows["1e6"][0]["loss"] == pytest.approx(first["loss"], abs=1e-9)
    assert any(not torch.equal(weights["1e-6"][k], weights["1e6"][k]) for k in weights["1e6"])
    # the round's rollouts are one sampling: step 2 logs the rewards of the prompts it trains on, sampled at step 1
    assert second["reward_mean"] != first["reward_mean"]


def test_one_step_per_round_is_on_policy_and_the_kl_reference_is_the_base_unless_asked(tmp_path):
    """--grpo-steps-per-round 1: every update on its own fresh rollouts (ratio 1 at every step). The KL term's
    reference is the base model (which takes no --k); --grpo-kl-reference moving updates it every K."""
    for kind, updates in (("base", 0), ("moving", 2)):
        out = tmp_path / kind
        train.main(GRPO_RUN + ["--grpo-steps-per-round", "1", "--grpo-kl-reference", kind, "--steps", "2",
                               "--out", str(out)] + (["--k", "1"] if kind == "moving" else []))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert all(r["ratio"] == pytest.approx(1.0, abs=1e-5) for r in rows)
        assert rows[-1]["ref_updates"] == updates
        assert (rows[1]["kl"] > 0) == (kind == "base")  # a moving reference is the policy again before step 2


def test_a_checkpoint_inside_a_sampling_round_is_refused(tmp_path, capsys):
    message = refusal(train.main, GRPO_RUN + ["--save-every", "3", "--out", str(tmp_path)], capsys)
    assert message.startswith("error: --save-every 3 must be a multiple of --grpo-steps-per-round")
