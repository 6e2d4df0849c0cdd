"""VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", KwaiVGI/VideoAlign): Qwen2-VL-2B
with a bias-free linear head read at three special tokens of its prompt, <|VQ_reward|>, <|MQ_reward|>,
<|TA_reward|>: visual quality, motion quality, text alignment, trained Bradley-Terry on human pairs. The
release is a folder: model_config.json (sampling, prompt, normalisation), checkpoint-N/model.pth (every weight,
PEFT names, the LoRA unmerged), checkpoint-N/tokenizer/; the base model's config comes from
model_config's model_name_or_path (Qwen/Qwen2-VL-2B-Instruct). Everything below reproduces its inference.py
(commit 219ab9d) with transformers' Qwen2-VL classes; see the README for the parity check.

`--reward videoreward` builds `VideoReward` through reward.REWARDS.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_rewards import CLIP_MEAN, CLIP_STD
from inputs import UserError, resolve
from reward import check_videos, folder_json

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
