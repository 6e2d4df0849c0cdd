"""DenseDPO from real videos: a folder of mp4s with a WebVid-style captions file, read, resampled, cropped, encoded;
bad files skipped with one line each, bad inputs refused in one line."""
import json
import os

import pytest
import torch

import dataset
import toy
import train
from inputs import UserError
from videos import write_video



def counter_video(frames: int, h: int = 48, w: int = 64) -> torch.Tensor:
    """Frame i is a flat grey of level 8 i, with a white column marking the horizontal centre."""
    v = torch.arange(frames).mul(8).view(-1, 1, 1, 1).expand(frames, h, w, 3).clone().to(torch.uint8)
    v[:, :, w // 2 - 1: w // 2 + 1] = 255
    return v


def test_clips_are_resampled_to_the_model_fps_and_centre_cropped(tmp_path):
    path = str(tmp_path / "c.mp4")
    write_video(path, counter_video(24), fps=16)
    x = dataset.read_clip(path, frames=8, fps=8, height=32, width=32)
    assert x.shape == (8, 32, 32, 3) and x.dtype == torch.uint8
    levels = x[:, 2, 2, 0].float()  # away from the marker: frame k at 8 fps is the clip's frame 2k at 16 fps
    assert (levels - torch.arange(8) * 16).abs().max() <= 3  # H.264 at crf 17 moves a flat grey by a level or two
    # 48x64 -> scaled to 32x43, 5 columns cut on the left: the marker (columns 31-32 of 64) lands on column 16
    assert x[0, 16, 16, 0] > 200 and x[0, 16, 10, 0] < 60 and x[0, 16, 22, 0] < 60


def write_toy_dataset(folder, bad: bool = True) -> str:
    """Rendered toy videos as mp4s, WebVid's csv columns (videoid, name, page_dir), plus a corrupt and a short file."""
    os.makedirs(folder / "p", exist_ok=True)
    videos, prompts = toy.random_batch(3, torch.Generator().manual_seed(0))
    rows = ["videoid,contentUrl,duration,page_dir,name"]
    for i, (v, p) in enumerate(zip(videos, prompts)):
        write_video(str(folder / "p" / f"{i}.mp4"), v, toy.FPS)
        rows.append(f"{i},http://x,PT00H00M01S,p,{p}")
    if bad:
        (folder / "p" / "broken.mp4").write_bytes(b"not an mp4 at all")
        write_video(str(folder / "p" / "short.mp4"), videos[0][:3], toy.FPS)
        rows += ["broken,http://x,PT00H00M01S,p,a red circle moving up",
                 "short,http://x,PT00H00M01S,p,a blue bar moving left"]
    (folder / "webvid.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "webvid.csv")


def test_webvid_layout_is_read_and_bad_files_are_skipped_and_named(tmp_path):
    captions = write_toy_dataset(tmp_path)
    clips, skipped = dataset.usable(dataset.list_clips(str(tmp_path), captions), frames=8, fps=8)
    assert [os.path.basename(f) for f, _ in clips] == ["0.mp4", "1.mp4", "2.mp4"]
    assert len(skipped) == 2 and "broken.mp4: cannot be decoded" in skipped[0] and "short.mp4: too short" in skipped[1]


def test_encoded_toy_clips_are_the_rendered_videos(tmp_path):
    from model import build_model

    write_toy_dataset(tmp_path, bad=False)
    videos, _ = toy.random_batch(3, torch.Generator().manual_seed(0))
    model = build_model("toy")
    x = torch.stack([dataset.read_clip(str(tmp_path / "p" / f"{i}.mp4"), 8, 8, 32, 32) for i in range(3)])
    latents = model.encode(x)
    assert latents.shape == (3, *model.latent_shape)
    assert (model.decode(latents).float() - videos.float()).abs().mean() < 3  # only H.264's loss


def test_dense_training_from_a_dataset_skips_bad_clips_with_one_line_each(tmp_path, capsys):
    captions = write_toy_dataset(tmp_path)
    out = tmp_path / "run"
    train.main(["--model", "toy", "--method", "dense", "--videos", str(tmp_path), "--captions", captions, "--steps", "1",
                "--batch-size", "2", "--sample-steps", "3", "--out", str(out)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and "2 of 5 clips skipped; training on 3" in warnings[-1]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["method"] == "dense" and row["step"] == 1


@pytest.mark.parametrize("setup, flags, message", [
    (None, ["--videos", "/nonexistent", "--captions", "c.csv"], "--videos '/nonexistent' is not a folder"),
    (None, ["--videos", "."], "--videos and --captions go together"),
    ("csv", ["--method", "online"], "--videos is read by --method dense, structural, not by --method online"),
    ("nocol", [], "has no caption column"),
    ("jsonl", [], "line 2 is not JSON"),
    ("empty", [], "none of the 1 clips is usable"),
])
def test_bad_dataset_inputs_are_one_line(tmp_path, setup, flags, message):
    if setup == "csv":
        flags = flags + ["--videos", str(tmp_path), "--captions", write_toy_dataset(tmp_path, bad=False)]
    elif setup == "nocol":
        (tmp_path / "c.csv").write_text("videoid,duration\n1,3\n")
        flags = flags + ["--videos", str(tmp_path), "--captions", str(tmp_path / "c.csv")]
    elif setup == "jsonl":
        (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"video": \n')
        flags = flags + ["--videos", str(tmp_path), "--captions", str(tmp_path / "c.jsonl")]
    elif setup == "empty":
        (tmp_path / "c.jsonl").write_text('{"video": "missing.mp4", "caption": "a red circle"}\n')
        flags = flags + ["--videos", str(tmp_path), "--captions", str(tmp_path / "c.jsonl")]
    args = ["--model", "toy", "--method", "dense", "--steps", "1", "--out", str(tmp_path / "run"), *flags]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train(train.parse_args(args))
