"""A toy text-to-video world that replays OnlineVPO on a laptop CPU.

A video is one coloured shape moving in a straight line over a plain background; its prompt names the
colour, the shape and the direction: "a red circle moving left". Everything a video reward can judge in
this world is computable from pixels (see ToyReward), so the paper's comparisons (online vs offline,
N, K, reward dimension) can be re-run in minutes before spending GPU-days.

    python toy.py                  # pretrain the toy model (about 25 minutes on 2 CPU cores) -> toy/
    python toy.py --steps 5        # a smoke run

The weights it writes ship in the repository (toy/model.safetensors), so `python train.py` starts from a
model that already draws moving shapes, imperfectly: there is something left to align.
"""
import argparse
import copy
import json
import math
import os
import time

from inputs import (ANY, UserError, check_domains, command, refuse_empty, writable_dir, writable_file, write_atomically,
                    writing)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)

import opensora as osr  # noqa: E402
from model import ByteTokenizer, PixelSpace, OpenSoraModel, load_dit, size_for, tiny_t5  # noqa: E402
from reward import FormulaReward, check_videos  # noqa: E402

# The world's vocabulary. Colours are RGB on 0..255; directions are (dx, dy) in image coordinates (y down).
COLORS = {"red": (220, 50, 50), "green": (60, 190, 70), "blue": (60, 100, 235), "yellow": (235, 210, 60),
          "white": (235, 235, 235)}
SHAPES = ("circle", "bar", "pole")  # a bar lies flat, a pole stands upright
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (40, 40, 48)
SIZE, FRAMES, FPS = 32, 8, 8
SPEED = 1.5  # pixels per frame: the shape travels 10.5 px over 8 frames
BAR = (1.5, 0.4)  # a bar's half-length and half-thickness in half-sizes r: 3.75:1

TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")
# The toy denoiser: the tiny model's STDiT3, wider and deeper, still a few MB of fp32 weights.
TOY_DIT = dict(in_channels=3, patch_size=(1, 4, 4), hidden_size=96, depth=3, num_heads=4, pred_sigma=False,
               caption_channels=32, model_max_length=48, input_sq_size=32, qk_norm=True)


def build_toy(size: str | None = None, frames: int | None = None, dit: str | None = None, **_) -> OpenSoraModel:
    """`--model toy`, the README's default: the toy world's model, a wider STDiT3 pretrained on moving shapes, 32x32,
    8 frames. Its weights ship in the repository (toy/); `dit="random"` gives the untrained network."""
    height, width = size_for("", "", size or f"{SIZE}x{SIZE}", 8)
    if dit == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = osr.STDiT3(**TOY_DIT)
    else:
        folder = dit or TOY_DIR
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            raise UserError(f"toy weights: {folder}/model.safetensors not found; run `python toy.py` to make them")
        net = load_dit(folder)
    return OpenSoraModel("toy", net, PixelSpace(), tiny_t5(TOY_DIT["caption_channels"]), ByteTokenizer(),
                      height, width, frames or FRAMES, fps=FPS, sample_steps=10, cfg=4.0, beta=500.0,
                      max_length=TOY_DIT["model_max_length"], aes=None, use_timestep_transform=False,
                      segment_seconds=0.25,  # DenseDPO: 4 segments of 2 frames in the 1 s toy clip
                      high_noise_share=0.5)  # DPO's t as pretraining drew it (pretraining_timesteps)


