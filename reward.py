"""Video rewards behind one call: reward.score(videos, prompts) -> {dimension: scores (B,)}.

videos are uint8 (B, T, H, W, 3), prompts plain strings. Every reward lists its `dims` and a `default_dim`
(the one the paper found best, temporal consistency, Table 4b). `REWARDS` maps a `--reward` name to a
constructor; `--reward a,b` puts several behind one call (`Mixture`, dimensions named `a:dim`). `--reward-dim`
names what a preference is built on (`pick`): one dimension, `global` (the mean of all dimensions, Table 4b), or
a weighted mix `a:dim=1,b:dim=0.5` of dimensions made commensurable (`mix`).
"""
import argparse
import functools
import json
import math
import os

from inputs import UserError, command, read_json, read_text, resolve, writable_file, write_atomically

import numpy as np  # noqa: E402  (inputs first: Ctrl-C during these slow imports is one line too)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from transformers import Idefics2Config, Idefics2Model  # noqa: E402
from transformers.models.idefics2.modeling_idefics2 import Idefics2PreTrainedModel  # noqa: E402


class FormulaReward:
    """A weights-free reward written as a differentiable formula of the pixels: `score` is `score_float`
    without gradients, on uint8 videos."""

    def __init__(self, device="cpu", **_):
        self.device = device

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos.to(self.device).float(), prompts).items()}


class PixelReward(FormulaReward):
    """Weights-free, so the default run downloads nothing. Two dimensions computed from pixels alone:
    - temporal_consistency: VBench's temporal flickering, (255 - mean_i mean|F_{i+1} - F_i|) / 255, in [0, 1];
    - colorfulness: Hasler & Suesstrunk (2003), sigma_rgyb + 0.3 mu_rgyb, divided by 255, mean over frames.
    Neither reads the prompt; they are a stand-in for a learned video reward on the tiny model."""

    dims = ["temporal_consistency", "colorfulness"]
    default_dim = "temporal_consistency"

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


