"""The toy world: rendering, the toy reward's judgements, and toy.py's pretraining entry point."""
import os
import subprocess
import sys

import pytest
import torch

import toy
from model import UserError, build_model
from reward import ToyReward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle moving left", "a blue square moving up", "a yellow triangle moving right",
           "a white circle moving down"]


def clean_videos():
    c, s, d = zip(*(toy.parse_prompt(p) for p in PROMPTS))
    return toy.render(list(c), list(s), list(d), torch.Generator().manual_seed(0))


def scores(videos, prompts=PROMPTS):
    return ToyReward().score(videos, prompts)


def test_prompts_name_colour_shape_and_direction():
    assert len(toy.all_prompts()) == len(toy.COLORS) * len(toy.SHAPES) * len(toy.DIRECTIONS)
    assert toy.parse_prompt("A Red circle, moving left.") == ("red", "circle", "left")
    assert toy.parse_prompt("a cat") == (None, None, None)


def test_clean_renders_score_high_on_every_dimension():
    s = scores(clean_videos())
    for dim in ToyReward.dims:
        assert (s[dim] >= 0.75).all() and (s[dim] <= 1).all(), dim
    assert torch.allclose(s["direction_alignment"], torch.ones(4), atol=0.05)


def test_flicker_lowers_temporal_consistency():
    v = clean_videos()
    flicker = v.clone()
    flicker[:, 1::2] = toy.BACKGROUND[0]  # the shape vanishes every other frame
    flicker[:, 1::2, ..., 1] = toy.BACKGROUND[1]
    flicker[:, 1::2, ..., 2] = toy.BACKGROUND[2]
    dim = flicker.float()
    dim[:, 1::2] = v[:, 1::2].float() * 0.6  # or dims to 60 % brightness
    for bad in (flicker, dim.to(torch.uint8)):
        assert (scores(bad)["temporal_consistency"] < scores(v)["temporal_consistency"] - 0.2).all()


def test_what_the_prompt_names_is_what_is_judged():
    v = clean_videos()
    good = scores(v)
    wrong = scores(v, ["a green circle moving right", "a red square moving down", "a blue triangle moving left",
                       "a yellow circle moving up"])
    assert (wrong["color_alignment"] < good["color_alignment"] - 0.4).all()
    assert (wrong["direction_alignment"] < 0.1).all()  # every path is the opposite of the named one
    still = scores(v[:, :1].expand_as(v).contiguous())
    assert torch.allclose(still["dynamic_degree"], torch.zeros(4))
    assert torch.allclose(still["direction_alignment"], torch.full((4,), 0.5))
    blurred = torch.nn.functional.avg_pool2d(v.permute(0, 1, 4, 2, 3).flatten(0, 1).float(), 3, 1, 1)
    blurred = blurred.view(4, toy.FRAMES, 3, toy.SIZE, toy.SIZE).permute(0, 1, 3, 4, 2).round().to(torch.uint8)
    assert (scores(blurred)["visual_quality"] < good["visual_quality"] - 0.3).all()


def test_reward_gradients_reach_the_pixels():
    x = clean_videos().float().requires_grad_()
    s = ToyReward().score_float(x, PROMPTS)
    sum(v.sum() for v in s.values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pretraining_smoke_run_writes_loadable_weights(tmp_path):
    out = tmp_path / "toy"
    r = subprocess.run([sys.executable, "toy.py", "--steps", "5", "--batch-size", "4", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model = build_model("toy", dit=str(out))
    videos = model.decode(model.sample(["a red circle moving left"], 2, [0, 1]))
    assert videos.shape == (2, toy.FRAMES, toy.SIZE, toy.SIZE, 3)


def test_missing_toy_weights_name_the_command(tmp_path):
    with pytest.raises(UserError, match="python toy.py"):
        build_model("toy", dit=str(tmp_path / "nowhere"))


def test_ablation_table_reports_mean_and_spread_over_seeds():
    import ablate

    table = ablate.summarise({"online-K5": [{"temporal_consistency": 0.9}, {"temporal_consistency": 0.8}]},
                             ["temporal_consistency"])
    assert table.splitlines()[-1] == "| online-K5 | 2 | 0.850 ± 0.071 |"
