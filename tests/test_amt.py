"""AMT-S (amt.py) for VBench's motion smoothness: the released checkpoint's layout loads strictly, and evaluate.py
scores a folder with it. Parity with VBench's own AMT (identical frames) is in the README."""
import json
import os

import pytest
import torch

import amt
import evaluate
from model import UserError
from videos import read_video, write_video


def test_the_network_has_the_released_checkpoints_tensors():
    net = amt.AMTS()
    assert len(net.state_dict()) == 213 and sum(p.numel() for p in net.parameters()) == 2_990_543


def test_motion_smoothness_through_evaluate_with_a_checkpoint_as_released(tmp_path, capsys):
    torch.manual_seed(0)
    net = amt.AMTS()
    opt = torch.optim.AdamW(net.parameters())
    ckpt = tmp_path / "amt-s.pth"  # AMT's trainer saves epoch, state_dict and the optimizer's state
    torch.save({"epoch": 3, "state_dict": net.state_dict(), "optim": opt.state_dict()}, ckpt)
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 255, size=(128, 136), mode="bilinear")
    video = torch.stack([image[0].roll(2 * t, 2) for t in range(5)]).permute(0, 2, 3, 1).to(torch.uint8)
    os.makedirs(tmp_path / "v")
    write_video(str(tmp_path / "v" / "a slide-0.mp4"), video, fps=8)
    out = tmp_path / "e.json"
    evaluate.main([str(tmp_path / "v"), "--metrics", "motion_smoothness", "--amt", str(ckpt), "--out", str(out)])
    got = json.loads(out.read_text())["summary"]["motion_smoothness"]
    frames = read_video(str(tmp_path / "v" / "a slide-0.mp4"))
    loaded = amt.load_amt(str(ckpt))
    assert got == pytest.approx(amt.motion_smoothness(frames, loaded)) and 0 <= got <= 1
    mids = amt.interpolate_midframes(frames[0::2], loaded)  # 3 even frames -> 2 middles, against frames 1 and 3
    diff = sum(abs(frames[1::2][i].int() - torch.from_numpy(mids[i]).int()).float().mean() for i in range(2)) / 2
    assert got == pytest.approx((255 - diff.item()) / 255, abs=1e-6)
    assert amt.motion_smoothness(frames[:2], loaded) is None  # no held-out frame
    assert amt.motion_smoothness(frames[:, :64, :80], loaded) is None  # too small for the correlation pyramid


def test_missing_or_wrong_weights_are_one_line(tmp_path):
    with pytest.raises(UserError, match="AMT-S weights .*none.pth not found; download them: wget -P"):
        amt.load_amt(str(tmp_path / "none.pth"))
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not AMT-S's amt-s.pth"):
        amt.load_amt(str(tmp_path / "other.pth"))
