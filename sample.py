"""Generate videos from a base model or a fine-tuned checkpoint, written as mp4 with VBench's naming.

    python sample.py --n 2 --strip strip.png --strip-scale 4     # the toy model: mp4s and a PNG of their frames
    python sample.py --model opensora --checkpoint runs/vpo/checkpoint-200 --prompts prompts/eval.txt --n 5
Each prompt gives `{prompt}-{i}.mp4`, i = 0..n-1, the layout VBench's evaluation expects (inputs.video_names:
unsafe characters are dropped, a repeated prompt continues its numbering, colliding names get a short hash).
"""
import argparse
import math
import os
import re

from inputs import (ANY, UserError, check_domains, command, default_prompts, known_device, load_prompts, refuse_empty,
                    stream_seed, video_names, writable_dir, writable_file)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)

import checkpoint  # noqa: E402
import lora  # noqa: E402
from model import MODELS, build_model
from videos import read_video, write_gif, write_png, write_video


def tiles(videos: torch.Tensor, scale: int, gap: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) frames upscaled by `scale` (nearest) with white gaps right of and below each."""
    v = videos.repeat_interleave(scale, -3).repeat_interleave(scale, -2)
    return torch.nn.functional.pad(v, (0, 0, 0, gap, 0, gap), value=255)


def frame_strip(videos: torch.Tensor, scale: int = 1, gap: int = 2) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> one image, a row of frames per video, for a quick look or a README."""
    v = tiles(videos, scale, gap)
    b, t, h, w, c = v.shape
    return v.permute(0, 2, 1, 3, 4).reshape(b * h, t * w, c)


def side_by_side(groups: list[torch.Tensor], scale: int = 1, gap: int = 4) -> torch.Tensor:
    """uint8 videos (B, T, H, W, 3) of each group (before, after, ...) -> one video (T, H', W', 3): a row per video
    index, the groups side by side, white gaps between them; for an animated GIF."""
    return torch.cat([torch.cat([tiles(v, scale, gap) for v in row], 2) for row in zip(*groups)], 1)


def read_beside(folder: str, names: list[list[str]]) -> list[torch.Tensor]:
    """--beside: an earlier sample.py run's videos of the same prompts and --n, per prompt (n, T, H, W, 3)."""
    if not os.path.isdir(folder):
        raise UserError(f"--beside {folder!r} is not a folder (give the --out of an earlier sample.py run)")
    missing = [n for row in names for n in row if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"--beside {folder!r} holds no {missing[0]!r}: sample it with the same --prompts and --n")
    return [torch.stack([read_video(os.path.join(folder, n)) for n in row]) for row in names]


def sample_videos(model, prompts: list[str], n: int, seed: int):
    """(prompt, n uint8 videos) for each prompt: N candidates in one batched call, decoded. Prompt k's video i
    starts from its own noise stream ("sample", seed, k, i), so the same prompts give the same videos in every run
    (eval samples during training, sample.py, ablate.py's evaluation) and never a training candidate's noise."""
    for k, prompt in enumerate(prompts):
        seeds = [stream_seed("sample", seed, k, i) for i in range(n)]
        yield prompt, model.decode(model.sample([prompt], n, seeds))


