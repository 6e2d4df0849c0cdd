"""The toy world: rendering, the toy reward's judgements, and toy.py's pretraining entry point."""
import json
import os

import pytest
import torch

import toy
from model import UserError, build_model
from toy import ToyReward

PROMPTS = ["a red circle moving left", "a blue bar moving up", "a yellow pole moving right",
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
    wrong = scores(v, ["a green circle moving right", "a red bar moving down", "a blue pole moving left",
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
    toy.main(["--steps", "5", "--batch-size", "4", "--out", str(out)])
    model = build_model("toy", dit=str(out))
    videos = model.decode(model.sample(["a red circle moving left"], 2, [0, 1]))
    assert videos.shape == (2, toy.FRAMES, toy.SIZE, toy.SIZE, 3)


def test_missing_toy_weights_name_the_command(tmp_path):
    with pytest.raises(UserError, match="python toy.py"):
        build_model("toy", dit=str(tmp_path / "nowhere"))


def test_ablation_table_reports_mean_and_95_percent_interval_over_seeds():
    import ablate

    table = ablate.summarise({"online-K5": [{"temporal_consistency": v} for v in (1, 2, 3, 4, 5)]},
                             ["temporal_consistency"])
    assert table.splitlines()[-1] == "| online-K5 | 5 | 3.000 ± 1.963 |"  # t(0.975, 4) = 2.776 x 1.581 / sqrt 5
    # two runs' difference: Welch's interval; equal spreads and counts give 2n - 2 degrees of freedom
    d, h = ablate.difference([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
    assert d == 1 and h == pytest.approx(2.306 * 1.0, abs=1e-3)  # t(0.975, 8) x sqrt(2.5/5 + 2.5/5)
    versus = ablate.versus({"a": [{"x": v} for v in (1, 2, 3)], "b": [{"x": v} for v in (11, 12, 13)]}, "a", ["x"])
    assert versus.splitlines()[-1].startswith("| b | +10.000 ± ") and versus.endswith(" * |")  # excludes 0
    assert ablate.summarise({"untrained": [{}]}, ["trained_last"]).splitlines()[-1] == "| untrained | 1 | - |"


def test_ablation_reads_each_runs_training_curve_and_time_per_step(tmp_path):
    """The trained reward of the first and last 5 steps and the seconds per step come from metrics.jsonl; a step a
    resumed run logged twice counts once (its last record), and the first step (warm-up) is not timed."""
    import ablate

    rows = [{"step": k, "reward_mean": k / 10, "time_sample": 2.0, "time_train": 1.0} for k in range(1, 13)]
    rows[0]["time_sample"] = 50.0
    rows.insert(7, {"step": 8, "reward_mean": 99.0, "time_sample": 99.0})  # logged, then redone after a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = ablate.training_stats(str(tmp_path))
    assert stats["trained_first"] == pytest.approx(0.3) and stats["trained_last"] == pytest.approx(1.0)
    assert stats["s_per_step"] == pytest.approx(3.0)
    # offline DPO samples nothing while it trains: its steps are timed, with no curve of its own samples
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "reward_mean": None, "time_train": 2.0}) + "\n"
                                                    for k in range(1, 4)))
    assert ablate.training_stats(str(tmp_path)) == {"s_per_step": 2.0}


# ----------------------------------------------------------------------------------------------------------
# The shape judge (toy.judge): what a person would name, from pixels alone


def test_judge_names_every_clean_render_and_survives_grain():
    videos, prompts = toy.random_batch(120, torch.Generator().manual_seed(1))
    assert toy.judge_rates(videos, prompts) == {"shape": 1.0, "legible": 1.0, "color": 1.0}
    grain = (videos.float() + 10 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(2)))
    rates = toy.judge_rates(grain.round().clamp(0, 255).to(torch.uint8), prompts)
    assert rates["shape"] >= 0.95 and rates["legible"] >= 0.95 and rates["color"] == 1.0


def test_judge_tells_the_three_shapes_apart_at_every_size():
    for shape in toy.SHAPES:
        for r in (6.0, 7.0, 8.0):
            py, px = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
            a = toy.coverage(shape, px, py, torch.tensor(15.3), torch.tensor(16.6), torch.tensor(r))[..., None]
            frame = torch.tensor(toy.BACKGROUND) * (1 - a) + torch.tensor(toy.COLORS["green"]) * a
            video = frame.round().to(torch.uint8).expand(8, 32, 32, 3)[None]
            assert toy.judge(video) == [{"shape": shape, "outline": shape, "color": "green", "coherent": True}]


