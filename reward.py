"""Video rewards behind one call: reward.score(videos, prompts, fps) -> {dimension: scores (B,)}.

videos are uint8 (B, T, H, W, 3), prompts plain strings, fps the videos' frame rate (a reward that samples
frames in time needs it; the others ignore it). Every reward lists its `dims` and a `default_dim`
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

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
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
    x = pil_resize(x, size, "bilinear", frames.dtype == torch.uint8)
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

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255; the model stays on the device."""
        self.net.to(self.device)
        return dict(zip(self.dims, self.logits(x, prompts).unbind(1)))

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
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
# VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", KwaiVGI/VideoAlign): Qwen2-VL-2B
# with a bias-free linear head read at three special tokens of its prompt, <|VQ_reward|>, <|MQ_reward|>,
# <|TA_reward|>: visual quality, motion quality, text alignment, trained Bradley-Terry on human pairs. The
# release is a folder: model_config.json (sampling, prompt, normalisation), checkpoint-N/model.pth (every weight,
# PEFT names, the LoRA unmerged), checkpoint-N/tokenizer/; the base model's config comes from
# model_config's model_name_or_path (Qwen/Qwen2-VL-2B-Instruct). Everything below reproduces its inference.py
# (commit 219ab9d) with transformers' Qwen2-VL classes; see the README for the parity check.

VIDEOREWARD_DIMS = ["visual_quality", "motion_quality", "text_alignment", "overall"]
VIDEOREWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
# prompt_template.py's "detailed_special", byte for byte: two trailing spaces after the three headers and after
# "acceptable.", one after "possible.". Filled in with str.format, so braces in a user's prompt stay literal.
VIDEOREWARD_TEMPLATE = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 "
    "being the worst and 10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)
# The stock Qwen2-VL-Instruct chat template around one user turn holding the video, then the text
# (apply_chat_template(add_generation_prompt=True), default system prompt).
QWEN2VL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>{video}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def videoreward_frames(total: int, video_fps: float, fps: float, num_frames: int | None = None) -> list[int]:
    """vision_process.py smart_nframes + uniform sampling: total / video_fps * fps frames (the video's TRUE rate:
    with a wrong one the model sees the motion sped up or slowed down, VideoAlign issue #21), clamped to
    [4, total] and rounded to an even count (Python's round, half to even), then linspace(0, total - 1, n) rounded
    half to even. `num_frames` (model_config's nframes branch) replaces the fps rule."""
    if num_frames:
        n = round(num_frames / 2) * 2
    else:
        lo, hi = math.ceil(4 / 2) * 2, math.floor(min(768, total) / 2) * 2
        n = round(min(max(total / video_fps * fps, lo), hi) / 2) * 2
    n = min(n, total)
    if not 2 <= n <= total:
        raise UserError(f"VideoReward samples {n} frames of a {total}-frame video: it needs at least 2 frames")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def qwen2vl_size(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """vision_process.py smart_resize: both sides multiples of 28, the area brought into [min_pixels, max_pixels]
    with the aspect kept (so small videos are UPscaled: 240x320 becomes 280x392)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen2vl_patches(frames: torch.Tensor, size: tuple[int, int], patch: int = 14, temporal: int = 2,
                    merge: int = 2) -> tuple[torch.Tensor, list[int]]:
    """(T, H, W, 3) frames on 0..255, T even -> Qwen2-VL's (t * h * w, 3 * 2 * 14 * 14) patch rows and its grid
    [t, h, w]. The resize is torchvision's on uint8 (fetch_video): bicubic with antialias, clamped and rounded
    back to integers; float frames keep their graph and skip the rounding. Then /255, CLIP mean/std, and the
    image processor's patch order (two consecutive frames per temporal patch, 2x2 patches per merged token)."""
    x = frames.permute(0, 3, 1, 2).float()
    if tuple(x.shape[2:]) != size:  # torchvision returns a same-size video untouched
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        if frames.dtype == torch.uint8:
            x = x.round()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = ((x.double() / 255).float() - mean) / std  # the processor rescales in float64, normalises in float32
    T, C, H, W = x.shape
    t, h, w = T // temporal, H // patch, W // patch
    x = x.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, C * temporal * patch * patch)
    return x, [t, h, w]


