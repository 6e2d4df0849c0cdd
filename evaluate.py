"""VBench-style metrics and reward scores over a folder of videos written by sample.py; before/after tables; plots.

    python evaluate.py samples/base                          # -> samples/base/evaluation.json
    python evaluate.py samples/vpo --reward videoscore        # plus any reward.py reward, per video
    python evaluate.py --compare samples/base/evaluation.json samples/vpo/evaluation.json --plot compare.svg
    python evaluate.py --run runs/vpo                         # reward curve of a training run (paper Fig. 5)
    python evaluate.py samples/vpo --vbench custom            # also hand the folder to the official vbench package

    python evaluate.py --compare A.json B.json --html page.html --study-html study.html   # page.py: look, judge

Faithful to Vchitect/VBench (its models, preprocessing, formulas and aggregation): subject consistency, background
consistency, temporal flickering, aesthetic quality, motion smoothness (AMT-S, amt.py), dynamic degree (torchvision's
RAFT), imaging quality (pyiqa's MUSIQ): all seven quality dimensions of the paper's Table 3. Two weight-free proxies
(of motion smoothness and dynamic degree) are named as proxies.

This file measures the videos and runs the command line. The tables, the charts (--plot, --run), the pages (--html,
--study-html) and the study's win rate (--study) are drawn by page.py, which imports no torch: it is handed what is
measured (VBENCH_QUALITY, PROXIES, quality_score).
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import re
import types

from inputs import (ANY, UserError, check_domains, check_fields, command, known_device, read_json, read_text, refuse_empty,
                    writable_file, write_atomically)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import amt  # noqa: E402
import fvd  # noqa: E402
import page  # noqa: E402
from image_rewards import CLIP_MEAN, CLIP_STD, AestheticReward, vbench_preprocess  # noqa: E402
from reward import REWARDS, PixelReward, build_reward, parse_dim, pick, reward_names  # noqa: E402
from videos import read_fps, read_video  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# VBench's quality dimensions in its order; (Min, Max, weight) from scripts/constant.py (NORMALIZE_DIC, DIM_WEIGHT)
VBENCH_QUALITY = {"subject_consistency": (0.1462, 1.0, 1.0), "background_consistency": (0.2615, 1.0, 1.0),
                  "temporal_flickering": (0.6293, 1.0, 1.0), "motion_smoothness": (0.706, 0.9975, 1.0),
                  "dynamic_degree": (0.0, 1.0, 0.5), "aesthetic_quality": (0.0, 1.0, 1.0),
                  "imaging_quality": (0.0, 1.0, 1.0)}
# Weight-free stand-ins, never reported under VBench's names; the VBench dimension whose prompts they use.
PROXIES = {"proxy_interp_smoothness": "motion_smoothness", "proxy_frame_motion": "dynamic_degree"}
FRAME_WEIGHTED = ("subject_consistency", "background_consistency")  # VBench: sum over all frames / frame count


# ----------------------------------------------------------------------------------------------------------
# Videos


def prompt_of(file_name: str) -> str:
    """vbench/utils.py get_prompt_from_filename: '{prompt}-{i}.mp4' -> prompt."""
    return re.sub(r"-\d+$", "", os.path.splitext(file_name)[0])


# ----------------------------------------------------------------------------------------------------------
# Feature models through transformers


def dino_pos_embed(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINO's own position-embedding interpolation (facebookresearch/dino vision_transformer.py): bicubic with
    scale_factor (n + 0.1) / sqrt(N). transformers' ViT asks for size=(n, m) instead, which samples other points."""
    N = self.position_embeddings.shape[1] - 1
    n_h, n_w = height // self.patch_size, width // self.patch_size
    if n_h * n_w == N and height == width:
        return self.position_embeddings
    side, dim = int(math.sqrt(N)), self.position_embeddings.shape[-1]
    grid = self.position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((n_h + 0.1) / side, (n_w + 0.1) / side), mode="bicubic")
    return torch.cat([self.position_embeddings[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def load_dino(path: str, device: str):
    """DINO ViT-B/16 as torch.hub's dino_vitb16: [CLS] after the final LayerNorm, whose eps is 1e-6 in DINO."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(path, add_pooling_layer=False, layer_norm_eps=1e-6).eval().to(device)
    model.embeddings.interpolate_pos_encoding = types.MethodType(dino_pos_embed, model.embeddings)
    return model


def load_clip(path: str, device: str):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(path).eval().to(device)


@torch.no_grad()
def features(frames: torch.Tensor, fn, batch: int = 16) -> torch.Tensor:
    return torch.cat([fn(frames[i:i + batch]).float().cpu() for i in range(0, len(frames), batch)])


# ----------------------------------------------------------------------------------------------------------
# Metrics: one function each, uint8 (T, H, W, 3) frames in, one number per video out


def consistency(feats: torch.Tensor) -> float:
    """VBench's frame-feature consistency (vbench/subject_consistency.py, background_consistency.py): frame i >= 1
    scores the mean of its cosine similarities to the previous and to the first frame, each clipped at 0; the video
    scores the mean over its T - 1 frames."""
    f = F.normalize(feats.float(), dim=-1)
    to_prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    to_first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return ((to_prev + to_first) / 2).mean().item()


def subject_consistency(frames: torch.Tensor, dino) -> float:
    """vbench/subject_consistency.py: DINO ViT-B/16 [CLS] of every frame, bilinear short side 224 (no crop,
    antialias off), ImageNet normalisation; then consistency()."""
    def cls(x):
        x = vbench_preprocess(x.to(dino.device), 224, "bilinear", False, IMAGENET_MEAN, IMAGENET_STD)
        return dino(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    return consistency(features(frames, cls))


def background_consistency(frames: torch.Tensor, clip) -> float:
    """vbench/background_consistency.py: CLIP ViT-B/32 image embedding (projected) of every frame, bicubic short side
    224 + center crop 224, CLIP normalisation; then consistency()."""
    def embed(x):
        x = vbench_preprocess(x.to(clip.device), 224, "bicubic", True, CLIP_MEAN, CLIP_STD)
        return clip(pixel_values=x).image_embeds
    return consistency(features(frames, embed))


def temporal_flickering(frames: torch.Tensor) -> float:
    """vbench/temporal_flickering.py: (255 - mean_i mean|F_{i+1} - F_i|) / 255 on the raw frames; the formula of
    PixelReward's temporal_consistency. VBench applies it to videos its RAFT static filter kept; not done here."""
    return PixelReward().score(frames[None], [""])["temporal_consistency"].item()


@torch.no_grad()
def aesthetic_quality(frames: torch.Tensor, aesthetic: AestheticReward) -> float:
    """vbench/aesthetic_quality.py: LAION aesthetic predictor / 10 on CLIP ViT-L/14, mean over frames
    (image_rewards.py)."""
    return aesthetic.frame_scores(frames).mean().item()


def proxy_interp_smoothness(frames: torch.Tensor) -> float | None:
    """PROXY for motion smoothness (vbench/motion_smoothness.py), which predicts every odd frame from its two even
    neighbours with the AMT-S interpolation network and scores (255 - mean|odd - predicted|) / 255. Here the
    prediction is the linear blend of the neighbours: no network, so it measures how close to linear the change is."""
    even, odd = frames[0::2].float(), frames[1::2].float()
    if len(even) < 2:
        return None
    diff = (odd[:len(even) - 1] - (even[:-1] + even[1:]) / 2).abs().mean()
    return ((255 - diff) / 255).item()


def proxy_frame_motion(frames: torch.Tensor, fps: float) -> float | None:
    """PROXY for dynamic degree (vbench/dynamic_degree.py), which takes frames every round(fps / 8), runs RAFT on
    each pair, averages the top 5% flow magnitudes and calls a video dynamic if enough pairs pass a threshold. Here:
    the same frames and top 5%, of the absolute pixel change / 255 instead of the flow, averaged over pairs; 0 for a
    still video. A magnitude, not VBench's fraction of dynamic videos."""
    x = frames[::max(1, round(fps / 8))].float().mean(-1).flatten(1)
    if len(x) < 2:
        return None
    d = (x[1:] - x[:-1]).abs()
    return (d.topk(max(1, int(d.shape[1] * 0.05)), dim=1).values.mean() / 255).item()


# ----------------------------------------------------------------------------------------------------------
# Dynamic degree as VBench computes it (vbench/dynamic_degree.py), on torchvision's RAFT-large: frames every
# round(fps / 8), each consecutive pair padded to a multiple of 8 and run through RAFT for 20 updates, the mean of
# the largest 5% flow magnitudes per pair; a video is dynamic when enough pairs pass a threshold that scales with
# its size. torchvision's Raft_Large_Weights.C_T_V1 are its port of the original Chairs+Things weights; VBench's
# own raft-things.pth is read too, its keys renamed onto torchvision's modules (README: parity).

RAFT_RENAMES = [  # princeton-vl/RAFT (VBench's copy) -> torchvision.models.optical_flow.raft_large
    (r"^fnet\.", "feature_encoder."), (r"^cnet\.", "context_encoder."),
    (r"_encoder\.conv1\.", "_encoder.convnormrelu.0."), (r"_encoder\.norm1\.", "_encoder.convnormrelu.1."),
    (r"_encoder\.conv2\.", "_encoder.conv."),
    (r"(layer\d\.\d)\.conv(\d)\.", r"\1.convnormrelu\2.0."), (r"(layer\d\.\d)\.norm(\d)\.", r"\1.convnormrelu\2.1."),
    (r"encoder\.convc(\d)\.", r"motion_encoder.convcorr\1.0."), (r"encoder\.convf(\d)\.", r"motion_encoder.convflow\1.0."),
    (r"update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0."),
    (r"gru\.conv([zrq])(\d)\.", r"recurrent_block.convgru\2.conv\1."),
    (r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0."), (r"^update_block\.mask\.2\.", "mask_predictor.conv."),
]


def raft_things_to_torchvision(state: dict) -> dict:
    """raft-things.pth (DataParallel's 'module.' names) -> raft_large's. Its layerX.0.norm3 is the same module as
    downsample.1, saved twice: dropped."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if re.search(r"layer\d\.\d\.norm3\.", k):
            continue
        for pattern, new in RAFT_RENAMES:
            k = re.sub(pattern, new, k)
        out[k] = v
    return out


def load_raft(path: str | None, device: str):
    """raft_large with VBench's raft-things.pth (`path`, default $VBENCH_CACHE_DIR/raft_model/models/) if the file
    exists, else torchvision's C_T_V1 weights (downloaded by torchvision on first use)."""
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except Exception as e:  # noqa: BLE001 - missing, or a build that does not match this torch
        raise UserError(f"dynamic_degree needs torchvision's RAFT ({type(e).__name__}): pip install torchvision") \
            from None
    cache = os.environ.get("VBENCH_CACHE_DIR", os.path.expanduser("~/.cache/vbench"))
    path = path or os.path.join(cache, "raft_model", "models", "raft-things.pth")
    if os.path.isfile(path):
        net = raft_large()
        try:
            net.load_state_dict(raft_things_to_torchvision(torch.load(path, map_location="cpu", weights_only=True)))
        except Exception as e:  # noqa: BLE001 - unpickling, key and shape errors alike
            raise UserError(f"{path} is not RAFT's raft-things.pth ({type(e).__name__})") from None
    else:
        net = raft_large(weights=Raft_Large_Weights.C_T_V1)
    return net.eval().requires_grad_(False).to(device)


def dynamic_threshold(height: int, width: int, pairs_frames: int) -> tuple[float, int]:
    """set_params: a pair moves when its score exceeds 6 * min(H, W) / 256; a video is dynamic when at least
    round(4 * T / 16) pairs move (T frames after subsampling; Python's round, half to even)."""
    return 6.0 * (min(height, width) / 256.0), round(4 * (pairs_frames / 16.0))


def raft_frames(frames: torch.Tensor, fps: float) -> tuple[torch.Tensor, float, int]:
    """VBench's frames for RAFT: every round(fps / 8)-th, replicate-padded to multiples of 8 (split in halves),
    normalised as RAFT does inside (2 x / 255 - 1); with the threshold and the count of moving pairs needed."""
    x = frames[::max(1, round(fps / 8))].permute(0, 3, 1, 2).float()
    H, W = x.shape[2:]
    thres, count_num = dynamic_threshold(H, W, len(x))
    ph, pw = -H % 8, -W % 8
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="replicate")
    return 2 * (x / 255.0) - 1.0, thres, count_num


@torch.no_grad()
def pair_score(raft, a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean of the largest 5% flow magnitudes of RAFT's flow (20 updates) from frame a to b, on the padded frame
    (VBench never removes the padding)."""
    flow = raft(a[None], b[None], num_flow_updates=20)[-1][0]
    rad = flow.float().norm(dim=0).flatten()
    return rad.topk(int(rad.numel() * 0.05)).values.mean().item()


def dynamic_degree(frames: torch.Tensor, fps: float, raft) -> float | None:
    """1.0 if VBench calls the video dynamic, else 0.0 (the dimension is the share of dynamic videos). None for a
    video whose padded sides are under 128: RAFT's coarsest correlation level is then one pixel, where VBench's RAFT
    returns NaN flow and silently calls the video static; here it is left out of the share instead."""
    x, thres, count_num = raft_frames(frames, fps)
    if min(x.shape[2:]) < 128:
        return None
    x = x.to(next(raft.parameters()).device)
    moving = 0
    for i in range(len(x) - 1):
        moving += pair_score(raft, x[i], x[i + 1]) > thres
        if moving >= count_num:  # check_move: decided as soon as enough pairs moved
            return 1.0
    return 0.0

# ----------------------------------------------------------------------------------------------------------
# Imaging quality as VBench computes it (vbench/imaging_quality.py): pyiqa's MUSIQ with the SPAQ weights on every
# frame, the frame resized (bilinear, no antialias) so that its longer side is at most 512, /255; the per-video
# mean of MUSIQ's 0..100 score, and the dimension /100.

MUSIQ_URL = "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"


def load_musiq(path: str | None, device: str):
    """pyiqa's MUSIQ (pip install pyiqa) with VBench's SPAQ checkpoint (`path`, default VBench's cache)."""
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except Exception as e:  # noqa: BLE001 - missing, or its torchvision import failing
        raise UserError(f"imaging_quality needs pyiqa's MUSIQ ({type(e).__name__}): pip install pyiqa") from None
    cache = os.environ.get("VBENCH_CACHE_DIR", os.path.expanduser("~/.cache/vbench"))
    path = path or os.path.join(cache, "pyiqa_model", "musiq_spaq_ckpt-358bb6af.pth")
    if not os.path.isfile(path):
        raise UserError(f"MUSIQ weights {path} not found; download them: wget -P {os.path.dirname(path)} {MUSIQ_URL}")
    try:
        net = MUSIQ(pretrained_model_path=path)  # a one-output head: the score as is (VBench)
    except Exception as e:  # noqa: BLE001 - unpickling, key and shape errors alike
        raise UserError(f"{path} is not MUSIQ's SPAQ checkpoint ({type(e).__name__})") from None
    return net.eval().requires_grad_(False).to(device)  # VBench sets .training = False; every dropout is 0


@torch.no_grad()
def imaging_quality(frames: torch.Tensor, musiq) -> float:
    """The mean MUSIQ score of every frame / 100 (VBench divides the dimension, not the video, by 100: the same)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[2:]
    if max(h, w) > 512:  # 'longer' mode: int() of the scaled sides
        s = 512.0 / max(h, w)
        x = F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False, antialias=False)
    x = (x / 255.0).to(next(musiq.parameters()).device)
    return sum(musiq(x[i:i + 1]).item() for i in range(len(x))) / len(x) / 100


def quality_score(summary: dict) -> tuple[float | None, int]:
    """scripts/cal_final_score.py: (x - Min) / (Max - Min) * weight summed over the quality dimensions, divided by
    the summed weights (6.5 for all seven); here over the dimensions present. Returns (score, dimensions used)."""
    dims = [d for d in VBENCH_QUALITY if summary.get(d) is not None]
    if not dims:
        return None, 0
    norm = lambda d: (summary[d] - VBENCH_QUALITY[d][0]) / (VBENCH_QUALITY[d][1] - VBENCH_QUALITY[d][0])
    return sum(norm(d) * VBENCH_QUALITY[d][2] for d in dims) / sum(VBENCH_QUALITY[d][2] for d in dims), len(dims)


# ----------------------------------------------------------------------------------------------------------
# A folder of videos -> one results dict


def build_metrics(args) -> dict:
    """metric name -> fn(frames, fps); a model that cannot be loaded skips its metric with one line."""
    wanted = args.metrics.split(",") if args.metrics else [*VBENCH_QUALITY, *PROXIES]  # names checked by DOMAINS
    metrics = {}
    for m in wanted:
        if m == "subject_consistency":
            dino = try_load(m, lambda: load_dino(args.dino, args.device), "--dino")
            if dino:
                metrics[m] = lambda f, fps: subject_consistency(f, dino)
        elif m == "background_consistency":
            clip = try_load(m, lambda: load_clip(args.clip, args.device), "--clip")
            if clip:
                metrics[m] = lambda f, fps: background_consistency(f, clip)
        elif m == "aesthetic_quality":
            aes = try_load(m, lambda: AestheticReward(args.device, clip=args.aesthetic_clip, head=args.aesthetic_head),
                           "--aesthetic-clip / --aesthetic-head")
            if aes:
                metrics[m] = lambda f, fps: aesthetic_quality(f, aes)
        elif m == "dynamic_degree":
            raft = try_load(m, lambda: load_raft(args.raft, args.device), "--raft")
            if raft:
                metrics[m] = lambda f, fps: dynamic_degree(f, fps, raft)
        elif m == "imaging_quality":
            musiq = try_load(m, lambda: load_musiq(args.musiq, args.device), "--musiq")
            if musiq:
                metrics[m] = lambda f, fps: imaging_quality(f, musiq)
        elif m == "motion_smoothness":
            net = try_load(m, lambda: amt.load_amt(args.amt, args.device), "--amt")
            if net:
                metrics[m] = lambda f, fps: amt.motion_smoothness(f, net)
        elif m == "temporal_flickering":
            metrics[m] = lambda f, fps: temporal_flickering(f)
        elif m == "proxy_interp_smoothness":
            metrics[m] = lambda f, fps: proxy_interp_smoothness(f)
        else:
            metrics[m] = proxy_frame_motion
    return metrics


def try_load(what: str, loader, flags: str = ""):
    """A model id or path that does not load (not downloaded, offline, wrong file) skips `what` with one line."""
    try:
        return loader()
    except (OSError, ValueError, RuntimeError, UserError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"skipping {what}: {type(e).__name__}: {reason}" + (f" (a local copy can be given with {flags})"
                                                                   if flags else ""))


def load_full_info(path: str) -> dict[str, set]:
    """VBench_full_info.json -> dimension -> its prompts (VBench's standard mode scores each dimension on its own
    prompt list; without this file every video counts for every dimension, as VBench's custom_input mode)."""
    if not os.path.isfile(path):
        raise UserError(f"--full-info {path!r} not found (it is vbench/VBench_full_info.json in the VBench repo)")
    try:
        items = json.loads(read_text(path, "--full-info"))
    except ValueError as e:
        raise UserError(f"--full-info {path!r} is not JSON ({e})") from None
    if not isinstance(items, list):
        raise UserError(f"--full-info {path!r} must be a JSON list, as VBench_full_info.json")
    dims = {}
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("prompt_en"), str)
                and isinstance(item.get("dimension"), list)):
            raise UserError(f"--full-info {path!r}: entry {i} is not {{\"prompt_en\": ..., \"dimension\": [...]}} "
                            "as in VBench_full_info.json")
        for d in item["dimension"]:
            dims.setdefault(d, set()).add(item["prompt_en"])
    return dims


def summarise(videos: dict) -> dict:
    """Per-dimension aggregate as VBench: frame-weighted for the two consistency metrics, else mean over videos."""
    keys = dict.fromkeys(k for row in videos.values() for k in row if k not in ("prompt", "frames", "fps"))
    summary = {}
    for k in keys:
        rows = [r for r in videos.values() if r.get(k) is not None]
        w = [r["frames"] - 1 if k in FRAME_WEIGHTED else 1 for r in rows]
        summary[k] = sum(r[k] * wi for r, wi in zip(rows, w)) / sum(w)
    return summary


def add_reward_mix(videos: dict, spec: str, dims: list[str]):
    """Each video's --reward-dim score (reward.pick: one dimension, global, or a weighted mix), in rows['reward_mix'].
    A mix divides each dimension by its spread among the videos of one prompt, pooled over this folder's prompts,
    so its values compare videos within this folder, not across folders (compare the dimensions for that)."""
    rows = list(videos.values())
    ids = {p: i for i, p in enumerate(dict.fromkeys(r["prompt"] for r in rows))}
    scores = {d: torch.tensor([r[d.replace(":", ".", 1)] for r in rows], dtype=torch.float64) for d in dims}
    mixed = pick(scores, spec, group=torch.tensor([ids[r["prompt"]] for r in rows]))
    for r, v in zip(rows, mixed.tolist()):
        r["reward_mix"] = v


def evaluate(video_dir: str, args) -> dict:
    if not os.path.isdir(video_dir):
        raise UserError(f"{video_dir!r} is not a folder")
    paths = sorted(glob.glob(os.path.join(video_dir, "*.mp4")))
    if not paths:
        raise UserError(f"no .mp4 files in {video_dir!r}")
    if args.vbench and importlib.util.find_spec("vbench") is None:
        raise UserError("--vbench needs the official package: pip install vbench (see github.com/Vchitect/VBench)")
    if args.fvd:  # before minutes of scoring
        fvd.check(video_dir, args.fvd)
    only = load_full_info(args.full_info) if args.full_info else None
    metrics = build_metrics(args)
    # NAME, NAME=PATH (train.py's --reward-path) or NAME,NAME (train.py's mixture)
    specs = dict(one.partition("=")[::2] for spec in args.reward for one in (spec.split(",") if "=" not in spec
                                                                              else [spec]))
    for name in specs:
        reward_names(name)
    rewards = {name: try_load(f"reward {name}", lambda: build_reward(name, device=args.device, path=path or None))
               for name, path in specs.items()}
    rewards = {name: r for name, r in rewards.items() if r is not None}
    dims = [f"{name}:{d}" for name, r in rewards.items() for d in r.dims]
    if args.reward_dim:
        if not dims:
            raise UserError("--reward-dim needs --reward")
        parse_dim(args.reward_dim, dims)  # before scoring
    videos, skipped = {}, {}
    for path in tqdm(paths, desc="evaluate", dynamic_ncols=True):
        name = os.path.basename(path)
        try:
            frames = read_video(path)
            if len(frames) < 2:
                raise UserError("a single frame: the temporal metrics need two")
        except UserError as e:
            tqdm.write(f"skipping {name}: {e}")
            skipped[name] = str(e)
            continue
        row = {"prompt": prompt_of(name), "frames": len(frames), "fps": read_fps(path)}  # PyAV frames; decord/OpenCV give the same
        for m, fn in metrics.items():
            if only is None or row["prompt"] in only.get(PROXIES.get(m, m), ()):
                row[m] = fn(frames, row["fps"])
        for r_name, r in rewards.items():
            row.update({f"{r_name}.{d}": s.item() for d, s in r.score(frames[None], [row["prompt"]], row["fps"]).items()})
        videos[name] = row
    if not videos:
        raise UserError(f"none of the {len(paths)} videos in {video_dir!r} could be read")
    if args.reward_dim:
        add_reward_mix(videos, args.reward_dim, dims)
    summary = summarise(videos)
    result = {"name": args.name or os.path.basename(os.path.normpath(video_dir)), "video_dir": video_dir,
              "summary": summary, "sources": dict.fromkeys(summary, "evaluate.py"), "videos": videos,
              "skipped": skipped, "full_info": args.full_info, "reward_dim": args.reward_dim,
              "models": {"dino": args.dino, "clip": args.clip, "aesthetic_clip": args.aesthetic_clip,
                         "aesthetic_head": args.aesthetic_head}}
    if args.vbench:
        out_dir = os.path.join(video_dir, "vbench_results")
        try:
            official = run_official_vbench(video_dir, args.vbench, args.vbench_dims, out_dir, args.device)
            result["vbench"] = {"mode": args.vbench, "results": official, "output": out_dir}
            for d, v in official.items():  # fill in what evaluate.py does not compute faithfully
                if d not in summary:
                    summary[d], result["sources"][d] = v, "vbench"
        except Exception as e:  # its models, downloads and dependencies are its own: keep our results
            print(f"skipping --vbench: the vbench package failed ({type(e).__name__}: {e})")
    if args.fvd:
        summary["fvd"] = fvd.compute_fvd(video_dir, args.fvd, args.fvd_model, args.fvd_ckpt, args.device)
        result["sources"]["fvd"] = f"cd-fvd ({args.fvd_model}) against {args.fvd}"
    result["quality_score"], result["quality_dims"] = quality_score(summary)
    return result


def run_official_vbench(video_dir: str, mode: str, dims: str | None, out_dir: str, device: str) -> dict:
    """Hand the folder to the official vbench package (pip install vbench; its weights in $VBENCH_CACHE_DIR):
    'standard' scores VBench's own prompt suite ({prompt}-{0..4}.mp4) on all its dimensions, 'custom' any prompts on
    the seven quality dimensions. Returns {dimension: score}."""
    import vbench

    dims = dims.split(",") if dims else None if mode == "standard" else list(VBENCH_QUALITY)
    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    vbench.VBench(device, full_info, out_dir).evaluate(videos_path=video_dir, name="vbench", dimension_list=dims,
                                                       local=True, mode="vbench_standard" if mode == "standard"
                                                       else "custom_input")
    with open(os.path.join(out_dir, "vbench_eval_results.json")) as f:
        return {d: v[0] for d, v in json.load(f).items()}


# ----------------------------------------------------------------------------------------------------------


def load_results(path: str) -> dict:
    """An evaluate.py results file, every field the table and the pages read checked by kind: one line naming the
    file and the field otherwise."""
    r = check_fields(read_json(path, "results file"), {"name": str, "summary": dict}, f"results file {path}")
    r.setdefault("videos", {})  # the table needs name and summary; the pages the videos, where there are any
    check_fields(r, {"videos": dict}, f"results file {path}")
    if r["videos"]:
        check_fields(r, {"video_dir": str}, f"results file {path}")
    number = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not all(isinstance(k, str) and number(v) for k, v in r["summary"].items()):
        raise UserError(f"results file {path} is damaged: 'summary' holds a value that is not a number")
    for name, video in r["videos"].items():
        check_fields(video, {"prompt": str}, f"results file {path}, video {name!r}")
    if not isinstance(r.get("sources", {}), dict) or not isinstance(r.get("skipped", {}), dict):
        raise UserError(f"results file {path} is damaged: 'sources' or 'skipped' is not of its kind")
    return r


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video_dir", nargs="?", help="folder of {prompt}-{i}.mp4 videos (sample.py's output)")
    p.add_argument("--out", default=None, help="results JSON (default VIDEO_DIR/evaluation.json)")
    p.add_argument("--name", default=None, help="model name in tables (default: the folder's name)")
    p.add_argument("--metrics", default=None, help=f"comma list, default all: {', '.join([*VBENCH_QUALITY, *PROXIES])}")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[=PATH]", help="also score each video "
                   f"with a reward.py reward ({', '.join(REWARDS)}), its weights at PATH if given; repeatable, or "
                   "several names joined by commas")
    p.add_argument("--reward-dim", default=None, help="also each video's score under train.py's --reward-dim "
                   "(column reward_mix), dimensions named reward:dim, e.g. toy:temporal_consistency=1,"
                   "toy:dynamic_degree=1")
    p.add_argument("--dino", default="facebook/dino-vitb16", help="DINO ViT-B/16: Hub id or folder")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP ViT-B/32 (background consistency)")
    p.add_argument("--raft", default=None, help="dynamic degree: VBench's raft-things.pth (default: its cache, "
                   "~/.cache/vbench/raft_model/models/, else torchvision's C_T_V1 weights)")
    p.add_argument("--amt", default=None, help="motion smoothness: AMT-S's amt-s.pth (default: VBench's cache, "
                   "~/.cache/vbench/amt_model/)")
    p.add_argument("--musiq", default=None, help="imaging quality: MUSIQ's musiq_spaq_ckpt-358bb6af.pth (default: "
                   "VBench's cache, ~/.cache/vbench/pyiqa_model/)")
    p.add_argument("--fvd", default=None, metavar="REF_DIR", help="also the FVD of the folder's videos against "
                   "this folder of reference videos (cd-fvd: pip install cd-fvd)")
    p.add_argument("--fvd-model", choices=["videomae", "i3d"], default="videomae", help="FVD features: VideoMAE-v2 "
                   "(content-debiased, Ge et al.) or I3D (the classic FVD)")
    p.add_argument("--fvd-ckpt", default=None, help="a local copy of cd-fvd's weights file (else it downloads them)")
    p.add_argument("--aesthetic-clip", default="openai/clip-vit-large-patch14", help="CLIP ViT-L/14 (aesthetic)")
    p.add_argument("--aesthetic-head", default=None, help="sa_0_4_vit_l_14_linear.pth or .safetensors (default: "
                   "VBench's cache, ~/.cache/vbench/aesthetic_model/emb_reader/)")
    p.add_argument("--full-info", default=None, help="VBench_full_info.json: score each dimension only on its own "
                   "VBench prompts (VBench's standard mode)")
    p.add_argument("--vbench", choices=["standard", "custom"], default=None, help="also run the official vbench "
                   "package: 'standard' (its prompt suite, all dimensions) or 'custom' (any prompts, quality dims)")
    p.add_argument("--vbench-dims", default=None, help="comma list of dimensions for --vbench")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS", help="print a table of results JSONs")
    p.add_argument("--run", nargs="+", default=None, help="a train.py output folder: plot its reward curve (with "
                   "--html: the curves of one or more runs on the page)")
    p.add_argument("--html", default=None, metavar="OUT", help="also write one self-contained page: each prompt's "
                   "videos of every compared run side by side, the metric table, the --run reward curves (page.py)")
    p.add_argument("--study-html", default=None, metavar="OUT", help="with --compare A B: a blind study page, "
                   "randomly ordered pairs of A's and B's videos of one prompt, one click per judgement (Fig. 4)")
    p.add_argument("--seed", type=int, default=0, help="--study-html: the order and sides of the pairs")
    p.add_argument("--study", nargs="+", default=None, metavar="RESULTS", help="results files saved by a study "
                   "page (one per rater): the second run's win rate against the first, with a 95%% interval")
    p.add_argument("--plot", default=None, help="plot file (.svg, or .png with matplotlib)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


DOMAINS = [  # inputs.check_domains, before any folder is read or model loaded
    ("metrics", lambda v, a: set(v.split(",")) <= {*VBENCH_QUALITY, *PROXIES},
     "{v!r}: unknown metric; choose from " + ", ".join([*VBENCH_QUALITY, *PROXIES])),
    ("reward", lambda v, a: all(bool(reward_names(s.partition("=")[0])) for s in (v.split(",") if "=" not in v
                                                                                   else [v])), ""),
    ("device", lambda v, a: known_device(v), "{v!r}: not a device torch sees here (cpu; cuda or cuda:I for a "
     "visible GPU)"),
    # names, Hub ids and paths: each checked by the reader that opens it (a missing folder, a bad results file)
    *[(flag, ANY, "") for flag in ("video_dir", "out", "name", "reward_dim", "dino", "clip", "raft", "amt", "musiq",
                                   "fvd", "fvd_ckpt", "aesthetic_clip", "aesthetic_head", "full_info", "vbench_dims",
                                   "compare", "run", "html", "study_html", "seed", "study", "plot")],
]


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    return args


@command()
def main(argv=None):
    args = parse_args(argv)
    if args.study:
        return page.print_study(args.study)
    runs_only = args.run is not None and args.html is None
    if sum(x is not None for x in (args.video_dir, args.compare)) + runs_only != 1:
        raise UserError("give exactly one of VIDEO_DIR, --compare RESULTS..., --run RUN_DIR, --study RESULTS...")
    if args.study_html and len(args.compare or []) != 2:
        raise UserError("--study-html compares two runs: --compare A.json B.json")
    for path in (args.html, args.study_html):
        if path:
            writable_file(path, "--html")  # before minutes of scoring
    if args.plot:
        page.check_plot(args.plot)
    if runs_only:
        if len(args.run) != 1:
            raise UserError("--run plots one run's reward curve (several go on an --html page)")
        path = args.plot or os.path.join(args.run[0], "reward_curve.svg")
        updates = page.plot_reward_curve(args.run[0], path)
        print(f"reward curve ({len(updates)} reference updates) -> {path}")
        return
    if args.compare:
        results = [load_results(path) for path in args.compare]
    else:
        if not os.path.isdir(args.video_dir):  # before the --out check, which would make the folder
            raise UserError(f"{args.video_dir!r} is not a folder")
        out = writable_file(args.out or os.path.join(args.video_dir, "evaluation.json"), "--out")  # before scoring
        r = evaluate(args.video_dir, args)
        write_atomically(out, [json.dumps(r, indent=1)])
        print(f"{len(r['videos'])} videos scored, {len(r['skipped'])} skipped; results -> {out}")
        results = [r]
    md = page.table(results, VBENCH_QUALITY, PROXIES, quality_score)
    print(md)
    if any(k in PROXIES for r in results for k in r["summary"]):
        print("(proxy) columns are weight-free stand-ins, not VBench's motion smoothness / dynamic degree")
    if args.plot:
        page.plot_comparison(results, args.plot, VBENCH_QUALITY, PROXIES)
        print(f"plot -> {args.plot}")
    if args.html:
        write_atomically(args.html, [page.comparison_page(results, md, args.run or [])])
        print(f"page -> {args.html}")
    if args.study_html:
        write_atomically(args.study_html, [page.study_page(results[0], results[1], args.seed)])
        print(f"study page ({len(page.study_pairs(results[0], results[1], args.seed)[1])} pairs) -> "
              f"{args.study_html}")


if __name__ == "__main__":
    main()
