"""Generate videos from a base model or a fine-tuned checkpoint, written as mp4 with VBench's naming.

    python sample.py --n 2 --strip strip.png --strip-scale 4     # the toy model: mp4s and a PNG of their frames
    python sample.py --model opensora --checkpoint runs/vpo/checkpoint-200 --prompts prompts/eval.txt --n 5
Each prompt gives `{prompt}-{i}.mp4`, i = 0..n-1, the layout VBench's evaluation expects.
"""
import argparse
import os
import sys

import torch

from model import MODELS, UserError, build_model


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


def frame_strip(videos: torch.Tensor, scale: int = 1, gap: int = 2) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> one image, a row of frames per video, for a quick look or a README."""
    v = videos.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    v = torch.nn.functional.pad(v, (0, 0, 0, gap, 0, gap), value=255)  # white gaps right of / below frames
    b, t, h, w, c = v.shape
    return v.permute(0, 2, 1, 3, 4).reshape(b * h, t * w, c)


def video_name(prompt: str, i: int) -> str:
    """VBench's file name: the prompt itself (slashes replaced, capped at 180 bytes) then -i."""
    name = prompt.strip().replace("/", " ")
    return f"{name.encode('utf-8')[:180].decode('utf-8', 'ignore')}-{i}.mp4"


PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def default_prompts(model: str, kind: str) -> str:
    """The shipped prompt file for a model: the toy world's own prompts for `toy`, general ones otherwise."""
    names = {"toy": {"train": "toy.txt", "eval": "toy_eval.txt"}}.get(model, {"train": "train.txt", "eval": "eval.txt"})
    return os.path.join(PROMPTS_DIR, names[kind])


def load_prompts(path: str, column: str | None = None) -> list[str]:
    """A .txt file (one prompt per line) or a .csv file (the column --prompt-column, default 'text')."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} not found")
    if path.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            column = column or "text"
            if column not in (reader.fieldnames or []):
                raise UserError(f"{path} has no column {column!r} (columns: {reader.fieldnames}); "
                                "pass --prompt-column")
            prompts = [row[column].strip() for row in reader]
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt file {path!r} holds no prompts")
    return prompts


def add_model_args(p: argparse.ArgumentParser):
    """Flags shared by train.py and sample.py: which model, where its weights are, what size it generates."""
    p.add_argument("--model", default="toy", help=f"base model: {', '.join(MODELS)} (default: toy, shipped "
                   "weights; tiny = the same network family, random weights)")
    p.add_argument("--dit", default=None, help="denoiser weights: Hugging Face id or folder (opensora "
                   "hpcai-tech/OpenSora-STDiT-v3; cogvideox/wan: the pipeline or a transformer folder; toy: toy/)")
    p.add_argument("--vae", default=None, help="VAE: Hub id or folder (opensora default hpcai-tech/OpenSora-VAE-v1.2)")
    p.add_argument("--text-encoder", default=None, help="T5: Hub id or folder (opensora default DeepFloyd/t5-v1_1-xxl)")
    p.add_argument("--resolution", default="240p", help="Open-Sora resolution name: 240p, 360p, 480p, 720p "
                   "(opensora only; other models take --size)")
    p.add_argument("--aspect", default="9:16", help="Open-Sora aspect-ratio name (its 9:16 is 240x426 at 240p)")
    p.add_argument("--size", default=None, help="explicit HxW in pixels instead of --resolution/--aspect")
    p.add_argument("--frames", type=int, default=None, help="frames per video (opensora 51, cogvideox 49, wan 81, "
                   "toy/tiny 8)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (opensora 30 as in the paper, "
                   "cogvideox/wan 50, toy 10, tiny 20)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (opensora 7.0, "
                   "cogvideox 6.0, wan 5.0, toy/tiny 4.0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="compute dtype (bf16 on GPU, fp32 on CPU)")


def model_from_args(args) -> "VideoModel":  # noqa: F821
    kwargs = {k: getattr(args, k) for k in ("dit", "vae", "text_encoder") if getattr(args, k)}
    model = build_model(args.model, resolution=args.resolution, aspect=args.aspect, size=args.size,
                        frames=args.frames, **kwargs)
    dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    model.to(args.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    if args.sample_steps:
        model.sample_steps = args.sample_steps
    if args.cfg is not None:
        model.cfg = args.cfg
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint-<step> folder (its policy weights)")
    p.add_argument("--prompts", default=None, help="txt (one per line) or csv (default: the model's eval prompts)")
    p.add_argument("--prompt-column", default=None, help="csv column holding the prompts (default: text)")
    p.add_argument("--n", type=int, default=5, help="videos per prompt (VBench uses 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--strip", default=None, help="also write every video as a row of frames to this PNG file")
    p.add_argument("--strip-scale", type=int, default=1, help="pixel upscaling of the strip")
    args = p.parse_args(argv)
    try:
        if args.n < 1:
            raise UserError("--n must be at least 1")
        prompts = load_prompts(args.prompts or default_prompts(args.model, "eval"), args.prompt_column)
        model = model_from_args(args)
        if args.checkpoint:
            model.load_weights(os.path.join(args.checkpoint, "model.safetensors"))
        os.makedirs(args.out, exist_ok=True)
        strip = []
        for k, prompt in enumerate(prompts):
            seeds = [args.seed * 1_000_003 + k * args.n + i for i in range(args.n)]
            videos = model.decode(model.sample([prompt], args.n, seeds))
            for i, video in enumerate(videos):
                write_video(os.path.join(args.out, video_name(prompt, i)), video, model.fps)
            strip.append(videos)
            print(f"[{k + 1}/{len(prompts)}] {prompt}")
        if args.strip:
            write_png(args.strip, frame_strip(torch.cat(strip), args.strip_scale))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
