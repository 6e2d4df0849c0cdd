"""Video rewards behind one call: reward.score(videos, prompts, fps) -> {dimension: scores (B,)}.

videos are uint8 (B, T, H, W, 3), prompts plain strings, fps the videos' frame rate (a reward that samples
frames in time needs it; the others ignore it). Every reward lists its `dims` and a `default_dim`
(the one the paper found best, temporal consistency, Table 4b). `REWARDS` maps a `--reward` name to a
constructor; `--reward a,b` puts several behind one call (`Mixture`, dimensions named `a:dim`). `--reward-dim`
names what a preference is built on (`pick`): one dimension, `global` (the mean of all dimensions, Table 4b), or
a weighted mix `a:dim=1,b:dim=0.5` of dimensions made commensurable (`mix`).

The weights-free rewards live here (`pixel`; the toy world's `toy` in toy.py); the learned ones in videoscore.py,
videoreward.py and image_rewards.py, each imported only when built. Agreement with human choices (paper
Table 2): agreement.py.

    python reward.py score my.mp4 --prompt "a red ball rolls to the left" --reward videoscore
"""
import argparse
import functools
import importlib
import json
import math
import os

from inputs import (ANY, UserError, check_domains, command, known_device, read_json, refuse_empty, writable_file,
                    write_atomically)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)

from videos import read_fps, read_video  # noqa: E402


class FormulaReward:
    """A weights-free reward written as a differentiable formula of the pixels: `score` is `score_float`
    without gradients, on uint8 videos."""

    def __init__(self, device="cpu", **_):
        self.device = device

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos.to(self.device).float(), prompts).items()}


class PixelReward(FormulaReward):
    """Weights-free, so the default run downloads nothing. Two dimensions computed from pixels alone:
    - temporal_consistency: VBench's temporal flickering, (255 - mean_i mean|F_{i+1} - F_i|) / 255, in [0, 1];
    - colorfulness: Hasler & Suesstrunk (2003), sigma_rgyb + 0.3 mu_rgyb, divided by 255, mean over frames.
    Neither reads the prompt; they are a stand-in for a learned video reward on the tiny model."""

    dims = ["temporal_consistency", "colorfulness"]
    default_dim = "temporal_consistency"

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
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


def check_videos(videos: torch.Tensor, prompts: list[str]):
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise UserError(f"videos must be uint8 (B, T, H, W, 3), got {tuple(videos.shape)} {videos.dtype}")
    if videos.shape[0] != len(prompts) or videos.shape[1] == 0:
        raise UserError(f"{videos.shape[0]} videos with {videos.shape[1]} frames for {len(prompts)} prompts")


def folder_json(folder: str, name: str, what: str) -> dict:
    """A JSON file that a learned reward's weights folder must hold (VideoScore, VideoReward, ImageReward): its
    absence or bad JSON is one line, not a traceback."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{what}: {folder} has no {name}")
    return read_json(path, what)


def lazy(module: str, name: str):
    """A learned reward's class, imported when the reward is built: `import reward` stays free of transformers
    (seconds to import, and not needed by the pixel rewards), and toy.py, which imports this file, is named here
    without an import cycle."""
    build = lambda **kwargs: getattr(importlib.import_module(module), name)(**kwargs)  # noqa: E731
    build.cls = lambda: getattr(importlib.import_module(module), name)  # its dims, without building it
    return build


REWARDS = {"toy": lazy("toy", "ToyReward"), "judge": lazy("toy", "ShapeJudge"), "pixel": PixelReward,
           "videoscore": lazy("videoscore", "VideoScore"),
           "videoscore-v1.1": functools.partial(lazy("videoscore", "VideoScore"), hub_id="TIGER-Lab/VideoScore-v1.1",
                                                max_frames=48),
           "videoreward": lazy("videoreward", "VideoReward"),
           "aesthetic": lazy("image_rewards", "AestheticReward"),
           "pickscore": lazy("image_rewards", "PickScore"),
           "hpsv2": lazy("image_rewards", "HPSv2"),
           "imagereward": lazy("image_rewards", "ImageReward")}


def reward_names(name: str) -> list[str]:
    """--reward's comma-separated names, each checked (before minutes of loading)."""
    names = name.split(",")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise UserError(f"unknown reward {unknown[0]!r}; choose one of {', '.join(REWARDS)} (or several: a,b)")
    if len(set(names)) != len(names):
        raise UserError(f"--reward {name!r} names a reward twice")
    return names