class ToyReward(FormulaReward):
    """What the toy world (toy.py) can judge, with dimensions named after VideoScore's so the paper's Table 4b
    has a toy analogue. All five are in [0, 1] and differentiable in the pixels (ReFL uses them).

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
        # perimeter = P_s r with r = sqrt(area / A_s): for a disc 2 sqrt(pi area)
        per = torch.tensor([toy.SHAPE_PERIMETER.get(s, 2 * math.pi) / math.sqrt(toy.SHAPE_AREA.get(s, math.pi))
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


def reward_names(name: str) -> list[str]:
    """--reward's comma-separated names, each checked (before minutes of loading)."""
    names = name.split(",")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise UserError(f"unknown reward {unknown[0]!r}; choose one of {', '.join(REWARDS)} (or several: a,b)")
    if len(set(names)) != len(names):
        raise UserError(f"--reward {name!r} names a reward twice")
    return names


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

    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {f"{n}:{d}": s for n, r in self.rewards.items() for d, s in r.score(videos, prompts).items()}

    def _score_float(self, x: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {f"{n}:{d}": s for n, r in self.rewards.items() for d, s in r.score_float(x, prompts).items()}


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
    """sum_d w_d s_d / sigma_d with sigma_d the within_prompt_std of dimension d over the scores at hand (the
    step's batch in training, the folder or manifest in evaluation). A pair is chosen by ranking one prompt's
    candidates, so what makes dimensions commensurable is how far apart each places the candidates of ONE prompt,
    not its range across prompts: after the division a weight of 1 is one typical within-prompt difference on any
    reward's scale, and scaling or shifting a reward does not change which candidate wins. A dimension that does not vary among the
    candidates (sigma_d = 0) cannot rank them and contributes 0. The result is in within-prompt standard
    deviations (so is --min-gap for a mix). Differentiable in the scores (ReFL); sigma_d is a constant."""
    first = next(iter(scores.values()))
    total = torch.zeros(len(first), dtype=torch.float64, device=first.device)
    for d, w in weights.items():
        s = scores[d].double()
        sigma = within_prompt_std(s.detach(), group)
        if sigma > 1e-9 * (1 + s.detach().abs().max()):
            total = total + w * s / sigma
    return total.float()


# ----------------------------------------------------------------------------------------------------------
# VideoScore (He et al. 2024, TIGER-AI-Lab/VideoScore): the paper's reward. Mantis-8B-Idefics2 fine-tuned to
# regress five human ratings on a 1..4 scale. Its class, Mantis' Idefics2ForSequenceClassification, is not in
# transformers: it is transformers' Idefics2Model (weights `model.*`) plus a linear head (`score.*`) read at the
# last token. Everything below reproduces examples/run_videoscore.py (Mantis model + transformers 4.4x
# AutoProcessor) with transformers alone; see the README for the parity check.

VIDEOSCORE_DIMS = ["visual_quality", "temporal_consistency", "dynamic_degree", "text_to_video_alignment",
                   "factual_consistency"]  # the order of the five regression outputs

# The query VideoScore was trained and evaluated with (REGRESSION_QUERY_PROMPT in examples/run_videoscore.py),
# byte for byte: it starts with a newline, "sub-score, " keeps its trailing space, it ends with a newline. One
# "<image> " per frame follows it. No chat template.
VIDEOSCORE_TEMPLATE = (
    "\n"
    "Suppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the following frames of a given video and see the text prompt for generating the video,\n"
    "then give scores from 5 different dimensions:\n"
    "(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color\n"
    "(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements\n"
    "(3) dynamic degree, the degree of dynamic changes\n"
    "(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n"
    "\n"
    "for each dimension, output a float number from 1.0 to 4.0,\n"
    "the higher the number is, the better the video performs in that sub-score, \n"
    "the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)\n"
    "Here is an output example:\n"
    "visual quality: 3.2\n"
    "temporal consistency: 2.7\n"
    "dynamic degree: 4.0\n"
    "text-to-video alignment: 2.3\n"
    "factual consistency: 1.8\n"
    "\n"
    'For this video, the text prompt is "{text_prompt}",\n'
    "all the frames of video are as follows:\n"
)
IMAGE, FAKE = "<image>", "<fake_token_around_image>"  # Idefics2's image marker and the token around each image


def videoscore_prompt(prompt: str, n_frames: int) -> str:
    if IMAGE in prompt or FAKE in prompt:
        raise UserError(f"prompt {prompt[:40]!r} contains an Idefics2 image token")
    return VIDEOSCORE_TEMPLATE.format(text_prompt=prompt) + f"{IMAGE} " * n_frames


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """As run_videoscore.py: all frames of a short video, else max_frames at a float stride, truncated
    (np.arange(0, T, T / max_frames).astype(int)). (The benchmark script used linspace over extracted frames.)"""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return np.arange(0, num_frames, num_frames / max_frames).astype(int).tolist()


def idefics2_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Idefics2ImageProcessor's output size: the longer side is capped at `longest` (aspect kept), then EACH side
    is raised to at least `shortest` independently, so a 240x426 frame becomes 378x426 (stretched, as trained)."""
    aspect = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / aspect)
    elif height > width and height > longest:
        height, width = longest, int(longest * aspect)
    return max(height, shortest), max(width, shortest)


def idefics2_pixels(frames: torch.Tensor, proc: dict) -> torch.Tensor:
    """(N, H, W, 3) frames on 0..255 -> normalised pixel values (N, 3, h, w), in torch on the frames' device.
    The resize is PIL's (what Idefics2ImageProcessor calls): bilinear with antialias, a horizontal pass then a
    vertical one, each rounded half up to uint8. Float frames skip the rounding: differentiable."""
    x = frames.permute(0, 3, 1, 2).float()
    size = idefics2_size(x.shape[2], x.shape[3], proc["size"]["shortest_edge"], proc["size"]["longest_edge"])
    for step in ((x.shape[2], size[1]), size):
        if step != tuple(x.shape[2:]):
            x = F.interpolate(x, size=step, mode="bilinear", align_corners=False, antialias=True)
            if frames.dtype == torch.uint8:
                x = (x + 0.5).floor().clamp(0, 255)
    mean = torch.tensor(proc["image_mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(proc["image_std"], device=x.device).view(1, 3, 1, 1)
    return (x * proc["rescale_factor"] - mean) / std


class Idefics2ForSequenceClassification(Idefics2PreTrainedModel):
    """Mantis' class, same module tree and weight names: Idefics2Model + nn.Linear(text hidden, 5)."""

    def __init__(self, config: Idefics2Config):
        super().__init__(config)
        self.model = Idefics2Model(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        """input_ids (B, L) right-padded; pixel_values (N, 3, h, w), the frames of all videos in order.
        Idefics2Model.forward would drop any frame whose pixels are all exactly 0 as batch padding (a gray
        frame normalises to 0); here every frame is a frame. Returns (B, num_labels) in fp32."""
        m, p = self.model, self.config.vision_config.patch_size
        patches = torch.ones(len(pixel_values), pixel_values.shape[2] // p, pixel_values.shape[3] // p,
                             dtype=torch.bool, device=pixel_values.device)  # frames share one size: no padding
        feats = m.vision_model(pixel_values=pixel_values.to(self.dtype), patch_attention_mask=patches).last_hidden_state
        feats = m.connector(feats, attention_mask=patches.view(len(feats), -1))  # perceiver: 64 tokens per frame
        embeds = m.inputs_merger(input_ids, m.get_input_embeddings()(input_ids), feats)
        hidden = m.text_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1  # Mantis pools at the last non-pad token
        return self.score(hidden[torch.arange(len(hidden), device=hidden.device), last]).float()


def folder_json(folder: str, name: str, what: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{what}: {folder} has no {name}")
    return read_json(path, what)


def load_videoscore(path: str, hub_id: str, dtype: torch.dtype):
    """Model, tokenizer and processor settings from a VideoScore folder or Hub id, loaded as published."""
    what = "VideoScore"
    folder = resolve(path, what, hub_id, ["*.json", "*.safetensors"])
    proc = folder_json(folder, "preprocessor_config.json", what)
    if proc.get("do_image_splitting") or proc.get("resample", 2) != 2:
        raise UserError(f"{what}: {folder} asks for image splitting or a non-bilinear resize; not supported")
    config = Idefics2Config.from_dict(folder_json(folder, "config.json", what))
    # Mantis builds the perceiver's RMSNorms with the text model's eps (1e-5); transformers' perceiver config
    # defaults to 1e-6 and only copies it when the hidden sizes differ.
    config.perceiver_config.rms_norm_eps = config.text_config.rms_norm_eps
    config.perceiver_config.hidden_size = config.text_config.hidden_size
    seq_len = folder_json(folder, "processor_config.json", what).get("image_seq_len", 64)
    if seq_len != config.perceiver_config.resampler_n_latents:
        raise UserError(f"{what}: image_seq_len {seq_len} != resampler_n_latents in {folder}/config.json")
    try:
        net, info = Idefics2ForSequenceClassification.from_pretrained(
            folder, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except OSError as e:  # no weights file
        raise UserError(f"{what}: {e}") from None
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise UserError(f"{what}: weights in {folder} do not match the model ({bad or info['error_msgs']})")
    return net.eval().requires_grad_(False), load_idefics2_tokenizer(folder), proc


def load_idefics2_tokenizer(folder: str):
    """The tokenizer as transformers 4.4x (VideoScore's) ran it: tokenizer.json's own pipeline, BOS added per
    tokenizer_config, the image tokens re-added as Idefics2Processor does. transformers 5 rebuilds Llama
    tokenizers with a different space handling around special tokens, which changes the ids, so the file is
    read with `tokenizers` directly."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise UserError(f"VideoScore: {folder} has no tokenizer.json")
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (FAKE, IMAGE, "<end_of_utterance>")])
    cfg = folder_json(folder, "tokenizer_config.json", "VideoScore")
    content = lambda t: t["content"] if isinstance(t, dict) else t
    head = [tok.token_to_id(content(cfg.get("bos_token", "<s>")))] if cfg.get("add_bos_token", True) else []
    tail = [tok.token_to_id(content(cfg.get("eos_token", "</s>")))] if cfg.get("add_eos_token", False) else []
    return lambda text: head + tok.encode(text, add_special_tokens=False).ids + tail


class VideoScore:
    """`--reward videoscore` (16 frames) / `videoscore-v1.1` (48 frames): five raw scores on VideoScore's 1..4
    scale. Several videos go through one forward (`batch_size`); `offload` keeps the model on the CPU except
    inside `score`, so the diffusion model has the accelerator while it samples and trains."""

    dims = VIDEOSCORE_DIMS
    default_dim = "temporal_consistency"  # paper Table 4b

    def __init__(self, device="cpu", path: str | None = None, hub_id: str = "TIGER-Lab/VideoScore",
                 max_frames: int = 16, batch_size: int = 4, offload: bool = False, dtype: torch.dtype | None = None,
                 **_):
        self.device = torch.device(device)
        self.max_frames, self.batch_size, self.offload = max_frames, batch_size, offload
        if batch_size < 1:
            raise UserError("--reward-batch must be at least 1")
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.net, self.tokenize, self.proc = load_videoscore(path or hub_id, hub_id, dtype)
        self.n_latents = self.net.config.perceiver_config.resampler_n_latents
        self.net.to("cpu" if offload else self.device)

    def inputs(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        """The model's inputs for videos (B, T, H, W, 3) on 0..255 (uint8, or float to keep gradients)."""
        idx = frame_indices(videos.shape[1], self.max_frames)
        frames = videos[:, idx].to(self.device)  # pick frames before converting: less to move and resize
        pixels = idefics2_pixels(frames.flatten(0, 1), self.proc)
        # Idefics2Processor: each <image> becomes <fake><image>*64<fake>, then doubled <fake>s are merged
        block = FAKE + IMAGE * self.n_latents + FAKE
        texts = [videoscore_prompt(p, len(idx)).replace(IMAGE, block).replace(FAKE + FAKE, FAKE) for p in prompts]
        ids = [self.tokenize(t) for t in texts]
        n = max(map(len, ids))
        input_ids = torch.tensor([i + [0] * (n - len(i)) for i in ids], device=self.device)  # right padding
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids], device=self.device)
        return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)

    def logits(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, 5) raw scores, differentiable with respect to float videos (the model must be on the device)."""
        return self.net(**self.inputs(videos, prompts))

    def score_float(self, x: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255; the model stays on the device."""
        self.net.to(self.device)
        return dict(zip(self.dims, self.logits(x, prompts).unbind(1)))

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        if self.offload:
            self.net.to(self.device)
        b = self.batch_size
        out = torch.cat([self.logits(videos[i: i + b], prompts[i: i + b]).cpu() for i in range(0, len(videos), b)])
        if self.offload:
            self.net.to("cpu")
        return dict(zip(self.dims, out.unbind(1)))


REWARDS["videoscore"] = VideoScore
REWARDS["videoscore-v1.1"] = functools.partial(VideoScore, hub_id="TIGER-Lab/VideoScore-v1.1", max_frames=48)


# ----------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor V1 on CLIP ViT-L/14, as VBench's aesthetic quality; VBench's frame preprocessing in
# torch (evaluate.py uses it for its DINO / CLIP metrics too).


def vbench_preprocess(frames: torch.Tensor, size: int, mode: str, crop: bool, mean, std) -> torch.Tensor:
    """Frames (T, H, W, 3) on 0..255 -> normalised float (T, 3, h, w) as VBench's torchvision transforms do it on
    float frames (vbench/utils.py clip_transform / dino_transform): Resize(size, antialias=False) sets the short side
    to `size` and the long side to int(size * long / short); CenterCrop(size) cuts at int(round((H - size) / 2));
    then /255 and Normalize. Tensor Resize is F.interpolate(align_corners=False) without clamping on floats."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    new = (size, long) if h <= w else (long, size)
    if new != (h, w):  # torchvision returns the frames untouched when they already have the size
        x = F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=False)
    if crop:
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        x = x[:, :, top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x / 255.0 - mean) / std


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class AestheticReward:
    """`--reward aesthetic`: the LAION aesthetic predictor V1 on CLIP ViT-L/14, VBench's aesthetic quality
    (vbench/aesthetic_quality.py): each frame -> bicubic short side 224 + center crop -> CLIP image embedding
    (projected, 768-d) -> L2 normalised -> nn.Linear(768, 1) -> / 10 (LAION's 1..10 scale); a video scores the
    mean over its frames. `head` (or `path`, train.py's --reward-path) is the published sa_0_4_vit_l_14_linear.pth
    or a safetensors copy, by default VBench's cached one; `clip` a Hub id or folder."""

    dims = ["aesthetic"]
    default_dim = "aesthetic"
    HEAD_URL = "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"

    def __init__(self, device="cpu", clip: str = "openai/clip-vit-large-patch14", head: str | None = None,
                 path: str | None = None, batch: int = 32, **_):
        from transformers import CLIPVisionModelWithProjection

        cache = os.environ.get("VBENCH_CACHE_DIR", os.path.expanduser("~/.cache/vbench"))
        head = head or path or os.path.join(cache, "aesthetic_model", "emb_reader", "sa_0_4_vit_l_14_linear.pth")
        if not os.path.isfile(head):
            raise UserError(f"LAION aesthetic head {head} not found; download it: wget -O {head} {self.HEAD_URL}")
        self.head = nn.Linear(768, 1)
        try:  # a garbage file must be one line, whatever the loader's own error
            if head.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(head)
            else:
                state = torch.load(head, map_location="cpu", weights_only=True)
            self.head.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - unpickling, safetensors, shape and key errors alike
            raise UserError(f"LAION aesthetic head {head} is not sa_0_4_vit_l_14_linear.pth's weights "
                            f"({type(e).__name__}); download it: wget -O {head} {self.HEAD_URL}") from None
        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
        for m in (self.clip, self.head):  # frozen: ReFL's gradients reach the policy only
            m.requires_grad_(False).to(device)
        self.device, self.batch = device, batch

    def frame_scores(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (T, H, W, 3) on 0..255 -> (T,) aesthetic score / 10 on the device, `batch` frames per forward as
        VBench (32); differentiable in float frames."""
        out = []
        for i in range(0, len(frames), self.batch):
            x = vbench_preprocess(frames[i:i + self.batch].to(self.device), 224, "bicubic", True, CLIP_MEAN, CLIP_STD)
            emb = self.clip(pixel_values=x).image_embeds.float()
            out.append(self.head(F.normalize(emb, dim=-1)).squeeze(-1) / 10)
        return torch.cat(out)

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos, prompts).items()}

    def score_float(self, x: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255."""
        return {"aesthetic": torch.stack([self.frame_scores(v).mean() for v in x])}


REWARDS["aesthetic"] = AestheticReward


# ----------------------------------------------------------------------------------------------------------
# Reward agreement with human choices (paper Table 2): for groups of candidate videos of one prompt with a
# human-chosen best, where does the reward rank that best one? MRR and Recall@k over groups.


def agreement(scores: list[list[float]], best: list[int], ks: tuple = (1, 2, 4)) -> dict[str, float]:
    """scores[g][j] = reward of candidate j in group g (higher is better); best[g] = the human's choice.
    Ties are explicit: the best candidate's rank is uniform over the positions its tie group occupies (the
    expected value under random tie-breaking), so a constant reward gets the chance level, not 1.0 or 0."""
    rr, hits = [], {k: [] for k in ks}
    for s, b in zip(scores, best):
        s = torch.as_tensor(s, dtype=torch.float64)
        above = int((s > s[b]).sum())
        ranks = torch.arange(above + 1, above + int((s == s[b]).sum()) + 1, dtype=torch.float64)  # 1-based
        rr.append((1 / ranks).mean().item())
        for k in ks:
            hits[k].append((ranks <= k).double().mean().item())
    mean = lambda v: sum(v) / len(v)
    return {"mrr": mean(rr), **{f"recall@{k}": mean(v) for k, v in hits.items()}}


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


def read_manifest(path: str) -> list[dict]:
    """A JSON list of groups {"prompt": str, "videos": [paths relative to the manifest], "best": path or index}."""
    try:
        groups = json.loads(read_text(path, "manifest"))  # missing, binary or not UTF-8: one line from read_text
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read manifest {path}: {e}") from None
    if not isinstance(groups, list) or not groups:
        raise UserError(f"manifest {path} must be a non-empty JSON list of groups")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("prompt"), str) or len(g.get("videos") or []) < 2:
            raise UserError(f"manifest group {i}: needs a 'prompt' and at least two 'videos'")
        if not isinstance(g["videos"], list) or not all(isinstance(v, str) for v in g["videos"]):
            raise UserError(f"manifest group {i}: 'videos' must be a list of file paths")
        best = g.get("best")
        best = g["videos"].index(best) if best in g["videos"] else best
        if not isinstance(best, int) or not 0 <= best < len(g["videos"]):
            raise UserError(f"manifest group {i}: 'best' must be one of its videos or an index, got {g.get('best')!r}")
        out.append({"prompt": g["prompt"], "videos": [os.path.join(root, v) for v in g["videos"]], "best": best})
    return out


def score_files(reward, paths: list[str], prompt: str) -> dict[str, torch.Tensor]:
    """Scores of video files for one prompt: one batch when the videos share a shape, else one by one."""
    videos = [read_video(p) for p in paths]
    if all(v.shape == videos[0].shape for v in videos):
        return reward.score(torch.stack(videos), [prompt] * len(videos))
    each = [reward.score(v[None], [prompt]) for v in videos]
    return {d: torch.cat([e[d] for e in each]) for d in each[0]}


def run_agreement(manifest: str, reward, dim: str | None = None) -> dict:
    """Agreement of every dimension, of `global`, and of --reward-dim `dim` if given (a mix is scaled by the
    spread within the manifest's groups, pooled over all of them, as in training)."""
    groups = read_manifest(manifest)
    if dim is not None:
        parse_dim(dim, reward.dims)  # before minutes of scoring
    per_group = [score_files(reward, g["videos"], g["prompt"]) for g in groups]
    best = [g["best"] for g in groups]
    result = {d: agreement([pick(s, d).tolist() for s in per_group], best) for d in reward.dims + ["global"]}
    if dim is not None and dim not in result:
        ids = torch.cat([torch.full((len(g["videos"]),), i) for i, g in enumerate(groups)])
        joined = pick({d: torch.cat([s[d] for s in per_group]) for d in reward.dims}, dim, group=ids)
        result[dim] = agreement(list(joined.split([len(g["videos"]) for g in groups])), best)
    return result


def agreement_table(result: dict) -> str:
    """Paper Table 2's layout: a row per reward dimension (and global, and a mix), MRR and Recall@k."""
    cols = list(next(iter(result.values())))
    head = "| reward | " + " | ".join(c.replace("mrr", "MRR").replace("recall@", "Recall@") for c in cols) + " |"
    rows = [f"| {d} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for d, v in result.items()]
    return "\n".join([head, "|" + "---|" * (len(cols) + 1), *rows])


@command()
def main(argv=None):
    p = argparse.ArgumentParser(description="Score videos with a reward, or measure its agreement with human "
                                "choices (MRR, Recall@1/2/4; paper Table 2).")
    p.add_argument("command", choices=["score", "agreement"])
    p.add_argument("paths", nargs="+", help="score: video files; agreement: one manifest JSON")
    p.add_argument("--prompt", default="", help="score: the text prompt of the videos")
    p.add_argument("--reward", default="videoscore", help=f"one of {', '.join(REWARDS)}, or several: a,b")
    p.add_argument("--reward-dim", default=None, help="agreement: also a weighted mix of dimensions, as train.py's "
                   "(e.g. videoscore:temporal_consistency=1,aesthetic=0.5)")
    p.add_argument("--reward-path", default=None, help="local folder or Hub id of the reward's weights (several "
                   "rewards: comma-separated, in --reward's order)")
    p.add_argument("--reward-batch", type=int, default=4, help="videos per reward forward")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.command == "agreement" and len(args.paths) != 1:
        raise UserError("agreement takes one manifest file")
    if args.out:
        writable_file(args.out, "--out")
    reward = build_reward(args.reward, device=args.device, path=args.reward_path, batch_size=args.reward_batch)
    if args.command == "agreement":
        result = run_agreement(args.paths[0], reward, args.reward_dim)
        print(agreement_table(result))
    else:
        scores = [score_files(reward, [path], args.prompt) for path in args.paths]
        result = {path: {d: round(v.item(), 4) for d, v in s.items()} for path, s in zip(args.paths, scores)}
        print(json.dumps(result, indent=1))
    if args.out:
        write_atomically(args.out, [json.dumps(result, indent=1)])
    return result


if __name__ == "__main__":
    main()
