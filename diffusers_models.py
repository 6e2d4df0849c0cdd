"""CogVideoX-2B, Wan2.1 and Wan2.2 (TI2V-5B, T2V-A14B) as OnlineVPO base models, assembled from diffusers components;
the classes they share, which ltx_video.py builds LTX-Video 0.9 on.

    python train.py --model cogvideox     # THUDM/CogVideoX-2b: 49 frames, 480x720, 50 steps, guidance 6
    python train.py --model wan           # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: 81 frames, 480x832, 50 steps, guidance 5
    python train.py --model wan2.2-5b     # Wan-AI/Wan2.2-TI2V-5B-Diffusers: 121 frames, 704x1280, 50 steps, guidance 5
    python train.py --model wan2.2-14b    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts, 81 frames, 720x1280, 40 steps

Transformer, VAE, text encoder, tokenizer and scheduler are diffusers' and transformers' own classes, loaded from the
published folder layout. Ours is only what the VideoModel verbs need: prompt embeddings cached per prompt; the N
candidates and both CFG halves in ONE transformer forward per step, stepped by the pipeline's own scheduler; decoding;
the per-sample error in the space of each model's own training objective; weights written with `save_pretrained`, so
a fine-tuned transformer drops into the model's pipeline. pipeline_bench.py times (and checks) the batched sampling
against the pipelines; tests/tiny_diffusers.py writes tiny random pipelines in these layouts.
"""
import copy
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from inputs import UserError, resolve
from model import mean_error, size_for

COGVIDEOX_ID, WAN_ID = "THUDM/CogVideoX-2b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


# ----------------------------------------------------------------------------------------------------------
# Loading: a pipeline (Hub id, or a folder with model_index.json) or a folder holding one component


def is_pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) if os.path.isdir(path) else True  # else a Hub id


def component(path: str, sub: str, hub_id: str) -> str:
    """The folder of one component: `sub/` of a pipeline (a Hub id is fetched, or found in the Hub cache), or `path`
    itself when it holds the component directly (a fine-tuned transformer, a text-encoder folder)."""
    if not os.path.isdir(path):
        path = resolve(path, f"{sub} of {path}", hub_id, ["model_index.json", f"{sub}/*"])
    inner = os.path.join(path, sub)
    return inner if os.path.isdir(inner) else path


def locate(hub_id: str, dit: str | None, vae: str | None, text_encoder: str | None) -> dict[str, str]:
    """`--dit` is the base pipeline (Hub id or folder) or a transformer folder such as a train.py checkpoint; the parts
    a transformer folder lacks come from the default base. `--vae` and `--text-encoder` default to the base."""
    dit = dit or hub_id
    base = dit if is_pipeline(dit) else hub_id
    transformer = component(dit, "transformer", hub_id)
    own_scheduler = os.path.isfile(os.path.join(transformer, "scheduler_config.json"))  # save_weights writes one
    text = text_encoder or base
    return dict(transformer=transformer,
                scheduler=transformer if own_scheduler else component(base, "scheduler", hub_id),
                vae=component(vae or base, "vae", hub_id), text_encoder=component(text, "text_encoder", hub_id),
                tokenizer=component(text, "tokenizer", hub_id))


