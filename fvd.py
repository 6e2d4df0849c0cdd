"""FVD, content-debiased (Ge et al. 2024, the paper's reference 19; Table 5c), for evaluate.py --fvd REF_DIR.

A distribution metric: one number for a folder of generated videos against a folder of reference videos, where
evaluate.py's VBench metrics score each video. The cd-fvd package's feature models (VideoMAE-v2, the content-debiased
one, or I3D, the classic) and Frechet distance; each video goes in as that package's folder loader prepares it: its
first 16 frames, the shorter side to 256 (bilinear, antialiased), a centre crop, back to uint8.
"""
import glob
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from inputs import UserError
from videos import read_video


def fvd_clip(frames: torch.Tensor, resolution: int = 256, length: int = 16) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, length, resolution, resolution, 3) uint8, as cdfvd's data_utils.preprocess and
    compute_*_stats: [0, 1], the first `length` frames, short side to `resolution` (ceil), centre crop, x 255,
    truncated to uint8."""
    if len(frames) < length:
        raise UserError(f"a {len(frames)}-frame video: FVD takes the first {length} frames")
    x = frames[:length].permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[2:]
    s = resolution / min(h, w)
    size = (resolution, math.ceil(w * s)) if h < w else (math.ceil(h * s), resolution)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[2] - resolution) // 2, (x.shape[3] - resolution) // 2
    x = x[:, :, top:top + resolution, left:left + resolution]
    return (x * 255).to(torch.uint8).permute(0, 2, 3, 1)[None]


def fvd_folder(folder: str, what: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{what} {folder!r} is not a folder")
    paths = sorted(glob.glob(os.path.join(folder, "*.mp4")))
    if len(paths) < 2:
        raise UserError(f"{what} {folder!r} holds {len(paths)} .mp4 files; a Frechet distance needs at least 2")
    return paths


def check(generated: str, reference: str):
    """Both folders and the package, checked before evaluate.py's minutes of scoring."""
    fvd_folder(generated, "generated videos"), fvd_folder(reference, "--fvd reference")
    if importlib.util.find_spec("cdfvd") is None:
        raise UserError("--fvd needs the cd-fvd package: pip install cd-fvd")


def compute_fvd(generated: str, reference: str, model: str, ckpt: str | None, device: str) -> float:
    """cd-fvd's FVD (model 'videomae': VideoMAE-v2 features, the content-debiased one; 'i3d': the classic)."""
    fake, real = fvd_folder(generated, "generated videos"), fvd_folder(reference, "--fvd reference")
    try:
        from cdfvd import fvd as cdfvd
    except Exception as e:  # noqa: BLE001 - missing, or its torchvision import failing
        raise UserError(f"--fvd needs the cd-fvd package ({type(e).__name__}): pip install cd-fvd") from None
    try:  # the package downloads its weights to ckpt_path (or its own folder) when the file is not there
        ev = cdfvd.cdfvd(model=model, n_real="full", n_fake="full", ckpt_path=ckpt, device=device)
    except Exception as e:  # noqa: BLE001 - offline download, truncated file: one line
        raise UserError(f"cd-fvd could not load its {model} weights ({type(e).__name__}: {e}); give a local copy with "
                        "--fvd-ckpt") from None
    for paths, add in ((real, ev.add_real_stats), (fake, ev.add_fake_stats)):
        for p in tqdm(paths, desc="FVD features", dynamic_ncols=True):
            add(fvd_clip(read_video(p)).numpy())
    return float(ev.compute_fvd_from_stats())
