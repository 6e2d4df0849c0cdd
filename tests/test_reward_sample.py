"""The weights-free reward and the mp4 writer/naming of sample.py."""
import os

import av
import pytest
import torch

import inputs
import sample
from model import UserError
from reward import build_reward, pick
from videos import write_png, write_video


def test_static_video_has_temporal_flickering_one_and_noise_scores_lower():
    r = build_reward("pixel")
    static = torch.full((1, 6, 16, 16, 3), 90, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 6, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s = r.score(torch.cat([static, noise]), ["a", "b"])
    assert s["temporal_consistency"][0].item() == 1.0
    assert s["temporal_consistency"][1].item() < 0.7  # mean |a-b| of uniform bytes is ~85 -> ~0.67
    assert s["colorfulness"][0].item() == pytest.approx(0.0, abs=1e-6)  # gray has no colour
    assert pick(s, "global").tolist() == pytest.approx(((s["temporal_consistency"] + s["colorfulness"]) / 2).tolist())


def test_flicker_formula_on_a_known_video():
    video = torch.zeros(1, 3, 4, 4, 3, dtype=torch.uint8)
    video[0, 1] = 51  # |F1-F0| = 51, |F2-F1| = 51 -> (255 - 51) / 255
    assert build_reward("pixel").score(video, ["x"])["temporal_consistency"].item() == pytest.approx(204 / 255)


def test_reward_rejects_bad_input():
    with pytest.raises(UserError, match="uint8"):
        build_reward("pixel").score(torch.zeros(1, 2, 4, 4, 3), ["x"])
    with pytest.raises(UserError, match="unknown reward dimension 'beauty'"):
        pick({"temporal_consistency": torch.zeros(1)}, "beauty")


def test_mp4_round_trip_and_vbench_names(tmp_path):
    video = torch.zeros(5, 16, 22, 3, dtype=torch.uint8)
    video[:, :, :, 0] = torch.arange(5).view(5, 1, 1) * 50
    path = os.path.join(tmp_path, inputs.video_names(["a cat / dog"], 4)[0][3])
    assert os.path.basename(path) == "a cat   dog-3.mp4"
    write_video(path, video, fps=8)
    with av.open(path) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 22, 3)
    assert abs(int(frames[4][8, 8, 0]) - 200) < 8


def test_sample_cli_writes_n_videos_per_prompt(tmp_path):
    (tmp_path / "p.txt").write_text("a red ball\na blue cube\n")
    sample.main(["--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--size", "16x16",
                 "--frames", "4", "--sample-steps", "2", "--out", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path / "out")) == ["a blue cube-0.mp4", "a blue cube-1.mp4", "a red ball-0.mp4",
                                                   "a red ball-1.mp4"]


def test_frame_strip_png_holds_every_frame(tmp_path):
    import struct
    import zlib

    videos = torch.randint(0, 256, (2, 3, 4, 5, 3), dtype=torch.uint8)
    strip = sample.frame_strip(videos, scale=2, gap=1)
    assert strip.shape == (2 * 9, 3 * 11, 3)  # rows: 2 videos of 2*4+1; columns: 3 frames of 2*5+1
    assert torch.equal(strip[:8, 11:21], videos[0, 1].repeat_interleave(2, 0).repeat_interleave(2, 1))
    write_png(str(tmp_path / "s.png"), strip)
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (33, 18)
    rows = zlib.decompress(data[data.index(b"IDAT") + 4:-16])
    assert rows == b"".join(b"\x00" + row.numpy().tobytes() for row in strip)


def test_before_and_after_side_by_side_as_strip_and_gif(tmp_path):
    """--beside an earlier run's folder: the strip puts each earlier video's row above this run's, the GIF puts them
    side by side, frame by frame, looping."""
    from videos import read_video

    tiny = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "1", "--n", "2", "--prompts",
            str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("a red ball\na blue cube\n")
    sample.main(tiny + ["--out", str(tmp_path / "before"), "--seed", "1"])
    sample.main(tiny + ["--out", str(tmp_path / "after"), "--beside", str(tmp_path / "before"), "--strip",
                        str(tmp_path / "s.png"), "--gif", str(tmp_path / "g.gif"), "--strip-scale", "2"])
    gif = read_video(str(tmp_path / "g.gif"))
    tile = 2 * 16 + 4  # scaled, then a 4-pixel gap
    assert gif.shape == (4, 4 * tile, 2 * tile, 3)  # 4 frames; a row per video (2 prompts x 2), before | after
    scaled = lambda run: read_video(str(tmp_path / run / "a red ball-0.mp4")).repeat_interleave(2, 1) \
        .repeat_interleave(2, 2).float()  # noqa: E731
    gap = lambda a, b: (a - b).abs().mean()  # noqa: E731  (mp4 and GIF both change colours: compare, don't equate)
    left, right = gif[:, :32, :32].float(), gif[:, :32, tile:tile + 32].float()  # the first row's two tiles
    assert gap(left, scaled("before")) < gap(left, scaled("after"))
    assert gap(right, scaled("after")) < gap(right, scaled("before"))
    data = (tmp_path / "s.png").read_bytes()
    import struct
    assert struct.unpack(">II", data[16:24]) == (4 * (2 * 16 + 2), 8 * (2 * 16 + 2))  # 4 frames wide, 8 rows