def load(cls, folder: str, **kwargs):
    """from_pretrained, with a missing or broken folder reported as one line."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {cls.__name__} from {folder}: {str(e).splitlines()[0]}") from None


def load_model(cls, folder: str, variant: str | None = None) -> nn.Module:
    """cls.from_pretrained. diffusers cannot load a model that keeps modules in fp32 (Wan's transformer) without the
    optional `accelerate` package; then the same by hand: the class from config.json, the safetensors weights (one
    file or shards, diffusers' names) loaded strictly."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, _add_variant, is_accelerate_available
    from safetensors.torch import load_file

    if cls._keep_in_fp32_modules is None or is_accelerate_available():
        return load(cls, folder, variant=variant, low_cpu_mem_usage=is_accelerate_available())
    single = os.path.join(folder, _add_variant(SAFETENSORS_WEIGHTS_NAME, variant))
    index = os.path.join(folder, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(os.path.join(folder, shard)).items()}
    else:
        raise UserError(f"cannot load {cls.__name__} from {folder}: no {os.path.basename(single)}")
    net = cls.from_config(read_json(folder, "config.json"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"cannot load {cls.__name__} from {folder}: {str(e).splitlines()[0]}") from None
    return net.eval()


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """module.to(device, dtype), without diffusers' warning about fp32-kept modules that fires for any dtype."""
    return module.to(device)._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no {name}: not a diffusers component folder")
    with open(path) as f:
        return json.load(f)


def check_video(name: str, size: str | None, default: tuple[int, int], multiple: int, frames: int | None,
                default_frames: int, time_factor: int) -> tuple[int, int, int]:
    """Sizes the model can take: H and W multiples of VAE factor x patch, frames = time_factor * k + 1."""
    height, width = size_for("", "", size, multiple) if size else default
    frames = default_frames if frames is None else frames
    if frames < 1 or (frames - 1) % time_factor:
        near = max(1, (frames - 1) // time_factor * time_factor + 1)
        raise UserError(f"--frames {frames}: {name} takes {time_factor}k+1 frames (its VAE compresses time "
                        f"{time_factor}x), e.g. {near} or {default_frames}")
    return height, width, frames


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def variant_of(file: str) -> str | None:
    """train.py names the policy `model.safetensors` and the reference `ref.safetensors`; in diffusers format these are
    the folder's transformer (diffusion_pytorch_model.safetensors) and its variant "ref"."""
    name = os.path.basename(file)
    return None if name == "model.safetensors" else name.removesuffix(".safetensors")


MODEL_OF_CLASS = {"CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan",
                  "LTXVideoTransformer3DModel": "ltx"}  # the family whose weights a transformer folder holds


# ----------------------------------------------------------------------------------------------------------
# What both backends share


@dataclass
class DiffusersVideoModel:
    """The VideoModel verbs over a diffusers transformer; CogVideoX and Wan add the latent layout, the text encoding,
    decoding and the training target. Latents are (B, C, T, H, W) as for every VideoModel."""
    dit: nn.Module  # the policy network G_theta: the pipeline's `transformer`
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object  # the pipeline's scheduler: sampling steps exactly as the pipeline does
    height: int
    width: int
    frames: int
    fps: int
    sample_steps: int
    cfg: float
    max_length: int
    beta: float = 500.0  # default DPO beta, see README: errors in the model's own target space
    negative_prompt: str = ""  # both pipelines' default negative prompt
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, repr=False)
    vae_fp32 = False  # keep the VAE in fp32 whatever the compute dtype
    segment_seconds = 1.0  # DenseDPO labels about 1 s subclips
    has_sde = False  # GRPO's SDE rollout: Wan (a flow) only
    predicts_x0 = False  # ReFL: the Open-Sora family only

    @property
    def latent_shape(self) -> tuple:
        """(C, T, H, W) of one video's latents, from the VAE's compression (each backend's vae_spatial and
        time_factor) and the transformer's input channels."""
        s, tc = self.vae_spatial, self.time_factor
        return (self.dit.config.in_channels, (self.frames - 1) // tc + 1, self.height // s, self.width // s)

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features of prompts padded to max_length, with the padding read (no mask into T5), and the mask:
        CogVideoXPipeline's and LTXPipeline's _get_t5_prompt_embeds (LTX passes the mask on to its transformer)."""
        ids, mask = tokenize(self.tokenizer, texts, self.max_length)
        return self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))[0], mask

    @property
    def latent_spans(self) -> list[tuple[int, int]]:
        """The pixel frames (first, end) each latent frame encodes: the VAEs take 1 + k * time_factor frames to
        1 + k latent frames, the first frame alone (causal), then time_factor frames each (DenseDPO's segments)."""
        tf = self.time_factor
        return [(0, 1)] + [(1 + tf * k, 1 + tf * (k + 1)) for k in range((self.frames - 1) // tf)]

    def to(self, device, dtype: torch.dtype = torch.float32) -> "DiffusersVideoModel":
        """Policy weights stay fp32 (autocast does bf16 compute); frozen parts are stored in `dtype`."""
        self.device, self.dtype = torch.device(device), dtype
        place(self.dit, self.device, torch.float32)
        place(self.vae, self.device, torch.float32 if self.vae_fp32 else dtype).eval().requires_grad_(False)
        place(self.text_encoder, self.device, dtype).eval().requires_grad_(False)
        return self

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # --- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features (B, L, C) and mask (B, L); each prompt is encoded once and cached on the CPU, so the text
        encoder can be moved off the accelerator once the prompts are known."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            if self.text_encoder is None:
                raise UserError(f"prompt {todo[0]!r} was not encoded before the text encoder was freed "
                                "(--text-encoder-offload free); use --text-encoder-offload cpu")
            y, mask = self.embed(todo)
            for p, yi, mi in zip(todo, y.cpu(), mask.cpu()):  # kept in the encoder's dtype (bf16 on GPUs)
                self._cache[p] = (yi, mi)
        y = torch.stack([self._cache[p][0] for p in prompts]).float().to(self.device)
        mask = torch.stack([self._cache[p][1] for p in prompts]).to(self.device)
        return y, mask

    # --- Alg. 1 line 4: N candidates per prompt from the current policy
    @torch.no_grad()
    def sample(self, prompts: list[str], n: int, seeds: list[int], net: nn.Module | None = None,
               steps: int | None = None, cfg: float | None = None, source: torch.Tensor | None = None,
               eta: float = 1.0) -> torch.Tensor:
        """Clean latents (len(prompts) * n, C, T, H, W), candidates of a prompt adjacent. All candidates and both CFG
        halves go through the transformer as ONE batch per step; candidate j uses seeds[j] for its initial noise.
        The loop is the pipelines' own: scheduler.timesteps, uncond + cfg * (cond - uncond), scheduler.step.
        With `source` (len(prompts), C, T, H, W), DenseDPO's aligned candidates as the pipelines' video-to-video mode
        does it: each copy of the source noised by the scheduler's add_noise with its own noise to the first sampling
        step that corrupts it no more than eta does in the flow form (start_index), then the remaining steps."""
        net = net or self.dit
        cfg = self.cfg if cfg is None else cfg
        assert len(seeds) == len(prompts) * n
        text = self.guidance_text(prompts, n, cfg)
        z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(self.device)
        scheduler = self.fresh_scheduler(steps, self.device)
        timesteps = scheduler.timesteps
        begin = 0 if source is None else self.start_index(scheduler, eta)
        if hasattr(scheduler, "set_begin_index"):  # as WanPipeline (the video-to-video pipelines: the first step)
            scheduler.set_begin_index(begin)
        if source is not None:
            source = source.to(z).repeat_interleave(n, 0)
            if begin == len(timesteps):  # eta below the last step: nothing to denoise
                return source
            z = self.noised(scheduler, source, z, timesteps[begin: begin + 1].expand(z.shape[0]))
            timesteps = timesteps[begin:]
        was_training = net.training
        net.eval()
        for t in timesteps:
            z = scheduler.step(self.guided_prediction(net, z, t, text, cfg), t, z, return_dict=False)[0]
        net.train(was_training)
        return z

    def start_index(self, scheduler, eta: float) -> int:
        """One meaning of DenseDPO's eta on every backend: the flow form x_t = (1 - eta) x + eta noise, whose
        signal-to-noise ratio is (1 - eta) / eta. The copies start at the first sampling step whose own ratio a / b
        (x_t = a x + b noise, self.levels) is at least that: corrupted no more than eta says. A multistep scheduler
        cannot start between its steps; aligned_level says where it starts."""
        a, b = self.levels(scheduler)
        return int((a < (1 - eta) / eta * b).sum())  # the schedule runs from noise to clean

    def aligned_level(self, eta: float, steps: int | None = None) -> tuple[float, float]:
        """(a, b) of x_t = a x + b noise where the aligned copies start at this eta and number of steps; (1, 0) when
        eta lies below the last step (the copies are the source)."""
        scheduler = self.fresh_scheduler(steps, "cpu")
        a, b = self.levels(scheduler)
        i = self.start_index(scheduler, eta)
        return (1.0, 0.0) if i == len(a) else (float(a[i]), float(b[i]))

    def fresh_scheduler(self, steps: int | None, device):
        """The pipeline's scheduler set to `steps` sampling steps; a fresh copy per call (multistep solvers keep a
        history)."""
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps or self.sample_steps, device=device)
        return scheduler

    @staticmethod
    def noised(scheduler, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x noised to timestep t by the scheduler's own formula (DDIM/UniPC: add_noise; FlowMatchEuler: scale_noise,
        the flow form)."""
        if hasattr(scheduler, "add_noise"):
            return scheduler.add_noise(x, noise, t)
        return scheduler.scale_noise(x, t, noise)

    def guidance_text(self, prompts: list[str], n: int, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features and mask of each prompt repeated n times, after the negative prompt's when guided:
        [uncond; cond], the order of CogVideoXPipeline's batch. The pipelines turn CFG off at guidance_scale <= 1."""
        y, mask = (v.repeat_interleave(n, 0) for v in self.encode_prompts(prompts))
        if cfg <= 1:
            return y, mask
        y0, mask0 = self.encode_prompts([self.negative_prompt])
        return torch.cat([y0.expand_as(y), y]), torch.cat([mask0.expand_as(mask), mask])

    def guided_prediction(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor,
                          text: tuple[torch.Tensor, torch.Tensor], cfg: float) -> torch.Tensor:
        """The pipelines' prediction at timestep t: both CFG halves in one batch, uncond + cfg (cond - uncond)."""
        y, mask = text
        both = y.shape[0] == 2 * z.shape[0]  # the unconditional and conditional halves in one batch
        z_in = torch.cat([z, z]) if both else z
        with self.autocast():
            t_in = torch.as_tensor(t, device=z.device).expand(z_in.shape[0])
            pred = self.predict(net, z_in, t_in, y, mask).float()
        if not both:
            return pred
        uncond, cond = pred.chunk(2)
        return uncond + cfg * (cond - uncond)

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) -> latents (B, C, T', H', W'): the posterior mode, normalised as the
        pipelines' video-to-video modes do (DenseDPO's sources)."""
        out = []
        for v in videos.split(1):
            x = v.permute(0, 4, 1, 2, 3).to(self.device, self.vae.dtype) / 127.5 - 1
            out.append(self.vae_encode(x).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 videos (B, T, H, W, 3), one video at a time to bound memory; pixel values as the
        pipelines' postprocess (x / 2 + 0.5 clamped) rounded to 8 bits as their PIL output is."""
        out = []
        for z in latents.split(1):
            x = self.vae_decode(z.to(self.device, self.vae.dtype)).float()
            x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(x.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(out)

    # --- memory and weights
    def set_grad_checkpointing(self, on: bool):
        """diffusers' own switch: each transformer block recomputed in the backward pass."""
        if on:
            self.dit.enable_gradient_checkpointing()
        else:
            self.dit.disable_gradient_checkpointing()

    def frozen_copy(self) -> nn.Module:
        """The reference network G_ref (see model.VideoModel.frozen_copy: same dtype, same requires_grad flags)."""
        return copy.deepcopy(self.dit).eval()

    def save_weights(self, folder: str, net: nn.Module | None = None, file: str = "model.safetensors"):
        """The transformer in diffusers format (save_pretrained: config.json + diffusion_pytorch_model.safetensors)
        plus the scheduler's config, so the folder is a transformer folder for the diffusers pipeline and a whole
        `--dit`. Another `file` (train.py's ref.safetensors) is saved as the diffusers variant of that name."""
        (net or self.dit).save_pretrained(folder, variant=variant_of(file))
        self.scheduler.save_pretrained(folder)

    def load_weights(self, file: str, net: nn.Module | None = None):
        """Weights written by save_weights; `file` names them as train.py does (see variant_of). Refuses weights of
        another model or of another configuration of this transformer."""
        net = net or self.dit
        folder = os.path.dirname(file) or "."
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"no weights file {file} (and no diffusers transformer in {folder})")
        saved = read_json(folder, "config.json")
        made_for = saved.get("model") or MODEL_OF_CLASS.get(saved.get("_class_name"), saved.get("_class_name"))
        if made_for != self.family:
            raise UserError(f"{file} holds weights of model {made_for!r}, not {self.family!r}")
        own = json.loads(json.dumps(dict(net.config)))  # tuples -> lists, as in the saved file
        changed = [k for k, v in own.items() if not k.startswith("_") and k in saved and saved[k] != v]
        if changed:
            k = changed[0]
            raise UserError(f"{file} was saved from another {type(net).__name__} ({k} {saved[k]} vs {own[k]})")
        net.load_state_dict(load_model(type(net), folder, variant_of(file)).state_dict())


# ----------------------------------------------------------------------------------------------------------
# CogVideoX: v-prediction on a DDIM schedule (zero terminal SNR, SNR shift), T5 text


class CogVideoX(DiffusersVideoModel):
    """THUDM/CogVideoX-2b (and -5b) through diffusers; the transformer takes (B, T, C, H, W)."""
    name = family = "cogvideox"

    @property
    def vae_spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # CogVideoXPipeline.vae_scale_factor_spatial

    @property
    def time_factor(self) -> int:
        return self.vae.config.temporal_compression_ratio

    def rotary(self, latent_frames: int):
        """CogVideoXPipeline._prepare_rotary_positional_embeddings for CogVideoX 1.0 (-5b; -2b has no RoPE)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        c, p = self.dit.config, self.dit.config.patch_size
        gh, gw = self.height // (self.vae_spatial * p), self.width // (self.vae_spatial * p)
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=latent_frames, device=self.device)

    def predict(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        rope = self.rotary(z.shape[2]) if self.dit.config.use_rotary_positional_embeddings else None
        out = net(hidden_states=z.transpose(1, 2), encoder_hidden_states=y, timestep=t, image_rotary_emb=rope,
                  return_dict=False)[0]
        return out.transpose(1, 2)

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.vae.config.scaling_factor).sample  # CogVideoXPipeline.decode_latents

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        # CogVideoXVideoToVideoPipeline samples the posterior; the mode makes a resumed run re-encode the same latents
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    # --- the Diffusion-DPO error (Alg. 1 line 7)
    def levels(self, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM's x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise at each sampling timestep (CogVideoX's
        alpha_bar carries its SNR shift)."""
        alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps.long().cpu()].double()
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def training_timesteps(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform over the 1000 training steps, as CogVideoX is fine-tuned (diffusers' CogVideoX training example)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(self.device)

    def errors(self, net: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               y: torch.Tensor, mask: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Per-sample MSE to the v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, mean over all
        non-batch dims (or per segment: model.mean_error), fp32. CogVideoX's own fine-tuning loss (x0 error weighted
        by 1 / (1 - abar_t)) is exactly this v error, so e is the model's training loss per sample."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        with self.autocast():
            v = self.predict(net, x_t, t, y, mask)
        return mean_error((v.float() - target.float()).pow(2), segments)


def build_cogvideox(dit: str | None = None, vae: str | None = None, text_encoder: str | None = None,
                    size: str | None = None, frames: int | None = None, **_) -> CogVideoX:
    """CogVideoX with CogVideoXPipeline's defaults: 49 frames, 480x720 (the transformer's sample size), 50 steps,
    guidance 6, negative prompt "", 226 text tokens; 8 fps as the pipeline's example exports."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    parts = locate(COGVIDEOX_ID, dit, vae, text_encoder)
    tc, vc = read_json(parts["transformer"], "config.json"), read_json(parts["vae"], "config.json")
    sc = read_json(parts["scheduler"], "scheduler_config.json")
    if tc.get("patch_size_t"):
        raise UserError("CogVideoX 1.5 transformers (patch_size_t) are not supported; use CogVideoX-2b or -5b")
    if sc["_class_name"] != "CogVideoXDDIMScheduler" or sc.get("prediction_type") != "v_prediction":
        raise UserError(f"cogvideox: scheduler {sc['_class_name']} ({sc.get('prediction_type')}) is not supported; "
                        "the sampler steps CogVideoXDDIMScheduler with v_prediction, as CogVideoX-2b ships")
    s, patch = 2 ** (len(vc["block_out_channels"]) - 1), tc.get("patch_size", 2)
    default = (tc.get("sample_height", 60) * s, tc.get("sample_width", 90) * s)
    height, width, frames = check_video("cogvideox", size, default, s * patch, frames, tc.get("sample_frames", 49),
                                        vc.get("temporal_compression_ratio", 4))
    return CogVideoX(load_model(CogVideoXTransformer3DModel, parts["transformer"]),
                     load_model(AutoencoderKLCogVideoX, parts["vae"]),
                     load(T5EncoderModel, parts["text_encoder"]).eval(), load(AutoTokenizer, parts["tokenizer"]),
                     load(CogVideoXDDIMScheduler, parts["scheduler"]), height, width, frames, fps=8, sample_steps=50,
                     cfg=6.0, max_length=tc.get("max_text_seq_length", 226))

# ----------------------------------------------------------------------------------------------------------
# Flow matching (Wan2.1, Wan2.2, LTX-Video): x_t = (1 - sigma) x0 + sigma noise, the network predicts noise - x0


class FlowModel(DiffusersVideoModel):
    """What the flow-matching backends share: the sampling steps' noise levels, the Diffusion-DPO error in the
    velocity space, and GRPO's SDE rollout over the scheduler's own sigmas."""
    has_sde = True
    grpo_noise_level = None  # Flow-GRPO's Wan2.1 pipeline: std_t = sigmas[1] * s, no noise level (grpo.step_std)

    def levels(self, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's x_t = (1 - sigma) x + sigma noise at each sampling step."""
        sigma = scheduler.sigmas[: len(scheduler.timesteps)].double().cpu()
        return 1 - sigma, sigma

    def training_timesteps(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """sigma = the sampler's shift applied to u ~ U(0, 1) (shifted): the DPO loss sees noise levels spread as the
        sampling steps are. Returned in the transformer's units, 1000 sigma."""
        sigma = self.shifted(torch.rand(b, generator=generator))
        return (sigma * self.scheduler.config.num_train_timesteps).to(self.device)

    def errors(self, net: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               y: torch.Tensor, mask: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Per-sample MSE to the flow-matching velocity noise - x0 (what the transformer predicts:
        flow_prediction), with x_t = (1 - sigma) x0 + sigma noise; mean over all non-batch dims (or per segment),
        fp32."""
        sigma = (t.float() / self.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * noise
        with self.autocast():
            v = self.predict(net, x_t, t, y, mask)
        return mean_error((v.float() - (noise - x0).float()).pow(2), segments)

    # --- GRPO (grpo.py): Flow-GRPO's Wan2.1 rollout, the pipeline scheduler's sigmas stepped as an SDE
    def sde_schedule(self, prompts: list[str], n: int, net: nn.Module, steps: int | None = None):
        """GRPO's rollout (grpo.sample_sde), as Flow-GRPO's wan_pipeline_with_logprob: the scheduler's timesteps and
        sigmas (set_timesteps) and the guided prediction at each timestep. The network predicts noise - x0; grpo.py
        takes Open-Sora's x0 - noise, hence the sign. Returns v(z, t), the K + 1 sigmas (the last 0) and the K
        timesteps the transformer sees."""
        text = self.guidance_text(prompts, n, self.cfg)
        scheduler = self.fresh_scheduler(steps, self.device)
        timesteps, sigmas = list(scheduler.timesteps), scheduler.sigmas.float().tolist()
        return lambda z, t: -self.guided_prediction(net, z, t, text, self.cfg), sigmas, timesteps

    def grpo_velocity(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, prompts: list[str],
                      n: int) -> torch.Tensor:
        """The guided prediction WITH gradients at one stored step (GRPO's training forward; CFG as in the rollout,
        Flow-GRPO's train.cfg), in grpo.py's sign: x0 - noise."""
        return -self.guided_prediction(net, z, t, self.guidance_text(prompts, n, self.cfg), self.cfg)


# ----------------------------------------------------------------------------------------------------------
# Wan2.1 and Wan2.2: UMT5 text, the Wan VAE normalised per channel


class Wan(FlowModel):
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers (or -14B) through diffusers; the transformer takes (B, C, T, H, W)."""
    name = family = "wan"
    vae_fp32 = True  # WanPipeline's example loads the VAE in fp32 next to a bf16 transformer

    @property
    def time_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def vae_spatial(self) -> int:
        return self.vae.config.scale_factor_spatial

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """WanPipeline._get_t5_prompt_embeds: cleaned text, UMT5 with the mask, zeros after each prompt's tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        ids, mask = tokenize(self.tokenizer, [prompt_clean(t) for t in texts], self.max_length)
        dev = next(self.text_encoder.parameters()).device
        y = self.text_encoder(ids.to(dev), mask.to(dev)).last_hidden_state
        return y * mask.to(dev)[..., None].to(y.dtype), mask

    def predict(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return net(hidden_states=z, timestep=t, encoder_hidden_states=y, return_dict=False)[0]

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.latent_stats(z)  # WanPipeline: un-normalise with the VAE's per-channel mean and std
        return self.vae.decode(z * std + mean, return_dict=False)[0]

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x).latent_dist.mode()  # WanVideoToVideoPipeline: normalised per channel
        mean, std = self.latent_stats(z)
        return (z - mean) / std

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        return (torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1).to(like),
                torch.tensor(c.latents_std).view(1, -1, 1, 1, 1).to(like))

    @property
    def shift(self) -> float:
        c = self.scheduler.config  # UniPC / DPM-Solver name it flow_shift, FlowMatchEuler shift
        return float(c.get("flow_shift", c.get("shift", 1.0)))

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """sigma = shift u / (1 + (shift - 1) u), the sampler's flow_shift."""
        return self.shift * u / (1 + (self.shift - 1) * u)


class Wan22(Wan):
    """Wan-AI/Wan2.2-TI2V-5B-Diffusers as text-to-video: a dense 5B transformer (48 latent channels) over the Wan2.2
    VAE (16x spatial, 4x temporal compression); WanPipeline with `expand_timesteps`."""
    name = "wan2.2-5b"

    def predict(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """WanPipeline with expand_timesteps gives the transformer one timestep per latent token (T x H/2 x W/2), all
        equal in text-to-video. Sampling does exactly that (the pipeline's numbers); with gradients (the DPO and
        GRPO training forwards) one timestep per sample, the same conditioning of every token, because per-token
        modulation keeps tokens x 6 x dim fp32 numbers per video for the backward (2 GB at 704x1280x121, and that
        again in every block without gradient checkpointing)."""
        if not torch.is_grad_enabled():
            _, ph, pw = net.config.patch_size
            tokens = z.shape[2] * (z.shape[3] // ph) * (z.shape[4] // pw)
            t = (torch.ones(tokens, device=z.device) * t[:, None]).to(torch.float32)  # the pipeline's mask * t
        return super().predict(net, z, t, y, mask)


class TwoExperts(nn.Module):
    """Wan2.2-A14B's denoiser: `transformer`, the high-noise expert, at timesteps >= boundary_ratio x 1000, and
    `transformer_2`, the low-noise expert, below (WanPipeline's rule). A batch whose samples sit on both sides of the
    boundary (the DPO loss's random t) is split: each sample goes through its own expert only, so a DPO or GRPO step
    trains the expert the pipeline would use at that timestep. The children carry the pipeline's component names,
    so LoRA layers and state-dict keys read transformer.* and transformer_2.*."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_ratio: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio = float(boundary_ratio)

    @property
    def boundary(self) -> float:
        return self.boundary_ratio * 1000  # x scheduler.config.num_train_timesteps, as in WanPipeline

    @property
    def config(self):
        """The experts' shared configuration (they are built alike), with the boundary."""
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict({**self.transformer.config, "boundary_ratio": self.boundary_ratio})

    @classmethod
    def from_config(cls, config: dict) -> "TwoExperts":
        from diffusers import WanTransformer3DModel

        own = {k: v for k, v in config.items() if k != "boundary_ratio"}
        return cls(WanTransformer3DModel.from_config(own), WanTransformer3DModel.from_config(own),
                   config["boundary_ratio"])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        high = timestep.reshape(len(timestep), -1)[:, 0] >= self.boundary
        call = lambda net, i: net(hidden_states=hidden_states[i], timestep=timestep[i],
                                  encoder_hidden_states=encoder_hidden_states[i], return_dict=False)[0]
        if high.all() or not high.any():  # the sampler: every sample at the same step, one expert
            return (call(self.transformer if high.all() else self.transformer_2, slice(None)),)
        first, second = call(self.transformer, high), call(self.transformer_2, ~high)
        out = first.new_empty((len(high), *first.shape[1:]))  # the experts' output dtype (bf16 under autocast)
        out[high], out[~high] = first, second
        return (out,)

    # diffusers' switches and files, on both experts
    @property
    def gradient_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing

    def enable_gradient_checkpointing(self):
        self.transformer.enable_gradient_checkpointing(), self.transformer_2.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self):
        self.transformer.disable_gradient_checkpointing(), self.transformer_2.disable_gradient_checkpointing()

    def add_adapter(self, config, adapter_name: str):
        """LoRA per expert: the same layers of each get their own adapter (peft through diffusers)."""
        self.transformer.add_adapter(config, adapter_name=adapter_name)
        self.transformer_2.add_adapter(config, adapter_name=adapter_name)

    @property
    def peft_config(self) -> dict:
        return self.transformer.peft_config

    def save_pretrained(self, folder: str, variant: str | None = None):
        """The high-noise expert as a transformer folder, the low-noise one in its transformer_2/ subfolder, and the
        boundary in experts.json."""
        self.transformer.save_pretrained(folder, variant=variant)
        self.transformer_2.save_pretrained(os.path.join(folder, "transformer_2"), variant=variant)
        with open(os.path.join(folder, EXPERTS_FILE), "w") as f:
            json.dump({"boundary_ratio": self.boundary_ratio}, f)


EXPERTS_FILE = "experts.json"


class Wan22Experts(Wan):
    """Wan-AI/Wan2.2-T2V-A14B-Diffusers: two 14B experts (TwoExperts), each with its own guidance scale (the
    pipeline's guidance_scale above the boundary, guidance_scale_2 below)."""
    name = "wan2.2-14b"
    cfg_low: float = 3.0  # guidance of the low-noise expert (WanPipeline's guidance_scale_2)

    def guided_prediction(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor,
                          text: tuple[torch.Tensor, torch.Tensor], cfg: float) -> torch.Tensor:
        """Each expert with its own guidance: `cfg` at timesteps >= the boundary, cfg_low below."""
        expert = getattr(net, "module", net)  # under DDP
        return super().guided_prediction(net, z, t, text, cfg if float(t) >= expert.boundary else self.cfg_low)

    def load_weights(self, file: str, net: nn.Module | None = None):
        """Both experts, from the folder save_weights wrote (transformer_2/ beside the high-noise expert)."""
        net = net or self.dit
        folder, name = os.path.split(file)
        second = os.path.join(folder or ".", "transformer_2")
        if not os.path.isdir(second):
            raise UserError(f"{folder or '.'} holds one transformer, not the two experts of {self.name} "
                            "(no transformer_2/ beside it)")
        super().load_weights(file, net.transformer)
        super().load_weights(os.path.join(second, name), net.transformer_2)


def check_experts(tc: dict, tc2: dict):
    """TwoExperts builds its twin from one configuration (the merged LoRA weights, parallel.plain_twin): both experts
    alike."""
    differ = [k for k in tc if not k.startswith("_") and tc.get(k) != tc2.get(k)]
    if differ:
        raise UserError(f"wan2.2-14b: the two experts are built differently ({differ[0]} {tc[differ[0]]} vs "
                        f"{tc2.get(differ[0])})")


# Defaults per model: WanPipeline's examples and the model cards (resolution, frames, fps, steps, guidance)
WAN = {"wan": dict(cls=Wan, hub=WAN_ID, size=(480, 832), frames=81, fps=16, steps=50,
                   cfg=5.0),
       "wan2.2-5b": dict(cls=Wan22, hub="Wan-AI/Wan2.2-TI2V-5B-Diffusers", size=(704, 1280), frames=121, fps=24,
                         steps=50, cfg=5.0),
       "wan2.2-14b": dict(cls=Wan22Experts, hub="Wan-AI/Wan2.2-T2V-A14B-Diffusers", size=(720, 1280), frames=81,
                          fps=16, steps=40, cfg=4.0)}


def build_wan(dit: str | None = None, vae: str | None = None, text_encoder: str | None = None,
              size: str | None = None, frames: int | None = None, name: str = "wan", **_) -> Wan:
    """A Wan model with its pipeline's defaults (WAN), negative prompt "", 512 text tokens, the scheduler (and its
    flow_shift) the model folder ships."""
    import diffusers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    spec = WAN[name]
    parts = locate(spec["hub"], dit, vae, text_encoder)
    tc, vc = read_json(parts["transformer"], "config.json"), read_json(parts["vae"], "config.json")
    sc = read_json(parts["scheduler"], "scheduler_config.json")
    if not (sc.get("use_flow_sigmas") or sc["_class_name"] == "FlowMatchEulerDiscreteScheduler"):
        raise UserError(f"{name}: scheduler {sc['_class_name']} in {parts['scheduler']} is not a flow-matching "
                        "scheduler")
    if tc.get("in_channels") != vc.get("z_dim", 16):
        raise UserError(f"{name}: the transformer in {parts['transformer']} takes {tc.get('in_channels')} latent "
                        f"channels, the VAE in {parts['vae']} makes {vc.get('z_dim', 16)}: not one model's parts")
    if name == "wan2.2-5b" and not vc.get("is_residual"):
        raise UserError(f"wan2.2-5b: the VAE in {parts['vae']} is not the Wan2.2 VAE (is_residual false): use "
                        "--model wan for Wan2.1 weights")
    s, patch = vc.get("scale_factor_spatial", 8), tc.get("patch_size", [1, 2, 2])
    height, width, frames = check_video(name, size, spec["size"], s * max(patch[1:]), frames, spec["frames"],
                                        vc.get("scale_factor_temporal", 4))
    net = load_model(WanTransformer3DModel, parts["transformer"])
    if name == "wan2.2-14b":
        second = expert_folder(dit or spec["hub"], parts["transformer"], spec["hub"])
        tc2 = read_json(second, "config.json")
        check_experts(tc, tc2)
        net = TwoExperts(net, load_model(WanTransformer3DModel, second), boundary_of(dit or spec["hub"], parts))
    model = spec["cls"](net, load_model(AutoencoderKLWan, parts["vae"]),
                        load(UMT5EncoderModel, parts["text_encoder"]).eval(), load(AutoTokenizer, parts["tokenizer"]),
                        load(getattr(diffusers, sc["_class_name"]), parts["scheduler"]), height, width, frames,
                        fps=spec["fps"], sample_steps=spec["steps"], cfg=spec["cfg"], max_length=512)
    return model


def expert_folder(dit: str, transformer: str, hub_id: str) -> str:
    """The low-noise expert: transformer_2/ of the pipeline, or beside a saved high-noise expert (save_weights)."""
    beside = os.path.join(transformer, "transformer_2")
    if os.path.isdir(beside):
        return beside
    folder = component(dit if is_pipeline(dit) else hub_id, "transformer_2", hub_id)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{dit} has no transformer_2: wan2.2-14b needs the two experts of a Wan2.2-A14B pipeline")
    return folder


def boundary_of(dit: str, parts: dict) -> float:
    """boundary_ratio: experts.json beside a saved pair, else the pipeline's model_index.json."""
    saved = os.path.join(parts["transformer"], EXPERTS_FILE)
    if os.path.isfile(saved):
        return float(read_json(parts["transformer"], EXPERTS_FILE)["boundary_ratio"])
    index = read_json(os.path.dirname(parts["transformer"]), "model_index.json")
    if index.get("boundary_ratio") is None:
        raise UserError(f"{dit}: model_index.json has no boundary_ratio: not a two-expert Wan2.2 pipeline")
    return float(index["boundary_ratio"])


def build_wan22_5b(**kwargs) -> Wan22:
    return build_wan(**kwargs, name="wan2.2-5b")


def build_wan22_14b(**kwargs) -> Wan22Experts:
    return build_wan(**kwargs, name="wan2.2-14b")
