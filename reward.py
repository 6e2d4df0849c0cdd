"""Video rewards behind one call: reward.score(videos, prompts) -> {dimension: scores (B,)}.

videos are uint8 (B, T, H, W, 3), prompts plain strings. Every reward lists its `dims` and a `default_dim`
(the one the paper found best, temporal consistency, Table 4b). `REWARDS` maps a `--reward` name to a
constructor; `--reward-dim global` is the mean over all dimensions.
"""
import math

import torch

from model import UserError


class PixelReward:
    """Weights-free, so the default run downloads nothing. Two dimensions computed from pixels alone:
    - temporal_consistency: VBench's temporal flickering, (255 - mean_i mean|F_{i+1} - F_i|) / 255, in [0, 1];
    - colorfulness: Hasler & Suesstrunk (2003), sigma_rgyb + 0.3 mu_rgyb, divided by 255, mean over frames.
    Neither reads the prompt; they are a stand-in for a learned video reward on the tiny model."""

    dims = ["temporal_consistency", "colorfulness"]
    default_dim = "temporal_consistency"

    def __init__(self, device="cpu", **_):
        self.device = device

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos.to(self.device).float(), prompts).items()}

    def score_float(self, x: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Differentiable: float videos (B, T, H, W, 3) on 0..255, scores on x's device (ReFL, Table 4c)."""
        if x.shape[1] > 1:
            mae = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 4))  # per consecutive pair
            flicker = (255.0 - mae.mean(1)) / 255.0
        else:
            flicker = torch.ones(x.shape[0], device=x.device)
        r, g, b = x.unbind(-1)
        rg, yb = r - g, 0.5 * (r + g) - b
        sigma = (rg.flatten(2).var(2, unbiased=False) + yb.flatten(2).var(2, unbiased=False)).sqrt()
        mu = (rg.flatten(2).mean(2) ** 2 + yb.flatten(2).mean(2) ** 2).sqrt()
        colorfulness = ((sigma + 0.3 * mu) / 255.0).mean(1)
        return {"temporal_consistency": flicker, "colorfulness": colorfulness}


class ToyReward:
    """What the toy world (toy.py) can judge, with dimensions named after VideoScore's so the paper's Table 4b
    has a toy analogue. All five are in [0, 1] and differentiable in the pixels (ReFL uses them).

    Per pixel, a = how far it is from the world's background colour, relative to the colour the prompt names:
    a is the shape's coverage for a correct render (anti-aliased edges included). From a:
    - visual_quality: sharpness, 1 / (1 + max(0, w - 0.75)) with w = sum 4a(1-a) / perimeter, the width in
      pixels of the shape's edge (a clean anti-aliased render has w = 0.6..0.75, a 3x3 box blur about 2, and
      grain makes it large); the perimeter is that of a disc of the shape's area;
    - temporal_consistency: 1 - mean over consecutive frames of (relative change of the shape's area +
      change of its mean colour / 255) / 2: a shape that flickers, fades or vanishes loses;
    - dynamic_degree: mean centroid speed over the world's speed (2 px/frame), capped at 1;
    - color_alignment: 1 - |mean shape colour - named colour| / 200, floored at 0;
    - direction_alignment: net centroid travel along the named direction over the world's travel,
      mapped from [-1, 1] to [0, 1]: 0.5 for a still shape, 1 for the right path, 0 for the opposite one.
    A prompt that names no colour (direction) gets 0.5 for that dimension: the world cannot judge it."""

    dims = ["visual_quality", "temporal_consistency", "dynamic_degree", "color_alignment", "direction_alignment"]
    default_dim = "temporal_consistency"

    def __init__(self, device="cpu", **_):
        self.device = device

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos.to(self.device).float(), prompts).items()}

    def score_float(self, x: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Differentiable: float videos (B, T, H, W, 3) on 0..255."""
        import toy

        B, T, H, W, _ = x.shape
        named = [toy.parse_prompt(p) for p in prompts]
        bg = torch.tensor(toy.BACKGROUND, dtype=x.dtype, device=x.device)
        target = torch.tensor([toy.COLORS.get(c, (255, 255, 255)) for c, _, _ in named], dtype=x.dtype,
                              device=x.device)  # (B, 3)
        d_ref = (target - bg).norm(dim=-1).view(B, 1, 1, 1)
        a = ((x - bg).norm(dim=-1) / d_ref).clamp(0, 1)  # (B, T, H, W) coverage estimate
        eps = 1e-6
        area = a.sum((2, 3))  # (B, T)
        edge = (4 * a * (1 - a)).sum((2, 3)) / (2 * (math.pi * area + eps).sqrt() + eps)  # (B, T) in pixels
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
            dynamic = (speed / toy.SPEED).clamp(max=1)
        else:
            consistency, dynamic = torch.ones(B, device=x.device), torch.zeros(B, device=x.device)
        direction = torch.tensor([toy.DIRECTIONS.get(d, (0, 0)) for _, _, d in named], dtype=x.dtype,
                                 device=x.device)
        along = ((centre[:, -1] - centre[:, 0]) * direction).sum(-1) / (toy.SPEED * max(T - 1, 1))
        direction_ok = (along.clamp(-1, 1) + 1) / 2
        colour_ok = 1 - ((colour.mean(1) - target).norm(dim=-1) / 200).clamp(max=1)
        no_colour = torch.tensor([c is None for c, _, _ in named], device=x.device)
        colour_ok = torch.where(no_colour, torch.full_like(colour_ok, 0.5), colour_ok)
        return {"visual_quality": sharp, "temporal_consistency": consistency.clamp(0, 1),
                "dynamic_degree": dynamic, "color_alignment": colour_ok, "direction_alignment": direction_ok}


def check_videos(videos: torch.Tensor, prompts: list[str]):
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise UserError(f"videos must be uint8 (B, T, H, W, 3), got {tuple(videos.shape)} {videos.dtype}")
    if videos.shape[0] != len(prompts) or videos.shape[1] == 0:
        raise UserError(f"{videos.shape[0]} videos with {videos.shape[1]} frames for {len(prompts)} prompts")


REWARDS = {"toy": ToyReward, "pixel": PixelReward}


def build_reward(name: str, **kwargs):
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name](**kwargs)


def pick(scores: dict[str, torch.Tensor], dim: str) -> torch.Tensor:
    """The dimension the preference is built on; 'global' is the mean of all dimensions (paper Table 4b)."""
    if dim == "global":
        return torch.stack(list(scores.values())).mean(0)
    if dim not in scores:
        raise UserError(f"unknown reward dimension {dim!r}; choose one of {', '.join(scores)}, global")
    return scores[dim]