def add_model_args(p: argparse.ArgumentParser):
    """Flags shared by train.py and sample.py: which model, where its weights are, what size it generates."""
    p.add_argument("--model", default="toy", help=f"base model: {', '.join(MODELS)} (default: toy, shipped "
                   "weights; tiny = the same network family, random weights)")
    p.add_argument("--dit", default=None, help="denoiser weights: Hugging Face id or folder (opensora "
                   "hpcai-tech/OpenSora-STDiT-v3; cogvideox, wan, wan2.2-5b, wan2.2-14b, ltx: the pipeline or a transformer "
                   "folder; toy: toy/)")
    p.add_argument("--vae", default=None, help="VAE: Hub id or folder (opensora default hpcai-tech/OpenSora-VAE-v1.2)")
    p.add_argument("--text-encoder", default=None, help="T5: Hub id or folder (opensora default DeepFloyd/t5-v1_1-xxl)")
    p.add_argument("--resolution", default=None, help="Open-Sora resolution name: 240p (default), 360p, 480p, 720p "
                   "(opensora only; other models take --size)")
    p.add_argument("--aspect", default=None, help="Open-Sora aspect-ratio name (default 9:16, 240x426 at 240p)")
    p.add_argument("--size", default=None, help="explicit HxW in pixels instead of --resolution/--aspect")
    p.add_argument("--frames", type=int, default=None, help="frames per video (opensora 51, cogvideox 49, wan 81, "
                   "wan2.2-5b 121, wan2.2-14b 81, ltx 161, toy/tiny 8)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (opensora 30 as in the paper, "
                   "cogvideox/wan/wan2.2-5b/ltx 50, wan2.2-14b 40, toy 10, tiny 20)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (opensora 7.0, "
                   "cogvideox 6.0, wan 5.0, wan2.2-5b 5.0, wan2.2-14b 4.0 and 3.0 for its low-noise expert (--cfg sets "
                   "both), ltx 3.0, toy/tiny 4.0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="compute dtype (bf16 on GPU, fp32 on CPU)")


finite = math.isfinite
# The model flags' domains (inputs.check_domains), checked before anything loads: a 16 GB model must not load to
# hear --frames -3. --size's multiple is the model's own (its builder checks it, before any weights load).
MODEL_DOMAINS = [
    ("model", lambda v, a: v in MODELS, "{v!r} is no model here; choose one of " + ", ".join(MODELS)),
    ("frames", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("sample_steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("cfg", lambda v, a: finite(v) and v >= 0, "must be a finite number >= 0 (1: no guidance), got {v}"),
    ("size", lambda v, a: re.fullmatch(r"[1-9]\d*x[1-9]\d*", v.lower()) is not None,
     "must look like 240x432 (height x width in pixels), got {v!r}"),
    ("resolution", lambda v, a: a.model == "opensora" and not a.size,
     "is Open-Sora's size name: for --model opensora without --size (other models take --size)"),
    ("aspect", lambda v, a: a.model == "opensora" and not a.size,
     "is Open-Sora's aspect name: for --model opensora without --size (other models take --size)"),
    ("device", lambda v, a: known_device(v), "{v!r}: not a device torch sees here (cpu; cuda or cuda:I for a "
     "visible GPU)"),
    *[(flag, ANY, "") for flag in ("dit", "vae", "text_encoder")],  # Hub ids or folders: inputs.resolve checks them
]


def check_model_args(args):
    check_domains(args, MODEL_DOMAINS)


def model_from_args(args) -> "VideoModel":  # noqa: F821
    check_model_args(args)
    kwargs = {k: getattr(args, k) for k in ("dit", "vae", "text_encoder", "resolution", "aspect") if getattr(args, k)}
    model = build_model(args.model, size=args.size, frames=args.frames, **kwargs)
    dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    model.to(args.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    if args.sample_steps:
        model.sample_steps = args.sample_steps
    if args.cfg is not None:
        model.cfg = args.cfg
        if hasattr(model, "cfg_low"):  # wan2.2-14b: the low-noise expert's guidance too
            model.cfg_low = args.cfg
    return model


def checkpoint_weights(folder: str) -> str:
    """The policy weights of a train.py checkpoint folder, checked readable (a run killed mid-save leaves a
    truncated file) before the base model spends minutes loading."""
    if not os.path.isdir(folder):
        raise UserError(f"--checkpoint {folder!r} is not a folder (give a train.py checkpoint-<step> folder)")
    path = os.path.join(folder, "model.safetensors")
    adapter = os.path.join(folder, lora.ADAPTER_FILE)
    if not os.path.isfile(path) and os.path.isfile(adapter):  # a LoRA run's checkpoint (without --merge-lora)
        checkpoint.verified(folder, lora.CONFIG_FILE)  # the config that shapes the adapters, by its sha256 too
        lora.read_config(folder)
        return checkpoint.verified(folder, lora.ADAPTER_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {folder!r} holds no model.safetensors: not a train.py checkpoint folder")
    return checkpoint.verified(folder, "model.safetensors")  # its sha256 against state.json's, where there is one


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint-<step> folder (its policy weights)")
    p.add_argument("--prompts", default=None, help="txt (one per line) or csv (default: the model's eval prompts)")
    p.add_argument("--n", type=int, default=5, help="videos per prompt (VBench uses 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--strip", default=None, help="also write every video as a row of frames to this PNG file")
    p.add_argument("--strip-scale", type=int, default=1, help="pixel upscaling of the strip and the GIF")
    p.add_argument("--gif", default=None, help="also write the videos as one looping animated GIF, a row per video")
    p.add_argument("--beside", default=None, help="the --out of an earlier sample.py run with the same --prompts and "
                   "--n (the base model's, say): in --strip its video's row comes above each of this run's, in --gif "
                   "on its left (before | after)")
    p.add_argument("--overwrite", action="store_true", help="replace videos (and --strip) that --out already holds "
                   "under the same names (without it, such a run is refused: nothing is replaced)")
    return p


DOMAINS = MODEL_DOMAINS + [  # every other flag of sample.py; ANY: any value of its type (a path: its reader checks it)
    ("n", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("strip_scale", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    *[(flag, ANY, "") for flag in ("checkpoint", "prompts", "seed", "out", "strip", "gif", "beside")],
]


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    prompts = load_prompts(args.prompts or default_prompts(args.model, "eval"))
    weights = checkpoint_weights(args.checkpoint) if args.checkpoint else None  # before the model loads
    writable_dir(args.out, "--out")  # before the sampling, not after it
    pictures = [path for path in (args.strip, args.gif) if path]
    for path in pictures:
        writable_file(path, "--strip" if path == args.strip else "--gif")
    names = video_names(prompts, args.n)
    before = read_beside(args.beside, names) if args.beside else None  # before the sampling, not after it
    taken = [n for row in names for n in row if os.path.exists(os.path.join(args.out, n))]
    taken += [path for path in pictures if os.path.exists(path)]
    if taken and not args.overwrite:
        raise UserError(f"{args.out} already holds {len(taken)} of this run's outputs ({taken[0]!r}, ...): give "
                        "another --out, or --overwrite to replace them")
    adapter = lora.read_config(args.checkpoint) if weights and weights.endswith(lora.ADAPTER_FILE) else None
    if adapter and args.dit is None:
        args.dit = adapter["base"]  # the network the adapter was trained on
    model = model_from_args(args)
    if adapter:
        lora.add_adapters(model.dit, adapter["rank"], adapter["alpha"], 0.0, adapter["targets"])
        lora.load_adapter(weights, model.dit, model.name)
    elif weights:
        model.load_weights(weights)
    after = []
    for k, (prompt, videos) in enumerate(sample_videos(model, prompts, args.n, args.seed)):
        for name, video in zip(names[k], videos):
            write_video(os.path.join(args.out, name), video, model.fps)
        after.append(videos)
        print(f"[{k + 1}/{len(prompts)}] {prompt}")
    after = torch.cat(after)
    if before is not None and before[0].shape[1:] != after.shape[1:]:
        raise UserError(f"--beside {args.beside!r} holds videos of shape {tuple(before[0].shape[1:])}, this run's are "
                        f"{tuple(after.shape[1:])}: sample both with the same model size and --frames")
    groups = [torch.cat(before), after] if before is not None else [after]
    if args.strip:  # a row per video; with --beside, each earlier video's row above this run's
        write_png(args.strip, frame_strip(torch.stack(groups, 1).flatten(0, 1), args.strip_scale))
    if args.gif:
        write_gif(args.gif, side_by_side(groups, args.strip_scale), model.fps)


if __name__ == "__main__":
    main()
