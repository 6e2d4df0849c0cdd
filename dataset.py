"""Captioned real videos: the sources of DenseDPO's aligned candidates (train.py --videos FOLDER --captions FILE).

The captions file lists one clip per row: a csv or a jsonl (one JSON object per line). The clip's file is named by
the column `video`, `path` or `file` (a path under FOLDER), or WebVid's `videoid` (FOLDER/<videoid>.mp4, or
FOLDER/<page_dir>/<videoid>.mp4 as WebVid's download scripts lay it out); its caption is the column `caption`,
`text`, `prompt` or WebVid's `name`. Each clip is decoded with PyAV (videos.py), resampled in time to the model's
fps (the frame shown at k / fps, k = 0 .. frames - 1, from the clip's start), scaled to cover the model's size and
centre-cropped.
A file that cannot be opened, has no video stream or is too short is skipped with one line and counted.
"""
import csv
import io
import json
import os

import torch
import torch.nn.functional as F

from inputs import UserError, read_text
from videos import probe, read_frames_at

FILE_COLUMNS = ("video", "path", "file", "videoid")
CAPTION_COLUMNS = ("caption", "text", "prompt", "name")


def read_rows(path: str) -> list[dict]:
    """The rows of a csv or jsonl captions file."""
    text = read_text(path, "captions file")
    if path.lower().endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {i} is not a JSON object")
            rows.append(row)
        return rows
    if not path.lower().endswith(".csv"):
        raise UserError(f"captions file {path!r}: give a .csv or .jsonl file")
    return list(csv.DictReader(io.StringIO(text)))


def column(rows: list[dict], names: tuple, what: str, path: str) -> str:
    found = next((c for c in names if c in rows[0]), None)
    if found is None:
        raise UserError(f"{path} has no {what} column (one of {', '.join(names)}; it has {', '.join(rows[0])})")
    return found


def clip_path(folder: str, row: dict, key: str) -> str:
    name = str(row[key] or "").strip()
    if key != "videoid":
        return os.path.join(folder, name)
    nested = os.path.join(folder, str(row.get("page_dir") or ""), f"{name}.mp4")
    return nested if row.get("page_dir") and os.path.isfile(nested) else os.path.join(folder, f"{name}.mp4")


def list_clips(folder: str, captions: str) -> list[tuple[str, str]]:
    """(file, caption) per row of the captions file; the folder, the file and its columns checked."""
    if not os.path.isdir(folder):
        raise UserError(f"--videos {folder!r} is not a folder")
    rows = read_rows(captions)
    if not rows:
        raise UserError(f"captions file {captions!r} lists no clips")
    file_key = column(rows, FILE_COLUMNS, "video file", captions)
    text_key = column(rows, CAPTION_COLUMNS, "caption", captions)
    return [(clip_path(folder, row, file_key), str(row[text_key] or "").strip()) for row in rows]


def usable(clips: list[tuple[str, str]], frames: int, fps: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The clips that can give `frames` frames at `fps`, and a line for each one that cannot."""
    seconds = frames / fps  # frame k is shown at k / fps and lasts 1 / fps
    kept, skipped = [], []
    for path, caption in clips:
        why = "no caption" if not caption else probe(path, seconds)
        if why:
            skipped.append(f"skipping {path}: {why}")
        else:
            kept.append((path, caption))
    if not kept:
        raise UserError(f"none of the {len(clips)} clips is usable ({skipped[0]}, ...)")
    return kept, skipped


def read_clip(path: str, frames: int, fps: int, height: int, width: int) -> torch.Tensor:
    """uint8 (frames, height, width, 3): the frames shown at k / fps, scaled to cover height x width (aspect kept,
    antialiased) and centre-cropped."""
    try:
        picked = read_frames_at(path, frames, fps)
    except UserError as e:
        raise UserError(f"{e}; remove it from the captions file and --resume") from None
    if len(picked) < frames:
        raise UserError(f"{path} holds {len(picked)} of the {frames} frames needed at {fps} fps; remove it from the "
                        "captions file and --resume")
    x = torch.stack(picked).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top: top + height, left: left + width]
    return (x + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