def reward_dims(name: str) -> list[str]:
    """The dimensions --reward would have once built (named reward:dim for several): read off the classes, so a bad
    --reward-dim is refused before minutes of loading."""
    names = reward_names(name)
    classes = {}
    for n in names:
        make = getattr(REWARDS[n], "func", REWARDS[n])  # functools.partial: videoscore-v1.1
        classes[n] = make.cls() if hasattr(make, "cls") else make
    return list(classes[names[0]].dims) if len(names) == 1 else [f"{n}:{d}" for n, c in classes.items() for d in c.dims]


def build_reward(name: str, path: str | None = None, **kwargs):
    """`name` is one reward of REWARDS, or several joined by commas (a Mixture); `path` their weights in the same
    comma-separated order (an empty entry: that reward's default)."""
    names = reward_names(name)
    paths = path.split(",") if path else [""] * len(names)
    if len(paths) != len(names):
        raise UserError(f"--reward-path gives {len(paths)} paths for {len(names)} rewards: one per reward, comma-"
                        "separated, empty for a reward's default")
    built = {n: REWARDS[n](path=p or None, **kwargs) for n, p in zip(names, paths)}
    return built[name] if len(names) == 1 else Mixture(built)


class Mixture:
    """Several rewards behind one call: the videos go to each in turn; dimensions are named `reward:dim`. The
    default dimension is the first reward's."""

    def __init__(self, rewards: dict):
        self.rewards = rewards
        self.dims = [f"{n}:{d}" for n, r in rewards.items() for d in r.dims]
        first = next(iter(rewards))
        self.default_dim = f"{first}:{rewards[first].default_dim}"
        if all(hasattr(r, "score_float") for r in rewards.values()):
            self.score_float = self._score_float  # ReFL needs every component differentiable

    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        return {f"{n}:{d}": s for n, r in self.rewards.items() for d, s in r.score(videos, prompts, fps).items()}

    def _score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        return {f"{n}:{d}": s for n, r in self.rewards.items() for d, s in r.score_float(x, prompts, fps).items()}


def parse_dim(spec: str, dims: list[str]) -> str | dict[str, float]:
    """--reward-dim: 'global', one dimension (its raw score), or a weighted mix 'a=1,b=0.5' ('a,b': weights 1),
    returned as {dimension: weight}. In a Mixture a dimension may drop its 'reward:' prefix where no other reward
    has a dimension of that name."""
    if spec == "global":
        return spec

    def resolve(name: str) -> str:
        if name in dims:
            return name
        matches = [d for d in dims if d.partition(":")[2] == name]
        if len(matches) == 1:
            return matches[0]
        hint = f"it is ambiguous: {', '.join(matches)}" if matches else f"choose one of {', '.join(dims)}, global"
        raise UserError(f"unknown reward dimension {name!r}; {hint}")

    if "=" not in spec and "," not in spec:
        return resolve(spec)
    weights = {}
    for term in spec.split(","):
        name, eq, w = (part.strip() for part in term.partition("="))
        try:
            weight = float(w) if eq else 1.0
        except ValueError:
            raise UserError(f"--reward-dim {term!r}: the weight must be a number (dimension=weight)") from None
        if not math.isfinite(weight) or weight == 0:
            raise UserError(f"--reward-dim {term!r}: the weight must be a finite non-zero number")
        if resolve(name) in weights:
            raise UserError(f"--reward-dim names {name!r} twice")
        weights[resolve(name)] = weight
    return weights


def pick(scores: dict[str, torch.Tensor], dim: str, group: "int | torch.Tensor | None" = None) -> torch.Tensor:
    """The score the preference is built on (--reward-dim, parse_dim): one dimension as the reward gives it;
    'global' the plain mean of all dimensions (paper Table 4b); a weighted mix through `mix`, whose scale needs the
    candidates' grouping by prompt (`group`, see within_prompt_std)."""
    spec = parse_dim(dim, list(scores))
    if spec == "global":
        return torch.stack(list(scores.values())).mean(0)
    if isinstance(spec, str):
        return scores[spec]
    return mix(scores, spec, group)