def merge_lora(state: dict, scale: float) -> dict:
    """PEFT-wrapped weights -> plain ones: 'base_model.model.' dropped, W = W_base + scale * B @ A for every
    module with a LoRA (scale = alpha / r; VideoAlign does not use rsLoRA), the base layer's bias kept."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            module, _, leaf = k.rpartition(".base_layer.")
            if leaf == "weight" and f"base_model.model.{module}.lora_A.default.weight" in state:
                a = state[f"base_model.model.{module}.lora_A.default.weight"].float()
                b = state[f"base_model.model.{module}.lora_B.default.weight"].float()
                v = v.float() + scale * (b @ a)  # kept in fp32: a bf16 rounding here is a second one
            k = f"{module}.{leaf}"
        out[k] = v
    return out


def load_videoreward(path: str, hub_id: str, base: str | None, dtype: torch.dtype):
    """(vision tower, language model, head, tokenizer, settings) from a VideoReward release folder or Hub id."""
    from tokenizers import Tokenizer
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    what = "VideoReward"
    folder = resolve(path, what, hub_id, ["model_config.json", "checkpoint-*/model.pth", "checkpoint-*/tokenizer/*"])
    cfg = folder_json(folder, "model_config.json", what)
    data, model_cfg = cfg.get("data_config", {}), cfg.get("model_config", {})
    lora = cfg.get("peft_lora_config", {})
    if data.get("prompt_template_type") != "detailed_special" or model_cfg.get("reward_token") != "special" or \
            data.get("eval_dim") != ["VQ", "MQ", "TA"]:
        raise UserError(f"{what}: {folder}/model_config.json is not the published VideoReward setting "
                        "(prompt_template_type detailed_special, reward_token special, eval_dim VQ/MQ/TA)")
    steps = sorted((int(d.split("-")[1]) for d in os.listdir(folder)
                    if d.startswith("checkpoint-") and d.split("-")[1].isdigit()), reverse=True)
    if not steps or not os.path.isfile(os.path.join(folder, f"checkpoint-{steps[0]}", "model.pth")):
        raise UserError(f"{what}: {folder} has no checkpoint-N/model.pth (the release's weights)")
    ckpt = os.path.join(folder, f"checkpoint-{steps[0]}")  # the latest, as inference.py picks it
    base = base or model_cfg.get("model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct")
    base_dir = resolve(base, f"{what} base model", "Qwen/Qwen2-VL-2B-Instruct", ["config.json"])
    config = Qwen2VLConfig.from_dict(folder_json(base_dir, "config.json", f"{what} base model"))
    try:
        state = torch.load(os.path.join(ckpt, "model.pth"), map_location="cpu", weights_only=True, mmap=True)
        scale = lora["lora_alpha"] / lora["lora_r"] if lora.get("lora_enable") else 0.0
        state = merge_lora(state, scale)
    except Exception as e:  # noqa: BLE001 - unpickling and key errors alike: one line
        raise UserError(f"{what}: cannot read {ckpt}/model.pth as a plain state dict ({type(e).__name__}: {e})") \
            from None
    head = state.pop("rm_head.weight", None)
    if head is None or head.shape[0] not in (1, 3):
        raise UserError(f"{what}: {ckpt}/model.pth has no rm_head.weight of 1 or 3 outputs")
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]  # resized to the added tokens
    # transformers 4.45 names (visual.*, model.* = the language model) -> Qwen2VLModel's; lm_head is unused
    weights = {("language_model." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()
               if k != "lm_head.weight"}
    net = Qwen2VLModel(config).to(dtype)
    # VideoAlign casts the whole model to bf16, buffers included, in training and at inference: its RoPE
    # frequencies (language model and vision tower) are bf16-rounded, and the weights learned them so. In fp32
    # they are rounded too; at positions ~1000 the exact frequencies move the scores by ~0.5 (tiny model)
    for m in net.modules():
        for name in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(m, name, None), torch.Tensor):
                setattr(m, name, getattr(m, name).to(torch.bfloat16).to(dtype))
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{what}: {ckpt}/model.pth does not fit {base_dir}/config.json (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]})")
    rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False).to(dtype)
    rm_head.weight.data.copy_(head)
    tok_file = os.path.join(ckpt, "tokenizer", "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise UserError(f"{what}: {ckpt}/tokenizer has no tokenizer.json")
    tok = Tokenizer.from_file(tok_file)
    ids = [tok.token_to_id(t) for t in VIDEOREWARD_TOKENS]
    if None in ids or max(ids) >= config.text_config.vocab_size:
        raise UserError(f"{what}: {tok_file} lacks the reward tokens {', '.join(VIDEOREWARD_TOKENS)}")
    if tok.token_to_id("<|video_pad|>") != config.video_token_id:
        raise UserError(f"{what}: {tok_file} and {base_dir}/config.json disagree on the <|video_pad|> token id")
    settings = dict(fps=float(data.get("fps", 2.0)), num_frames=data.get("num_frames"),
                    max_pixels=int(data.get("max_frame_pixels", 200704)), norm=cfg.get("inference_config"),
                    reward_ids=ids, pad_id=tok.token_to_id("<|endoftext|>"))
    return net.eval().requires_grad_(False), rm_head.eval().requires_grad_(False), tok, settings


class VideoReward:
    """`--reward videoreward`: VideoAlign's VideoReward. Dimensions: visual_quality, motion_quality,
    text_alignment (each (x - mean) / std with the release's validation-set statistics, as its inference.py
    reports them; raw if model_config.json has no inference_config) and overall = their sum. The default is
    motion_quality, the dimension nearest the paper's temporal consistency. It samples the video at 2 frames per
    second of ITS OWN time, so `score` needs the videos' true frame rate (`fps`)."""

    dims = VIDEOREWARD_DIMS
    default_dim = "motion_quality"
    HUB_ID = "KlingTeam/VideoReward"

    def __init__(self, device="cpu", path: str | None = None, base: str | None = None, batch_size: int = 4,
                 offload: bool = False, dtype: torch.dtype | None = None, **_):
        self.device = torch.device(device)
        self.batch_size, self.offload = batch_size, offload
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)  # the release runs bf16
        self.net, self.head, self.tok, self.cfg = load_videoreward(path or self.HUB_ID, self.HUB_ID, base, dtype)
        self.video_token = self.net.config.video_token_id
        for m in (self.net, self.head):
            m.to("cpu" if offload else self.device)

    def inputs(self, videos: torch.Tensor, prompts: list[str], fps: float) -> dict:
        """input_ids / attention_mask (right-padded), patch rows of all videos in order, and their grids."""
        cfg, rows, grids, ids = self.cfg, [], [], []
        idx = videoreward_frames(videos.shape[1], fps, cfg["fps"], cfg["num_frames"])
        size = qwen2vl_size(videos.shape[2], videos.shape[3], 128 * 28 * 28, cfg["max_pixels"])
        for video, prompt in zip(videos, prompts):
            x, grid = qwen2vl_patches(video[idx].to(self.device), size)
            rows.append(x)
            grids.append(grid)
            text = VIDEOREWARD_TEMPLATE.format(text_prompt=prompt)
            pads = "<|video_pad|>" * (grid[0] * grid[1] * grid[2] // 4)  # one token per 2x2 merged patches
            ids.append(self.tok.encode(QWEN2VL_CHAT.format(video=pads, text=text), add_special_tokens=False).ids)
        n = max(map(len, ids))
        input_ids = torch.tensor([i + [cfg["pad_id"]] * (n - len(i)) for i in ids], device=self.device)
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids], device=self.device)
        return dict(input_ids=input_ids, attention_mask=mask, pixels=torch.cat(rows),
                    grid=torch.tensor(grids, device=self.device))

    def logits(self, videos: torch.Tensor, prompts: list[str], fps: float) -> torch.Tensor:
        """(B, 3) raw VQ, MQ, TA; differentiable with respect to float videos."""
        inp, net = self.inputs(videos, prompts, fps), self.net
        for p in prompts:
            if any(t in p for t in VIDEOREWARD_TOKENS + ["<|video_pad|>", "<|im_end|>", "<|vision_start|>"]):
                raise UserError(f"prompt {p[:40]!r} contains a Qwen2-VL special token")
        ids = inp["input_ids"]
        embeds = net.language_model.embed_tokens(ids)
        video = net.visual(inp["pixels"].to(embeds.dtype), grid_thw=inp["grid"]).pooler_output
        embeds = embeds.masked_scatter((ids == self.video_token)[..., None], video.to(embeds.dtype))
        # VideoAlign's forward passes no position ids, so transformers 4.45 gave every RoPE section the plain
        # positions 0..L-1, not Qwen2-VL's 3-D ones; the language model alone does the same here
        hidden = net.language_model(inputs_embeds=embeds, attention_mask=inp["attention_mask"],
                                    use_cache=False).last_hidden_state
        at = torch.stack([(ids == t).float().argmax(1) for t in self.cfg["reward_ids"]], 1)  # (B, 3) positions
        out = self.head(hidden[torch.arange(len(ids), device=ids.device)[:, None], at]).float()  # (B, 3, 1 or 3)
        return out[..., 0] if out.shape[-1] == 1 else out.diagonal(dim1=1, dim2=2)

    def named(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        norm = self.cfg["norm"]
        if norm:
            raw = torch.stack([(raw[:, i] - norm[f"{k}_mean"]) / norm[f"{k}_std"] for i, k in
                               enumerate(("VQ", "MQ", "TA"))], 1)
        return dict(zip(self.dims, [*raw.unbind(1), raw.sum(1)]))

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255; the model stays on the device."""
        for m in (self.net, self.head):
            m.to(self.device)
        return self.named(self.logits(x, prompts, need_fps(fps)))

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        fps = need_fps(fps)
        if self.offload:
            for m in (self.net, self.head):
                m.to(self.device)
        b = self.batch_size
        raw = torch.cat([self.logits(videos[i: i + b], prompts[i: i + b], fps).cpu() for i in range(0, len(videos), b)])
        if self.offload:
            for m in (self.net, self.head):
                m.to("cpu")
        return self.named(raw)


def need_fps(fps: float | None) -> float:
    if fps is None or not math.isfinite(fps) or fps <= 0:
        raise UserError(f"VideoReward needs the videos' true frame rate, got {fps}: it samples 2 frames per second "
                        "of the video's own time")
    return float(fps)


REWARDS["videoreward"] = VideoReward


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
    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos, prompts).items()}

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255."""
        return {"aesthetic": torch.stack([self.frame_scores(v).mean() for v in x])}


REWARDS["aesthetic"] = AestheticReward


# ----------------------------------------------------------------------------------------------------------
# Image rewards applied per frame and averaged over the video's frames (the paper's Table 4a baselines):
# PickScore, HPSv2 and ImageReward, each on transformers classes (CLIPModel, BLIP's vision and text towers)
# with its own preprocessing, prompt handling and score formula; see the README for the parity checks.


def pil_resize(x: torch.Tensor, size: tuple[int, int], mode: str, uint8: bool) -> torch.Tensor:
    """PIL's resize of (N, 3, H, W) pixels on 0..255: antialiased, a horizontal pass then a vertical one, each
    rounded half up and clamped to uint8 when the frames were uint8 (float frames keep their graph)."""
    for step in ((x.shape[2], size[1]), size):
        if step != tuple(x.shape[2:]):
            x = F.interpolate(x, size=step, mode=mode, align_corners=False, antialias=True)
            if uint8:
                x = (x + 0.5).floor().clamp(0, 255)
    return x


def clip_pixels(frames: torch.Tensor, size: int = 224, crop_round: bool = False) -> torch.Tensor:
    """(N, H, W, 3) frames on 0..255 -> CLIP's input (N, 3, size, size): PIL bicubic resize of the short side to
    `size` (the long side int(size * long / short)), centre crop, /255, OpenAI CLIP mean/std. The crop's offset
    is (H - size) // 2 (transformers' CLIPImageProcessor), or round((H - size) / 2) (torchvision's CenterCrop)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[2:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = pil_resize(x, new, "bicubic", frames.dtype == torch.uint8)
    offset = (lambda d: int(round(d / 2))) if crop_round else (lambda d: d // 2)
    top, left = offset(new[0] - size), offset(new[1] - size)
    x = x[:, :, top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x / 255 - mean) / std


class FrameReward:
    """A per-image reward on every frame, averaged: `frame_scores(frames (N, H, W, 3), prompt) -> (N,)` is the
    image reward itself; frames go through it `batch` at a time."""

    dims: list[str]
    default_dim: str
    batch = 16

    def score_float(self, x: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """Differentiable (ReFL): float videos (B, T, H, W, 3) on 0..255."""
        out = []
        for video, prompt in zip(x, prompts):
            video = video.to(self.device)
            out.append(torch.cat([self.frame_scores(video[i:i + self.batch], prompt)
                                  for i in range(0, len(video), self.batch)]).mean())
        return {self.dims[0]: torch.stack(out).float()}

    @torch.no_grad()
    def score(self, videos: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        return {k: v.cpu() for k, v in self.score_float(videos, prompts).items()}


def load_state(path: str, what: str, key: str | None = None) -> dict:
    """A plain state dict from safetensors, or from torch.load(weights_only=True) (under `key` if given): never
    a pickled model."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state[key] if key else state
    except Exception as e:  # noqa: BLE001 - unpickling, safetensors and key errors alike: one line
        raise UserError(f"{what}: cannot read {path} as a plain state dict ({type(e).__name__}: {e})") from None


def weights_file(path: str, what: str, hub_id: str, names: list[str]) -> str:
    """`path` itself if it is a file, else the first of `names` in the folder (or Hub repo) it names."""
    if os.path.isfile(path):
        return path
    folder = resolve(path, what, hub_id, names + ["*.json", "*.txt"])
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"{what}: {folder} has none of {', '.join(names)}")