def test_the_outline_names_a_bar_from_half_a_bars_elongation_up():
    """The bounding box's second opinion (toy.outline): a rectangle of a bar's area is a bar (or, upright, a pole)
    from half a bar's elongation (1.875) up, and a circle below it."""
    py, px = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    for ratio, lying, upright in ((2.0, "bar", "pole"), (1.75, "circle", "circle")):
        f = (3.75 / ratio) ** 0.5  # a bar of half-size 7 squeezed to `ratio`, its area kept
        for (hx, hy), named in (((10.5 / f, 2.8 * f), lying), ((2.8 * f, 10.5 / f), upright)):
            piece = torch.maximum((px - 16).abs() - hx, (py - 16).abs() - hy) < 0
            assert toy.outline(px[piece], py[piece]) == named, (ratio, hx, hy)


def test_judge_rejects_a_shape_in_pieces_a_filled_frame_and_an_empty_video():
    videos, prompts = toy.random_batch(8, torch.Generator().manual_seed(3))
    pieces = videos.clone()
    pieces[..., ::4, :, :] = torch.tensor(toy.BACKGROUND, dtype=torch.uint8)  # background rows cut it in strips
    assert toy.judge_rates(pieces, prompts)["shape"] == 0.0
    scattered = torch.tensor(toy.BACKGROUND, dtype=torch.uint8).expand(1, 8, 32, 32, 3).clone()
    for y, x in ((2, 2), (2, 20), (14, 10), (24, 26)):  # four separate 4x4 blocks, like the old toy model's
        scattered[:, :, y:y + 4, x:x + 4] = torch.tensor(toy.COLORS["red"], dtype=torch.uint8)
    assert toy.judge(scattered)[0]["coherent"] is False
    filled = torch.tensor(toy.COLORS["red"], dtype=torch.uint8).expand(1, 8, 32, 32, 3)  # a hacked sharpness
    assert toy.judge_rates(filled, ["a red circle moving left"]) == {"shape": 0.0, "legible": 0.0, "color": 0.0}
    empty = torch.tensor(toy.BACKGROUND, dtype=torch.uint8).expand(1, 8, 32, 32, 3)
    assert toy.judge(empty) == [{"shape": None, "outline": None, "color": None, "coherent": False}]



@pytest.mark.slow
def test_an_ablation_cache_hit_is_the_same_run_never_one_with_other_settings(tmp_path, capsys):
    """ablate.py keys each run's folder by its flags, the prompts' text and the toy weights: a second sweep with the
    same settings reuses every run (no new folder, the same table), and one with another --steps, --lr or seed
    trains its own runs beside the first sweep's, which stay."""
    import ablate

    sweep = ["--runs", "online-K5", "--steps", "1", "--batch-size", "1", "--sample-steps", "1", "--out", str(tmp_path)]
    ablate.main(sweep + ["--seeds", "0"])
    first = sorted(os.listdir(tmp_path))
    table = (tmp_path / "table.md").read_text()
    ablate.main(sweep + ["--seeds", "0"])
    assert sorted(os.listdir(tmp_path)) == first and (tmp_path / "table.md").read_text() == table
    for other in (["--seeds", "0", "--lr", "1e-4"], ["--seeds", "1"]):
        ablate.main(sweep + other)
    runs = [f for f in os.listdir(tmp_path) if f.startswith("online-K5-")]
    assert len(runs) == 3 and set(first) <= set(os.listdir(tmp_path))
    assert ablate.run_flags("online-K5", 0, ablate.parser().parse_args(sweep)) != ablate.run_flags(
        "online-K5", 0, ablate.parser().parse_args(sweep[:3] + ["2"] + sweep[4:]))  # --steps 1 vs 2


def test_sharpness_uses_the_named_shapes_perimeter():
    # a long bar has more edge than a disc of its area: judged by a disc's perimeter it would score 0.82-0.86
    for shape in toy.SHAPES:
        v = toy.render(["red"] * 20, [shape] * 20, ["left"] * 20, torch.Generator().manual_seed(0))
        vq = scores(v, [f"a red {shape} moving left"] * 20)["visual_quality"]
        assert vq.mean() >= 0.9, (shape, vq.mean())  # measured: circle 1.00, bar 0.975, pole 0.964


def test_an_evaluation_made_by_another_version_of_the_judge_is_made_again(tmp_path, capsys):
    """ablate.py's cached evaluations carry the shape judge's version: a sweep never mixes two judges' verdicts."""
    import ablate
    from reward import build_reward

    model = build_model("toy")
    model.sample_steps = 1
    reward, prompts = build_reward("toy"), ["a red circle moving left", "a blue bar moving up"]
    keys = reward.dims + [f"judged_{d}" for d in toy.ShapeJudge.dims]
    path = str(tmp_path / "eval.json")
    fresh = ablate.cached_eval(path, model, reward, prompts, None, keys)
    assert fresh["judge_version"] == toy.JUDGE_VERSION
    (tmp_path / "eval.json").write_text(json.dumps({**fresh, "judge_version": toy.JUDGE_VERSION - 1, "judged_shape": 7.0}))
    again = ablate.cached_eval(path, model, reward, prompts, None, keys)
    assert again == fresh and "made by another version of the shape judge" in capsys.readouterr().err