def prompt_for(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def all_prompts() -> list[str]:
    return [prompt_for(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def parse_prompt(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, direction) named in a prompt; None for what it does not name."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    find = lambda vocab: next((w for w in words if w in vocab), None)
    return find(COLORS), find(SHAPES), find(DIRECTIONS)


# ----------------------------------------------------------------------------------------------------------
# Rendering: anti-aliased shapes from signed distances, so edges are soft over one pixel as in a real video


def coverage(shape: str, px: torch.Tensor, py: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
             r: torch.Tensor) -> torch.Tensor:
    """Fraction of each pixel covered by the shape centred at (cx, cy) with half-size r (broadcast).
    A bar is 3 r long and 0.8 r thick, a pole the same bar upright: at r = 6..8 px the three shapes differ
    over whole 4x4 patches, the toy model's token (a circle, square and triangle of one area differ only near
    their outlines, inside one patch, and a model of this size never learned to tell them apart)."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        sd = (dx * dx + dy * dy).sqrt() - r
    elif shape == "bar":
        sd = torch.maximum(dx.abs() - BAR[0] * r, dy.abs() - BAR[1] * r)
    else:  # pole
        sd = torch.maximum(dy.abs() - BAR[0] * r, dx.abs() - BAR[1] * r)
    return (0.5 - sd).clamp(0, 1)


def render(colors: list[str], shapes: list[str], directions: list[str], generator: torch.Generator,
           size: int = SIZE, frames: int = FRAMES) -> torch.Tensor:
    """uint8 videos (B, T, H, W, 3): per video a random half-size (6..8 px) and a path whose midpoint lies
    within 3 px of the frame's centre, so the whole path stays inside the frame."""
    b = len(colors)
    r = 6 + 2 * torch.rand(b, generator=generator)
    travel = SPEED * (frames - 1)
    d = torch.tensor([DIRECTIONS[k] for k in directions], dtype=torch.float)  # (B, 2)
    mid = size / 2 + 3.0 * (2 * torch.rand(b, 2, generator=generator) - 1)
    start = mid - travel / 2 * d
    t = torch.arange(frames, dtype=torch.float)
    centre = start[:, None] + SPEED * t[None, :, None] * d[:, None]  # (B, T, 2)
    py, px = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    bg = torch.tensor(BACKGROUND, dtype=torch.float)
    out = torch.empty(b, frames, size, size, 3)
    for i in range(b):
        a = coverage(shapes[i], px, py, centre[i, :, 0, None, None], centre[i, :, 1, None, None],
                     r[i])[..., None]  # (T, H, W, 1)
        out[i] = bg * (1 - a) + torch.tensor(COLORS[colors[i]], dtype=torch.float) * a
    return (out + 0.5).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The shape judge: what a person would name in a video, computed from pixels (not from any model)

# Area and perimeter of each shape's render at half-size r (coverage() above), in r^2 and r.
SHAPE_AREA = {"circle": math.pi, "bar": 4 * BAR[0] * BAR[1], "pole": 4 * BAR[0] * BAR[1]}
SHAPE_PERIMETER = {"circle": 2 * math.pi, "bar": 4 * (BAR[0] + BAR[1]), "pole": 4 * (BAR[0] + BAR[1])}


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean masks (..., H, W): 0 off the mask, else a label per component
    (the largest pixel index in it), by propagating the max label until nothing changes."""
    h, w = mask.shape[-2:]
    flat = mask.reshape(-1, 1, h, w)
    labels = torch.where(flat, torch.arange(1, h * w + 1, dtype=torch.float).view(1, 1, h, w), 0.0)
    while True:
        grown = torch.nn.functional.max_pool2d(labels, 3, 1, 1) * flat
        if torch.equal(grown, labels):
            return labels.view(mask.shape).long()
        labels = grown


JUDGE_VERSION = 2  # raised whenever judge() names videos differently: 2 = the outline and the filled-frame rule


def outline(xs: torch.Tensor, ys: torch.Tensor) -> str:
    """The shape a piece's bounding box names, a second opinion beside the template overlap: bar (lying) or pole
    (upright) when one side is at least half a bar's elongation (1.875 = 3.75 / 2) times the other, else circle.
    A bar drawn half as long as it should be has the area of a bar and overlaps the bar template best, but a person
    reads it as a round blob."""
    w, h = float(xs.max() - xs.min()) + 1, float(ys.max() - ys.min()) + 1
    half = (BAR[0] / BAR[1]) / 2
    return "bar" if w >= half * h else "pole" if h >= half * w else "circle"


def judge(videos: torch.Tensor, min_share: float = 0.9, min_frames: float = 0.75) -> list[dict]:
    """Per uint8 video (B, T, H, W, 3), what a person would name: {"shape", "outline", "color", "coherent"}.

    A pixel is the object's if it is more than 60 (RGB distance) from the background, two fifths of the way to
    the world's colour closest to it (green, 153 away). A frame is coherent if its largest 8-connected piece holds >= min_share of those
    pixels, at least 12 of them and at most half the frame; the piece's shape is the template (circle, bar, pole of the same area and
    centroid) it overlaps best (IoU), its outline the one its bounding box names (`outline`). A video is coherent
    if >= min_frames of its frames are; its shape and outline are the most frequent over its coherent frames and
    its colour the world's colour nearest the piece's mean colour.
    """
    B, T, H, W, _ = videos.shape
    x = videos.float()
    fg = (x - torch.tensor(BACKGROUND, dtype=torch.float)).norm(dim=-1) > 60  # (B, T, H, W)
    labels = components(fg)
    py, px = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float)
    verdicts = []
    for b in range(B):
        shapes, outlines, colours = [], [], []
        for t in range(T):
            lab = labels[b, t]
            counts = torch.bincount(lab.flatten(), minlength=H * W + 1)[1:]
            if counts.sum() == 0:
                continue
            piece = lab == counts.argmax() + 1
            area = piece.sum().item()
            if area < 12 or area < min_share * counts.sum().item() or area > H * W / 2:
                continue  # too small, in pieces, or the frame filled (a world's shape covers at most a fifth)
            cx, cy = px[piece].mean(), py[piece].mean()
            iou = {}
            for s in SHAPES:
                r = torch.tensor(math.sqrt(area / SHAPE_AREA[s]))
                template = coverage(s, px, py, cx, cy, r) > 0.5
                iou[s] = (template & piece).sum().item() / max((template | piece).sum().item(), 1)
            shapes.append(max(iou, key=iou.get))
            outlines.append(outline(px[piece], py[piece]))
            colours.append(x[b, t][piece].mean(0))
        coherent = len(shapes) >= min_frames * T
        shape = max(set(shapes), key=shapes.count) if shapes else None
        drawn = max(set(outlines), key=outlines.count) if outlines else None
        colour = (list(COLORS)[int((palette - torch.stack(colours).mean(0)).norm(dim=-1).argmin())]
                  if colours else None)
        verdicts.append({"shape": shape, "outline": drawn, "color": colour, "coherent": coherent})
    return verdicts


def judge_rates(videos: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Share of videos with the prompted shape as one coherent object, and with the prompted colour."""
    return {dim: float(v.mean()) for dim, v in ShapeJudge().score(videos, prompts).items()}


def random_batch(b: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """b random videos of the world with their prompts."""
    pick = lambda seq: [seq[int(i)] for i in torch.randint(len(seq), (b,), generator=generator)]
    colors, shapes, directions = pick(list(COLORS)), pick(SHAPES), pick(list(DIRECTIONS))
    videos = render(colors, shapes, directions, generator)
    return videos, [prompt_for(*c) for c in zip(colors, shapes, directions)]


def to_latents(videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> the tiny model's pixel latents (B, 3, T, H, W) in [-1, 1]."""
    return videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------
# The toy reward: the judge's questions as differentiable scores, for training (reward.REWARDS['toy'])


class ToyReward(FormulaReward):
    """`--reward toy`: what this world can judge, with dimensions named after VideoScore's so the paper's
    Table 4b has a toy analogue. All five are in [0, 1] and differentiable in the pixels (ReFL uses them).

    Per pixel, a = how far it is from the world's background colour, relative to the colour the prompt names:
    a is the shape's coverage for a correct render (anti-aliased edges included). From a:
    - visual_quality: sharpness, 1 / (1 + max(0, w - 0.75)) with w = sum 4a(1-a) / perimeter, the width in
      pixels of the shape's edge (a clean anti-aliased render has w = 0.6..0.75, a 3x3 box blur about 2, and
      grain makes it large); the perimeter is that of the named shape (a disc if the prompt names none) with the
      render's area;
    - temporal_consistency: 1 - mean over consecutive frames of (relative change of the shape's area +
      change of its mean colour / 255) / 2: a shape that flickers, fades or vanishes loses;
    - dynamic_degree: mean centroid speed over the world's speed (1.5 px/frame), capped at 1;
    - color_alignment: 1 - |mean shape colour - named colour| / 200, floored at 0;
    - direction_alignment: net centroid travel along the named direction over the world's travel,
      mapped from [-1, 1] to [0, 1]: 0.5 for a still shape, 1 for the right path, 0 for the opposite one.
    A prompt that names no colour (direction) gets 0.5 for that dimension: the world cannot judge it."""

    dims = ["visual_quality", "temporal_consistency", "dynamic_degree", "color_alignment", "direction_alignment"]
    default_dim = "temporal_consistency"

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """Differentiable: float videos (B, T, H, W, 3) on 0..255."""
        B, T, H, W, _ = x.shape
        named = [parse_prompt(p) for p in prompts]
        bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device)
        target = torch.tensor([COLORS.get(c, (255, 255, 255)) for c, _, _ in named], dtype=x.dtype,
                              device=x.device)  # (B, 3)
        d_ref = (target - bg).norm(dim=-1).view(B, 1, 1, 1)
        a = ((x - bg).norm(dim=-1) / d_ref).clamp(0, 1)  # (B, T, H, W) coverage estimate
        eps = 1e-6
        area = a.sum((2, 3))  # (B, T)
        # perimeter = P_s r with r = sqrt(area / A_s): for a disc 2 sqrt(pi area)
        per = torch.tensor([SHAPE_PERIMETER.get(s, 2 * math.pi) / math.sqrt(SHAPE_AREA.get(s, math.pi))
                            for _, s, _ in named], dtype=x.dtype, device=x.device)[:, None]
        edge = (4 * a * (1 - a)).sum((2, 3)) / (per * (area + eps).sqrt() + eps)  # (B, T) in pixels
        sharp = (1 / (1 + (edge - 0.75).clamp(min=0))).mean(1)
        colour = (a[..., None] * x).sum((2, 3)) / (area[..., None] + eps)  # (B, T, 3)
        ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                                torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
        centre = torch.stack([(a * xs).sum((2, 3)), (a * ys).sum((2, 3))], -1) / (area[..., None] + eps)
        if T > 1:
            d_area = (area[:, 1:] - area[:, :-1]).abs() / (torch.maximum(area[:, 1:], area[:, :-1]) + eps)
            d_colour = (colour[:, 1:] - colour[:, :-1]).norm(dim=-1) / 255
            consistency = 1 - ((d_area + d_colour.clamp(max=1)) / 2).mean(1)
            speed = (centre[:, 1:] - centre[:, :-1]).norm(dim=-1).mean(1)
            dynamic = (speed / SPEED).clamp(max=1)
        else:
            consistency, dynamic = torch.ones(B, device=x.device), torch.zeros(B, device=x.device)
        direction = torch.tensor([DIRECTIONS.get(d, (0, 0)) for _, _, d in named], dtype=x.dtype,
                                 device=x.device)
        along = ((centre[:, -1] - centre[:, 0]) * direction).sum(-1) / (SPEED * max(T - 1, 1))
        direction_ok = (along.clamp(-1, 1) + 1) / 2
        colour_ok = 1 - ((colour.mean(1) - target).norm(dim=-1) / 200).clamp(max=1)
        no_colour = torch.tensor([c is None for c, _, _ in named], device=x.device)
        colour_ok = torch.where(no_colour, torch.full_like(colour_ok, 0.5), colour_ok)
        return {"visual_quality": sharp, "temporal_consistency": consistency.clamp(0, 1),
                "dynamic_degree": dynamic, "color_alignment": colour_ok, "direction_alignment": direction_ok}


class ShapeJudge:
    """`--reward judge`, or `--eval-reward judge`: toy.judge's verdicts as scores, 1 or 0 per video. `shape`: the
    prompted shape as one coherent object (template overlap); `legible`: that, and its bounding box names the same
    shape (a bar long enough to read as a bar); `color`: the prompted colour. Not a formula a policy can climb by
    small steps, and not what the toy reward measures: a held-out check on a run trained with the toy reward."""

    dims = ["shape", "legible", "color"]
    default_dim = "legible"

    def __init__(self, device="cpu", **_):
        self.device = device

    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        named = [parse_prompt(p) for p in prompts]
        verdicts = judge(videos.cpu())
        shape = [v["coherent"] and v["shape"] == s for v, (_, s, _) in zip(verdicts, named)]
        legible = [ok and v["outline"] == s for ok, v, (_, s, _) in zip(shape, verdicts, named)]
        return {"shape": torch.tensor(shape, dtype=torch.float), "legible": torch.tensor(legible, dtype=torch.float),
                "color": torch.tensor([float(v["color"] == c) for v, (c, _, _) in zip(verdicts, named)])}


# ----------------------------------------------------------------------------------------------------------
# Pretraining: Open-Sora's own objective (rectified flow) on rendered videos, with more high-noise steps


def pretraining_timesteps(b: int, generator: torch.Generator) -> torch.Tensor:
    """Half the batch at Open-Sora's logit-normal t, half uniform on the noisiest fifth, t in [800, 1000].
    The high-noise steps decide whether a sample holds one object or scattered 4x4-patch pieces, and the
    logit-normal alone puts only 1.4% of training at t >= 900 (README, "The toy world")."""
    t = osr.training_timesteps(b, generator)
    high = 800 + 200 * torch.rand(b, generator=generator)
    return torch.where(torch.arange(b) % 2 == 1, high, t)


def pretrain(steps: int, batch_size: int, lr: float, out: str, seed: int = 0, drop_caption: float = 0.1,
             ema_decay: float = 0.998, log_every: int = 50) -> dict:
    torch.manual_seed(seed)
    model = build_toy(dit="random")  # the text side (byte T5) is fixed; only the DiT learns
    net = model.dit.train()
    # adaLN-Zero practice (DiT, Peebles & Xie 2023): a zero output layer starts the velocity at 0, so the loss
    # starts at E|x0 - noise|^2 instead of several times that; Open-Sora's own init leaves it random.
    torch.nn.init.zeros_(net.final_layer.linear.weight)
    torch.nn.init.zeros_(net.final_layer.linear.bias)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    null = net.y_embedder.y_embedding.detach()
    tic, history = time.perf_counter(), []
    for step in range(1, steps + 1):
        for g in opt.param_groups:  # linear warm-up, then cosine decay to 10%
            g["lr"] = lr * min(1.0, step / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        videos, prompts = random_batch(batch_size, gen)
        x0 = to_latents(videos)
        y, mask = model.encode_prompts(prompts)
        drop = torch.rand(batch_size, generator=gen) < drop_caption  # so classifier-free guidance has a null
        y = torch.where(drop[:, None, None, None], null[None, None].to(y), y)
        noise = torch.randn(x0.shape, generator=gen)
        t = pretraining_timesteps(batch_size, gen)
        loss = model.errors(net, x0, noise, t, y, mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # an EMA of the weights samples much cleaner after a short run
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        history.append(loss.item())
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {sum(history[-log_every:]) / len(history[-log_every:]):.4f} "
                  f"{time.perf_counter() - tic:.0f}s", flush=True)
    model.dit = ema
    with writing(out):
        model.save_weights(out, ema)
    return {"steps": steps, "seconds": time.perf_counter() - tic, "final_loss": sum(history[-50:]) / len(history[-50:])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=TOY_DIR, help="folder for model.safetensors + config.json (default: the shipped "
                   "toy/, which a run replaces only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the weights --out already holds")
    return p


DOMAINS = [  # inputs.check_domains, before the pretraining starts
    ("steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("batch_size", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("lr", lambda v, a: math.isfinite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("seed", ANY, ""), ("out", ANY, ""),
]


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    writable_dir(args.out, "--out")  # before the pretraining, not after it
    outputs = [os.path.join(args.out, f) for f in ("model.safetensors", "config.json", "pretrain.json")]
    for path in outputs:
        writable_file(path, "--out")
    if not args.overwrite and os.path.exists(outputs[0]):
        raise UserError(f"{outputs[0]} exists (the shipped toy model, when --out is toy/): give another --out, or "
                        "--overwrite to replace it")
    result = pretrain(args.steps, args.batch_size, args.lr, args.out, args.seed)
    write_atomically(outputs[2], [json.dumps({**vars(args), **result}, indent=1)])
    print(f"wrote {args.out}/model.safetensors ({result['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
