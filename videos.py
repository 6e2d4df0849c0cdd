"""Video and image files, read and written in one place for every tool: mp4 through PyAV, PNG with zlib alone.

PyAV is imported inside the functions: the rest of the code runs without it until a video is read or written.
"""
import os

import torch

from inputs import UserError


def read_video(path: str) -> torch.Tensor:
    """Every frame of a video file as uint8 (T, H, W, 3)."""
    import av

    try:
        with av.open(path) as f:
            frames = [torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)]
    except Exception as e:  # missing, not a video, corrupt: one line
        raise UserError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if not frames:
        raise UserError(f"video {path} has no frames")
    return torch.stack(frames)


def read_fps(path: str) -> float:
    """The frame rate in a video file's header (8 if it names none)."""
    import av

    try:
        with av.open(path) as f:
            return float(f.streams.video[0].average_rate or 8)
    except Exception as e:  # missing, not a video, corrupt: one line
        raise UserError(f"cannot read video {path}: {type(e).__name__}: {e}") from None


def probe(path: str, seconds: float) -> str | None:
    """Why the file cannot give `seconds` of video, or None: it opens, has a video stream, lasts long enough and
    its first frame decodes."""
    import av

    if not os.path.isfile(path):
        return "no such file"
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            duration = (float(stream.duration * stream.time_base) if stream.duration else
                        container.duration / 1e6 if container.duration else 0.0)
            if duration + 1e-3 < seconds:
                return f"too short ({duration:.2f} s, {seconds:.2f} s needed)"
            next(container.decode(stream))
    except (av.error.FFmpegError, StopIteration, OSError, ValueError) as e:
        return f"cannot be decoded ({type(e).__name__})"
    return None


def read_frames_at(path: str, frames: int, fps: int) -> list[torch.Tensor]:
    """The frames on screen at times k / fps, k = 0 .. frames - 1, from the video's first frame, as uint8
    (H, W, 3) each: fewer than `frames` if the video ends first. A file PyAV cannot decode raises UserError."""
    import av

    picked, prev, t0, t = [], None, None, 0.0
    rgb = lambda f: torch.from_numpy(f.to_ndarray(format="rgb24"))
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or fps)
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else i / rate
                t0 = t if t0 is None else t0
                while len(picked) < frames and t - t0 > len(picked) / fps + 1e-6:  # time k / fps has passed:
                    picked.append(rgb(prev))                                       # prev was on screen then
                prev = frame
                if len(picked) == frames:
                    break
            while prev is not None and len(picked) < frames and t - t0 + 1 / rate > len(picked) / fps + 1e-6:
                picked.append(rgb(prev))  # the last frame stays on screen for one frame of the clip's own rate
    except av.error.FFmpegError as e:
        raise UserError(f"{path} cannot be decoded ({e})") from None
    return picked


def write_video(path: str, video: torch.Tensor, fps: int):
    """uint8 (T, H, W, 3) -> H.264 mp4 through PyAV (odd sizes are padded by one pixel for yuv420p)."""
    import av

    video = video.cpu()
    T, H, W, _ = video.shape
    video = torch.nn.functional.pad(video.permute(3, 0, 1, 2), (0, W % 2, 0, H % 2), mode="replicate")
    video = video.permute(1, 2, 3, 0).contiguous().numpy()
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = {"crf": "17"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(path: str, video: torch.Tensor, fps: int):
    """uint8 (T, H, W, 3) -> an animated GIF that loops, through PyAV (README pictures: a GIF plays inline where an
    mp4 does not). GIF holds 256 colours; FFmpeg's encoder here takes the fixed 3-3-2-bit palette."""
    import av

    video = video.cpu().contiguous().numpy()
    with av.open(path, mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "rgb8"
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_png(path: str, image: torch.Tensor):
    """uint8 (H, W, 3) -> PNG with zlib alone (no imaging library needed)."""
    import struct
    import zlib

    h, w, _ = image.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in image.contiguous().cpu().numpy())
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
