"""Video rewards behind one call: reward.score(videos, prompts) -> {dimension: scores (B,)}.

videos are uint8 (B, T, H, W, 3), prompts plain strings. Every reward lists its `dims` and a `default_dim`
(the one the paper found best, temporal consistency, Table 4b). `REWARDS` maps a `--reward` name to a
constructor; `--reward-dim global` is the mean over all dimensions.
"""
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
        x = videos.to(self.device).float()  # (B, T, H, W, 3) on 0..255
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
        return {"temporal_consistency": flicker.cpu(), "colorfulness": colorfulness.cpu()}


def check_videos(videos: torch.Tensor, prompts: list[str]):
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise UserError(f"videos must be uint8 (B, T, H, W, 3), got {tuple(videos.shape)} {videos.dtype}")
    if videos.shape[0] != len(prompts) or videos.shape[1] == 0:
        raise UserError(f"{videos.shape[0]} videos with {videos.shape[1]} frames for {len(prompts)} prompts")


REWARDS = {"pixel": PixelReward}


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