def clip_tokenizer(path: str, what: str):
    from transformers import CLIPTokenizer

    folder = resolve(path, f"{what} tokenizer", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                     ["vocab.json", "merges.txt", "*.json"])
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - missing or broken vocabulary files: one line
        raise UserError(f"{what}: no CLIP tokenizer in {folder} ({type(e).__name__})") from None


class PickScore(FrameReward):
    """`--reward pickscore` (Kirstain et al. 2023): a fine-tuned CLIP ViT-H/14; per frame
    logit_scale.exp() * cos(image, text), the official example's score before its softmax over candidates (a
    softmax over one video's frames would only rank frames). Preprocessing as its CLIPProcessor (laion's
    CLIP-ViT-H-14): short side 224 bicubic, centre crop, OpenAI mean/std; the tokenizer from that processor."""

    dims = ["pickscore"]
    default_dim = "pickscore"

    def __init__(self, device="cpu", path: str | None = None,
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **_):
        from transformers import CLIPModel

        folder = resolve(path or "yuvalkirstain/PickScore_v1", "PickScore", "yuvalkirstain/PickScore_v1",
                         ["*.json", "*.safetensors"])
        try:
            # safetensors, or pytorch_model.bin through transformers' torch.load(weights_only=True)
            self.net = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
        except OSError as e:  # no weights file or no config
            raise UserError(f"PickScore: {e}") from None
        self.tokenizer, self.device = clip_tokenizer(processor, "PickScore"), device

    def frame_scores(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        text = self.tokenizer([prompt], truncation=True, max_length=77, return_tensors="pt").to(self.device)
        t = F.normalize(self.net.get_text_features(**text).pooler_output.float(), dim=-1)
        i = F.normalize(self.net.get_image_features(pixel_values=clip_pixels(frames)).pooler_output.float(), dim=-1)
        return self.net.logit_scale.exp().float() * (i @ t.T)[:, 0]


REWARDS["pickscore"] = PickScore

# HPSv2's checkpoints are state dicts of OpenCLIP's ViT-H-14 (model_configs/ViT-H-14.json); they convert onto
# transformers' CLIPModel without loss (exact GELU, LayerNorm eps 1e-5, causal text mask, text pooled at EOT).
OPENCLIP_VIT_H_14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280,
                                                       "head_width": 80, "patch_size": 14},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}


