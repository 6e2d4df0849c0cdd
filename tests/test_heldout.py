"""--eval-reward: a held-out reward scores the eval samples beside the trained one, in metrics.jsonl and the run's
plot, and one warning line names a run whose trained reward rises while the held-out one falls."""
import json
import os

import pytest
import torch
from conftest import refusal

import page
import reward
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "1", "--n", "2",
        "--batch-size", "1", "--eval-videos", "1", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_held_out_reward_is_logged_at_every_evaluation_and_drawn(tmp_path):
    train.main(FAST + ["--out", str(tmp_path), "--steps", "4", "--sample-every", "2", "--eval-reward", "pixel",
                       "--eval-reward-dim", "colorfulness"])
    logged = rows(tmp_path)
    evaluated = [r for r in logged if "eval_heldout" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for r in evaluated:
        assert r["eval_heldout"] == r["heldout/colorfulness"]  # the watched dimension, named
        assert 0 <= r["heldout/temporal_consistency"] <= 1 and 0 <= r["eval_trained"] <= 1
    title, series, _ = page.reward_curve(str(tmp_path))
    assert series["eval: held-out pixel"] == [(2, evaluated[0]["eval_heldout"]), (4, evaluated[1]["eval_heldout"])]
    assert series["eval: trained"] == [(2, evaluated[0]["eval_trained"]), (4, evaluated[1]["eval_trained"])]


class Counting:
    """A reward that moves by construction: each call scores `sign` x (how many calls so far), plus a per-video
    spread so that a prompt's candidates are never tied. Climbing as the trained reward, sinking as the held-out
    one: the shape of reward hacking, without waiting for a policy to find it. The count is the class's, so a
    resumed run's reward goes on from where the stopped one left it."""
    dims = ["count"]
    default_dim = "count"
    sign = 1
    calls = 0

    def __init__(self, **_):
        pass

    def score(self, videos: torch.Tensor, prompts: list[str], fps=None) -> dict:
        type(self).calls += 1
        return {"count": self.sign * type(self).calls + 0.01 * torch.arange(len(videos), dtype=torch.float)}


class Sinking(Counting):
    sign = -1


class Level(Counting):
    """The same score at every call: a held-out judge that sees no change."""
    sign = 0


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(reward.REWARDS, "climbing", Counting)
    monkeypatch.setitem(reward.REWARDS, "sinking", Sinking)
    monkeypatch.setitem(reward.REWARDS, "level", Level)
    monkeypatch.setattr(Counting, "calls", 0)
    monkeypatch.setattr(Sinking, "calls", 0)


def hacking_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "reward hacking" in line]


def test_warning_fires_once_when_trained_rises_and_held_out_falls(tmp_path, capsys, counting):
    flags = FAST + ["--reward", "climbing", "--sample-every", "1", "--eval-reward", "sinking", "--hack-patience", "3"]
    train.main(flags + ["--out", str(tmp_path / "hack"), "--steps", "5"])
    lines = hacking_lines(capsys.readouterr().err)
    # evaluations at steps 1..5; each from step 2 on has parted from the one before: 3 in a row first at step 4,
    # and the streak that goes on is not named again
    assert len(lines) == 1 and lines[0].startswith("warning: possible reward hacking at step 4: over the last 3 "
                                                   "evaluations the trained reward (count) rose"), lines
    # a held-out reward that rises with the trained one, or stays level, is no warning
    for held in ("climbing", "level"):
        train.main(flags[:-4] + ["--eval-reward", held, "--out", str(tmp_path / held), "--steps", "5"])
        assert hacking_lines(capsys.readouterr().err) == [], held


def test_a_resumed_run_remembers_its_evaluations(tmp_path, capsys, counting):
    """The history lives in metrics.jsonl: a run stopped after two evaluations and resumed warns at the same step."""
    flags = FAST + ["--reward", "climbing", "--sample-every", "1", "--eval-reward", "sinking", "--save-every", "1",
                    "--out", str(tmp_path)]
    train.main(flags + ["--steps", "2"])
    train.main(flags + ["--steps", "4", "--resume"])
    lines = hacking_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "at step 4" in lines[0], lines


@pytest.mark.parametrize("extra, message", [
    (["--eval-reward", "pixel"], "error: --eval-reward scores the eval samples: give --sample-every"),
    (["--eval-reward", "nope", "--sample-every", "1"], "error: unknown reward 'nope'"),
    (["--eval-reward", "pixel", "--sample-every", "1", "--eval-reward-dim", "motion"],
     "error: unknown reward dimension 'motion'"),
    (["--eval-reward-dim", "colorfulness"], "error: --eval-reward-dim needs --eval-reward"),
    (["--eval-reward", "pixel", "--sample-every", "1", "--hack-patience", "0"], "error: --hack-patience must be at "
     "least 1"),
])
def test_bad_held_out_flags_are_refused_in_one_line(tmp_path, capsys, extra, message):
    assert refusal(train.main, FAST + ["--out", str(tmp_path / "x"), *extra], capsys).startswith(message)
    assert not os.path.exists(tmp_path / "x")
