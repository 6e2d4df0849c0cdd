"""VideoScore (He et al. 2024, TIGER-AI-Lab/VideoScore): the paper's reward. Mantis-8B-Idefics2 fine-tuned to
regress five human ratings on a 1..4 scale. Its class, Mantis' Idefics2ForSequenceClassification, is not in
transformers: it is transformers' Idefics2Model (weights `model.*`) plus a linear head (`score.*`) read at the
last token. Everything below reproduces examples/run_videoscore.py (Mantis model + transformers 4.4x
AutoProcessor) with transformers alone; see the README for the parity check.

`--reward videoscore` and `--reward videoscore-v1.1` build `VideoScore` through reward.REWARDS.
"""
import os

import numpy as np
import torch
import torch.nn as nn
from tokenizers import AddedToken, Tokenizer
from transformers import Idefics2Config, Idefics2Model
from transformers.models.idefics2.modeling_idefics2 import Idefics2PreTrainedModel

from image_rewards import pil_resize
from inputs import UserError, resolve
from reward import check_videos, folder_json

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