def openclip_to_transformers(state: dict, arch: dict, bos: int, eos: int):
    """(CLIPConfig, state dict) for transformers' CLIPModel from an OpenCLIP CLIP state dict: packed attention
    in_proj split into q/k/v, the projections transposed, ln_1/ln_2/c_fc/c_proj renamed. The text is pooled at
    the tokenizer's end-of-text token `eos` (OpenCLIP: at the largest id, which that token is)."""
    from transformers import CLIPConfig

    v, t = arch["vision_cfg"], arch["text_cfg"]
    config = CLIPConfig(
        projection_dim=arch["embed_dim"],
        vision_config=dict(hidden_size=v["width"], num_hidden_layers=v["layers"], patch_size=v["patch_size"],
                           num_attention_heads=v["width"] // v.get("head_width", 64), image_size=v["image_size"],
                           intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)), hidden_act="gelu",
                           layer_norm_eps=1e-5),
        text_config=dict(hidden_size=t["width"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)), vocab_size=t["vocab_size"],
                         max_position_embeddings=t["context_length"], hidden_act="gelu", layer_norm_eps=1e-5,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=0))
    out = {"logit_scale": state["logit_scale"], "visual_projection.weight": state["visual.proj"].T,
           "text_projection.weight": state["text_projection"].T}
    names = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight"}
    out.update({new: state[old] for old, new in names.items()})
    for old, new in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        out.update({f"{new}.{p}": state[f"{old}.{p}"] for p in ("weight", "bias")})
    blocks = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for tower, src, layers in (("vision_model", "visual.transformer", v["layers"]),
                               ("text_model", "transformer", t["layers"])):
        for i in range(layers):
            a, b = f"{src}.resblocks.{i}", f"{tower}.encoder.layers.{i}"
            for old, new in blocks.items():
                out.update({f"{b}.{new}.{p}": state[f"{a}.{old}.{p}"] for p in ("weight", "bias")})
            for p in ("weight", "bias"):
                q, k, v_ = state[f"{a}.attn.in_proj_{p}"].chunk(3)
                out.update({f"{b}.self_attn.q_proj.{p}": q, f"{b}.self_attn.k_proj.{p}": k,
                            f"{b}.self_attn.v_proj.{p}": v_})
    return config, out


