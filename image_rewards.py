"""Image rewards scored on every frame of a video and averaged over its frames: the LAION aesthetic predictor
(VBench's aesthetic quality, with VBench's frame preprocessing, which evaluate.py's DINO / CLIP metrics share) and
the paper's Table 4a baselines PickScore, HPSv2 and ImageReward. reward.REWARDS builds them by name (`--reward
aesthetic`, `pickscore`, `hpsv2`, `imagereward`); transformers is imported when one is built.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from inputs import UserError, resolve
from reward import check_videos, folder_json

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
