"""The paper's baselines through train.py: offline DPO (Table 4d) and ReFL (Table 4c)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import reward
import train
from model import OpenSoraModel
from sample import model_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "4", "--n", "2",
        "--batch-size", "2", "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]
REFL = FAST[:FAST.index("--n")] + FAST[FAST.index("--n") + 2:]  # ReFL scores one video per prompt: it takes no --n


def count_sampling(monkeypatch) -> list:
    calls = []
    original = OpenSoraModel.sample

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("until"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OpenSoraModel, "sample", counted)
    return calls


def test_offline_samples_only_while_collecting_then_never_again(tmp_path, monkeypatch):
    calls = count_sampling(monkeypatch)
    train.main(FAST + ["--reward", "pixel", "--method", "offline", "--offline-pairs", "3", "--steps", "4",
                       "--out", str(tmp_path)])
    assert len(calls) == 3  # one call per collected prompt, none during the 4 training steps (8 prompts)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["pairs"] == 2 for r in rows) and rows[-1]["ref_updates"] == 0
    ref = load_file(tmp_path / "checkpoint-4" / "ref.safetensors")
    initial = model_from_args(train.parse_args(FAST)).dit.state_dict()
    assert all(torch.equal(ref[k], initial[k]) for k in ref if k in initial)  # a fixed reference
    calls.clear()  # a second run in the same folder reuses the cached pairs: no sampling at all
    train.main(FAST + ["--reward", "pixel", "--method", "offline", "--offline-pairs", "3", "--steps", "6",
                       "--out", str(tmp_path), "--resume"])
    assert calls == []
    with pytest.raises(SystemExit) as e:  # other pairs would have to come from a trained policy: refused
        train.main(FAST + ["--reward", "pixel", "--method", "offline", "--offline-pairs", "5", "--steps", "8",
                           "--out", str(tmp_path), "--resume"])
    assert "resume with the flags the run started with" in str(e.value.code) and calls == []


class LinearReward:
    """A reward with weights of its own, to see where ReFL's gradients go."""
    dims = ["score"]
    default_dim = "score"
    instance = None

    def __init__(self, **_):
        torch.manual_seed(1)
        self.head = torch.nn.Linear(3, 1)
        self.before = self.head.weight.detach().clone()
        LinearReward.instance = self

    def score_float(self, x, prompts, fps=None):
        return {"score": self.head(x.mean((1, 2, 3)) / 255).squeeze(1)}

    def score(self, videos, prompts, fps=None):
        with torch.no_grad():
            return self.score_float(videos.float(), prompts)


def test_refl_trains_the_policy_and_never_the_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(reward.REWARDS, "linear", LinearReward)
    calls = count_sampling(monkeypatch)
    train.main(REFL + ["--reward", "linear", "--method", "refl", "--steps", "2", "--out", str(tmp_path)])
    head = LinearReward.instance.head
    assert head.weight.grad is None and torch.equal(head.weight, LinearReward.instance.before)
    initial = model_from_args(train.parse_args(FAST)).dit.state_dict()
    policy = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(policy[k], initial[k]) for k in policy if k in initial)
    assert not os.path.exists(tmp_path / "checkpoint-2" / "ref.safetensors")  # ReFL holds no reference
    assert calls and all(c is not None and 3 <= c < 4 for c in calls)  # stops in the last quarter of 4 steps
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["method"] == "refl" and r["loss"] is not None for r in rows)


class ScoreOnly:
    dims, default_dim = ["s"], "s"

    def __init__(self, **_):
        pass

    def score(self, videos, prompts, fps=None):
        return {"s": torch.zeros(len(prompts))}


def test_refl_needs_a_differentiable_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(reward.REWARDS, "opaque", ScoreOnly)
    with pytest.raises(SystemExit) as e:
        train.main(REFL + ["--reward", "opaque", "--method", "refl", "--steps", "1", "--out", str(tmp_path)])
    assert "needs a differentiable reward" in str(e.value.code)


def test_predicted_x0_of_the_last_step_equals_the_sampler_output():
    """ReFL's one step with gradients is the sampler's own last step: same network call, same x0."""
    args = train.parse_args(FAST)
    model = model_from_args(args)
    steps = model.sample_steps
    full = model.sample(["a cat"], 1, [7])
    z, t = model.sample(["a cat"], 1, [7], until=steps - 1)
    with torch.no_grad():
        x0 = model.predict_x0(model.dit, z, t, ["a cat"])
    assert torch.allclose(x0, full, atol=1e-5)