def within_prompt_std(s: torch.Tensor, group: "int | torch.Tensor | None") -> torch.Tensor:
    """How far apart one dimension places the candidates of one prompt: the standard deviation of each score from
    its prompt's mean, pooled over the prompts. `group`: each `group` consecutive scores are one prompt's, or a
    tensor of prompt ids, one per score. Without groups (None, or every prompt scored once) the plain standard
    deviation over all the scores."""
    if isinstance(group, int):
        group = torch.arange(len(s), device=s.device) // group
    _, ids = torch.unique(group if group is not None else torch.arange(len(s)), return_inverse=True)
    ids = ids.to(s.device)
    count = torch.zeros(int(ids.max()) + 1, dtype=s.dtype, device=s.device).index_add_(0, ids, torch.ones_like(s))
    dof = len(s) - len(count)
    if dof == 0:
        return s.std() if len(s) > 1 else s.new_zeros(())
    mean = torch.zeros_like(count).index_add_(0, ids, s) / count
    return ((s - mean[ids]) ** 2).sum().div(dof).sqrt()


def mix(scores: dict[str, torch.Tensor], weights: dict[str, float], group: "int | torch.Tensor | None") -> torch.Tensor:
    """sum_d w_d (s_d - mean s_d) / sigma_d, sigma_d the within_prompt_std of dimension d and the mean taken over
    the scores at hand (the step's batch in training, the folder or manifest in evaluation). A pair is chosen by
    ranking one prompt's candidates, so what makes dimensions commensurable is how far apart each places the
    candidates of ONE prompt, not its range across prompts: after the division a weight of 1 is one typical
    within-prompt difference on any reward's scale, and scaling or shifting a reward does not change which
    candidate wins. A dimension that does not vary among the candidates (sigma_d = 0) cannot rank them and
    contributes 0. The result is in within-prompt standard deviations above the average candidate (so is
    --min-gap for a mix). Differentiable in the scores; sigma_d and the mean are constants."""
    first = next(iter(scores.values()))
    total = torch.zeros(len(first), dtype=torch.float64, device=first.device)
    for d, w in weights.items():
        s = scores[d].double()
        sigma = within_prompt_std(s.detach(), group)
        if sigma > 1e-9 * (1 + s.detach().abs().max()):
            total = total + w * (s - s.detach().mean()) / sigma  # centred: readable logs, the same ranking
    return total.float()


def add_reward_args(p, what: str):
    """The flags of the reward commands (reward.py score, agreement.py): which reward, its weights, its batch, where
    the result goes, the device."""
    p.add_argument("--reward", default="videoscore", help=f"one of {', '.join(REWARDS)}, or several: a,b")
    p.add_argument("--reward-path", default=None, help="local folder or Hub id of the reward's weights (several "
                   "rewards: comma-separated, in --reward's order)")
    p.add_argument("--reward-batch", type=int, default=4, help="videos per reward forward")
    p.add_argument("--out", default=None, help=f"also write {what} as JSON to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


# The reward commands' flags (reward.py score, agreement.py), for inputs.check_domains: before any reward loads
REWARD_DOMAINS = [
    ("reward", lambda v, a: bool(reward_names(v)), ""),  # reward_names refuses an unknown name itself
    ("reward_batch", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("device", lambda v, a: known_device(v), "{v!r}: not a device torch sees here (cpu; cuda or cuda:I for a "
     "visible GPU)"),
    *[(flag, ANY, "") for flag in ("reward_path", "out")],
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score video files with a reward (its agreement with human choices: "
                                "agreement.py).")
    p.add_argument("command", choices=["score"])
    p.add_argument("paths", nargs="+", help="video files")
    p.add_argument("--prompt", default="", help="the text prompt of the videos")
    add_reward_args(p, "the scores")
    return p


DOMAINS = REWARD_DOMAINS + [(flag, ANY, "") for flag in ("paths", "prompt")]  # files: read_video names a bad one


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    if args.out:
        writable_file(args.out, "--out")
    reward = build_reward(args.reward, device=args.device, path=args.reward_path, batch_size=args.reward_batch)
    scores = [reward.score(read_video(path)[None], [args.prompt], read_fps(path)) for path in args.paths]
    result = {path: {d: round(v.item(), 4) for d, v in s.items()} for path, s in zip(args.paths, scores)}
    print(json.dumps(result, indent=1))
    if args.out:
        write_atomically(args.out, [json.dumps(result, indent=1)])
    return result


if __name__ == "__main__":
    main()