def hps_pixels(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's preprocess_val (OpenCLIP's image_transform with resize_longest_max): ToTensor first (/255), a
    bicubic tensor resize of the LONG side to `size` (torchvision >= 0.17's default antialias; the long side
    round(side * scale)), zero padding to a square around it (before normalising, so black), OpenAI mean/std.
    No crop. As OpenCLIP, a frame whose long side already is `size` is neither resized nor padded."""
    x = frames.permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[2:]
    scale = size / max(h, w)
    if scale != 1.0:
        new = (round(h * scale), round(w * scale))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        ph, pw = size - new[0], size - new[1]
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


class HPSv2(FrameReward):
    """`--reward hpsv2` (Wu et al. 2023, Human Preference Score v2.1): per frame the cosine of the normalised
    image and text features of its fine-tuned OpenCLIP ViT-H/14 (img_score.py: no logit scale). `path`: the
    HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) file or a folder holding it (default: the Hub repo
    xswu/HPSv2), read as a state dict ({'state_dict': ...}, weights_only) and converted onto transformers'
    CLIPModel; the tokenizer is CLIP's BPE (OpenCLIP's SimpleTokenizer gives the same ids)."""

    dims = ["hps"]
    default_dim = "hps"

    def __init__(self, device="cpu", path: str | None = None,
                 tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", arch: dict = OPENCLIP_VIT_H_14, **_):
        from transformers import CLIPModel

        what = "HPSv2"
        file = weights_file(path or "xswu/HPSv2", what, "xswu/HPSv2",
                            ["HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"])
        state = load_state(file, what, key="state_dict")
        self.tokenizer, self.device = clip_tokenizer(tokenizer, what), device
        try:
            config, weights = openclip_to_transformers(state, arch, self.tokenizer.bos_token_id,
                                                       self.tokenizer.eos_token_id)
        except KeyError as e:
            raise UserError(f"{what}: {file} is not an OpenCLIP CLIP state dict (no {e})") from None
        self.net = CLIPModel(config).eval()
        missing, unexpected = self.net.load_state_dict(weights, strict=False)
        if [k for k in missing if "position_ids" not in k] or unexpected:
            raise UserError(f"{what}: {file} does not fit ViT-H-14 (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.requires_grad_(False).to(device)
        self.size = arch["vision_cfg"]["image_size"]

    def frame_scores(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        text = self.tokenizer([prompt], truncation=True, max_length=77, return_tensors="pt").to(self.device)
        t = F.normalize(self.net.get_text_features(input_ids=text.input_ids).pooler_output.float(), dim=-1)
        i = self.net.get_image_features(pixel_values=hps_pixels(frames, self.size)).pooler_output.float()
        return (F.normalize(i, dim=-1) @ t.T)[:, 0]


REWARDS["hpsv2"] = HPSv2


class ImageReward(FrameReward):
    """`--reward imagereward` (Xu et al. 2023): BLIP's ViT-L/16 image tower, a BERT whose every layer
    cross-attends to it, the [CLS] state of the prompt through a 5-layer head without activations, then
    (r - 0.16717362830052426) / 1.0333394966054072. `path`: the THUDM/ImageReward folder (ImageReward.pt, a
    state dict read weights_only, and med_config.json) or Hub id; its weights map by name onto transformers'
    BlipVisionModel and BlipTextModel. The tokenizer is bert-base-uncased (a vocab.txt beside ImageReward.pt, or
    `tokenizer`) with [DEC] and [ENC] added; prompts padded to 35 tokens as ImageReward.score does."""

    dims = ["imagereward"]
    default_dim = "imagereward"
    MEAN, STD = 0.16717362830052426, 1.0333394966054072
    VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=16)  # create_vit('large', 224)

    def __init__(self, device="cpu", path: str | None = None, tokenizer: str = "bert-base-uncased",
                 vision: dict | None = None, **_):
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        what = "ImageReward"
        file = weights_file(path or "THUDM/ImageReward", what, "THUDM/ImageReward", ["ImageReward.pt"])
        folder = os.path.dirname(file)
        med = folder_json(folder, "med_config.json", what)
        state = load_state(file, what)
        vision = vision or self.VISION
        self.vision = BlipVisionModel(BlipVisionConfig(**vision, hidden_act="gelu", layer_norm_eps=1e-6))
        text = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                              encoder_hidden_size=vision["hidden_size"],  # blip_pretrain.py: encoder_width = ViT's
                              intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                              num_attention_heads=med["num_attention_heads"], hidden_act=med["hidden_act"],
                              max_position_embeddings=med["max_position_embeddings"],
                              layer_norm_eps=med["layer_norm_eps"], pad_token_id=med.get("pad_token_id", 0))
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Linear(med["hidden_size"], 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                  nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                  nn.Linear(16, 1))  # ImageReward.py MLP: its ReLUs are commented out
        self.load(state, file)
        for m in (self.vision, self.text, self.head):
            m.eval().requires_grad_(False).to(device)
        vocab = os.path.join(folder, "vocab.txt")
        tok_dir = folder if os.path.isfile(vocab) else resolve(tokenizer, f"{what} tokenizer", "bert-base-uncased",
                                                               ["vocab.txt", "*.json"])
        try:
            self.tokenizer = BertTokenizer.from_pretrained(tok_dir)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{what}: no bert-base-uncased vocab.txt in {tok_dir} ({type(e).__name__})") from None
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # blip.py init_tokenizer: ids 30522, 30523
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.device = device

    def load(self, state: dict, file: str):
        """ImageReward.py loads with strict=False, so a missing key would silently stay random: here every
        weight of the three parts must be present."""
        vis = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj": "embeddings.patch_embedding", "blocks.": "encoder.layers.", "norm1": "layer_norm1",
               "norm2": "layer_norm2", "attn.proj": "self_attn.projection", "attn.qkv": "self_attn.qkv"}
        parts = {"vision": {}, "text": {}, "head": {}}
        for k, v in state.items():
            if k.startswith("blip.visual_encoder."):
                k = k[len("blip.visual_encoder."):]
                k = "post_layernorm" + k[4:] if k.startswith("norm.") else k
                for old, new in vis.items():
                    k = k.replace(old, new)
                parts["vision"][k] = v
            elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
                parts["text"][k[len("blip.text_encoder."):]] = v
            elif k.startswith("mlp.layers."):
                parts["head"][k[len("mlp.layers."):]] = v
        for name, module in (("vision", self.vision), ("text", self.text), ("head", self.head)):
            missing, unexpected = module.load_state_dict(parts[name], strict=False)
            missing = [k for k in missing if "position_ids" not in k]
            if missing or unexpected:
                raise UserError(f"ImageReward: {file} does not fit its {name} part (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")

    def frame_scores(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        text = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image = self.vision(pixel_values=clip_pixels(frames, crop_round=True)).last_hidden_state
        n = len(image)
        hidden = self.text(input_ids=text.input_ids.to(self.device).expand(n, -1),
                           attention_mask=text.attention_mask.to(self.device).expand(n, -1),
                           encoder_hidden_states=image,
                           encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=self.device)
                           ).last_hidden_state[:, 0].float()  # [CLS]: score() keeps it, unlike BLIP's ITM ([ENC])
        return ((self.head(hidden) - self.MEAN) / self.STD)[:, 0]


REWARDS["imagereward"] = ImageReward


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
    """A JSON list of groups {"prompt": str, "videos": [paths relative to the manifest], "best": path or index}, or
    the results of an evaluate.py study (each decided pair a group of two)."""
    try:
        groups = json.loads(read_text(path, "manifest"))  # missing, binary or not UTF-8: one line from read_text
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read manifest {path}: {e}") from None
    if isinstance(groups, dict) and "judgements" in groups:  # an evaluate.py study's results (page.py)
        import page

        groups = page.study_manifest(page.read_study([path]))
        if not groups:
            raise UserError(f"{path}: every judgement of this study is a tie; no human choice to agree with")
    if not isinstance(groups, list) or not groups:
        raise UserError(f"manifest {path} must be a non-empty JSON list of groups, or a study's results")
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


def read_fps(path: str) -> float:
    """The frame rate in a video file's header (8 if it names none)."""
    import av

    try:
        with av.open(path) as f:
            return float(f.streams.video[0].average_rate or 8)
    except Exception as e:  # missing, not a video, corrupt: one line
        raise UserError(f"cannot read video {path}: {type(e).__name__}: {e}") from None


def score_files(reward, paths: list[str], prompt: str) -> dict[str, torch.Tensor]:
    """Scores of video files for one prompt: one batch when the videos share a shape and frame rate, else one by
    one."""
    videos, rates = [read_video(p) for p in paths], [read_fps(p) for p in paths]
    if all(v.shape == videos[0].shape for v in videos) and len(set(rates)) == 1:
        return reward.score(torch.stack(videos), [prompt] * len(videos), rates[0])
    each = [reward.score(v[None], [prompt], fps) for v, fps in zip(videos, rates)]
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
