"""VideoModel: the one interface the training loop and the methods see, whatever the base model, written down as a
Protocol; the Open-Sora family's implementation (OpenSoraModel: opensora, toy, tiny); the registry.

A VideoModel owns a trainable denoiser (`.dit`, the policy), a frozen autoencoder and a frozen text encoder,
and knows the video size it generates. A step goes
  encode_prompts -> sample (N candidates per prompt, one batched call) -> decode (uint8 videos) -> reward
  and, for the Diffusion-DPO loss (paper Eq. 3), training_timesteps and errors with a given network (policy or ref).
`MODELS` maps a `--model` name to its builder; that dict is the whole registry (toy.py and diffusers_models.py
are named by string and imported on first use: they import this file).
"""
import copy
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import opensora as osr
from inputs import UserError, check_safetensors, read_json, resolve


# ----------------------------------------------------------------------------------------------------------
# Text: Open-Sora's prompt format, and an embedded byte-level T5 for the tiny model


def opensora_prompt(prompt: str, aes: float | None = 6.5) -> str:
    """The caption format Open-Sora v1.2 was trained on: an aesthetic-score suffix, then T5 caption cleaning.
    Our cleaning covers plain-text prompts (lower case, PixArt's bad-punctuation set to spaces, a space after
    ',./' that follows a letter, whitespace collapsed); the original's URL/HTML/mojibake repair is not done."""
    if aes is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aes:.1f}."
    text = prompt.strip().lower()
    text = re.sub(r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " ", text)
    text = re.sub(r"[\.]{2,}", " ", text)
    text = re.sub(r"\s+\.\s+", " ", text)
    text = re.sub(r"(\D[,\./])\b", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def mean_error(sq: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-sample squared errors (B, C, T, ...) -> the mean over all non-batch dims (B,), or with `segments`
    (latent-frame ranges, DenseDPO) the mean over each segment's latent frames (B, S). One segment spanning every
    latent frame gives the per-sample mean bit for bit."""
    if segments is None:
        return sq.flatten(1).mean(1)
    return torch.stack([sq[:, :, lo:hi].flatten(1).mean(1) for lo, hi in segments], 1)


class ByteTokenizer:
    """A tokenizer with no files: UTF-8 bytes + 3 (0 = pad, 1 = eos, as T5), padded to max_length."""

    vocab_size = 259

    def __call__(self, texts: list[str], max_length: int):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            b = [c + 3 for c in text.encode("utf-8")][: max_length - 1] + [1]
            ids[i, : len(b)] = torch.tensor(b)
        return ids, (ids != 0).long()


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)

    def __call__(self, texts: list[str], max_length: int):
        out = self.tok(texts, max_length=max_length, padding="max_length", truncation=True,
                       add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


def tiny_t5(d_model: int = 32, seed: int = 0):
    """A small random T5 encoder, identical on every machine (fixed seed): text features for the tiny model."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(cfg).eval()


class PixelSpace(nn.Module):
    """The tiny model's 'autoencoder': latents are the pixels themselves, in [-1, 1]."""

    def latent_frames(self, frames: int) -> int:
        return frames

    def frame_spans(self, frames: int) -> list[tuple[int, int]]:
        return [(f, f + 1) for f in range(frames)]

    def encode(self, x):
        return x

    def decode(self, z, num_frames: int):
        return z


# ----------------------------------------------------------------------------------------------------------
# Loading: Hugging Face ids or local folders


DIT_ID, VAE_ID, T5_ID = "hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2", "DeepFloyd/t5-v1_1-xxl"


def read_config(folder: str) -> dict:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder} has no config.json: not a model folder")
    return read_json(os.path.join(folder, "config.json"), "model config")


def load_state(module: nn.Module, file: str, what: str, fill_missing: tuple = ()):
    """Strict load of a safetensors file; keys in fill_missing may be absent (they are derived, e.g. RoPE freqs)."""
    state = load_file(check_safetensors(file, what))
    own = module.state_dict()
    for key in fill_missing:
        state.setdefault(key, own[key])
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        detail = ", ".join(f"{n} {sorted(ks)[:3]}" for n, ks in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)) if ks)
        raise UserError(f"{what}: {file} does not match this model ({detail})")
    module.load_state_dict(state, strict=True)


def load_dit(path: str) -> osr.STDiT3:
    folder = resolve(path, "STDiT3 weights", DIT_ID, ["config.json", "model.safetensors"])
    try:
        dit = osr.STDiT3(**read_config(folder))
    except TypeError as e:  # a config.json of another model
        raise UserError(f"{folder}/config.json is not an STDiT3 config ({e})") from None
    load_state(dit, os.path.join(folder, "model.safetensors"), "STDiT3 weights", fill_missing=("rope.freqs",))
    return dit


def load_vae(path: str) -> osr.OpenSoraVAE:
    folder = resolve(path, "Open-Sora VAE", VAE_ID, ["config.json", "model.safetensors"])
    vae = osr.OpenSoraVAE(**read_config(folder))
    load_state(vae, os.path.join(folder, "model.safetensors"), "Open-Sora VAE")
    return vae


def load_t5(path: str):
    from transformers import T5EncoderModel

    folder = resolve(path, "T5 text encoder", T5_ID)
    return T5EncoderModel.from_pretrained(folder).eval(), HFTokenizer(folder)


# ----------------------------------------------------------------------------------------------------------
# The interface


class VideoModel(Protocol):
    """What train.py, run.py, the methods, sample.py and bench.py use of a base model; latents (B, C, T, H, W),
    videos uint8 (B, T, H, W, 3). OpenSoraModel below and diffusers_models.DiffusersVideoModel implement it."""
    name: str  # the --model name, recorded in checkpoints
    dit: nn.Module  # the policy network G_theta (what the optimizer trains, LoRA wraps and checkpoints hold)
    vae: nn.Module  # frozen autoencoder
    text_encoder: nn.Module | None  # frozen; None once every prompt is cached (--text-encoder-offload free)
    height: int  # the generated video's pixels, frames and frame rate
    width: int
    frames: int
    fps: int
    sample_steps: int  # sampler steps and classifier-free guidance scale
    cfg: float
    beta: float  # the default DPO beta in this model's error space
    segment_seconds: float  # DenseDPO's default segment length
    device: torch.device
    dtype: torch.dtype  # the frozen parts' storage dtype; the policy stays fp32
    has_sde: bool  # its sampler has an SDE form (sde_schedule): --method grpo
    predicts_x0: bool  # predict_x0 and decode_float exist: --method refl
    grpo_noise_level: float | None  # GRPO's default SDE noise level (None: Wan2.1's std_t = sigma_1 s)

    @property
    def latent_shape(self) -> tuple: ...  # (C, T, H, W) of one video's latents
    @property
    def latent_spans(self) -> list[tuple[int, int]]: ...  # the pixel frames each latent frame encodes (DenseDPO)
    def to(self, device, dtype: torch.dtype = torch.float32) -> "VideoModel": ...
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...  # cached per prompt
    def sample(self, prompts: list[str], n: int, seeds: list[int], net: nn.Module | None = None, *,
               source: torch.Tensor | None = None, eta: float = 1.0): ...  # N candidates per prompt, one call
    def encode(self, videos: torch.Tensor) -> torch.Tensor: ...  # uint8 videos -> latents (DenseDPO's sources)
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # latents -> uint8 videos
    def training_timesteps(self, b: int, generator: torch.Generator) -> torch.Tensor: ...  # the DPO t
    def errors(self, net: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               mask: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor: ...  # Eq. 3's
    def sde_schedule(self, prompts: list[str], n: int, net: nn.Module,
                     steps: int | None = None) -> tuple[Callable, list[float], list]: ...  # GRPO, if has_sde
    def grpo_velocity(self, net: nn.Module, z: torch.Tensor, t, prompts: list[str], n: int) -> torch.Tensor: ...
    def aligned_level(self, eta: float, steps: int | None = None) -> tuple[float, float]: ...  # DenseDPO's start
    def set_grad_checkpointing(self, on: bool): ...
    def frozen_copy(self) -> nn.Module: ...  # the reference network G_ref
    def save_weights(self, folder: str, net: nn.Module | None = None, file: str = "model.safetensors"): ...
    def load_weights(self, file: str, net: nn.Module | None = None): ...


@dataclass
class OpenSoraModel:
    """The Open-Sora v1.2 family behind the VideoModel interface: STDiT3, a VAE (Open-Sora's, or PixelSpace for the
    toy and tiny models) and T5, rectified-flow sampling with classifier-free guidance."""
    name: str
    dit: osr.STDiT3  # the policy network G_theta
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    height: int
    width: int
    frames: int
    fps: int = 24
    sample_steps: int = 30
    cfg: float = 7.0
    beta: float = 500.0  # default DPO beta for this backend (see README: velocity-space errors)
    max_length: int = 300
    aes: float | None = 6.5
    use_timestep_transform: bool = True
    segment_seconds: float = 1.0  # DenseDPO labels about 1 s subclips
    high_noise_share: float = 0.0  # of DPO timesteps drawn uniform on t in [800, 1000] (the toy's pretraining mix)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, repr=False)
    grpo_noise_level = 0.7  # GRPO's SDE: Flow-GRPO's default noise level (--grpo-noise-level)
    has_sde = True  # rectified flow: grpo.sample_sde
    predicts_x0 = True  # ReFL

    # --- sizes
    @property
    def latent_shape(self) -> tuple:
        f = getattr(self.vae, "spatial_factor", 1)
        return (self.dit.in_channels, self.vae.latent_frames(self.frames), self.height // f, self.width // f)

    @property
    def latent_spans(self) -> list[tuple[int, int]]:
        """The pixel frames (first, end) that each latent frame encodes (DenseDPO's segments: dpo.segments)."""
        return self.vae.frame_spans(self.frames)

    def to(self, device, dtype: torch.dtype = torch.float32) -> "OpenSoraModel":
        """Policy weights stay fp32 (autocast does bf16 compute); frozen parts are stored in `dtype`."""
        self.device, self.dtype = torch.device(device), dtype
        self.dit.to(self.device)
        self.vae.to(self.device, dtype).eval().requires_grad_(False)
        self.text_encoder.to(self.device).eval().requires_grad_(False)
        return self

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # --- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features (B, 1, L, C) and mask (B, L); each prompt is encoded once and cached on the CPU."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            if self.text_encoder is None:
                raise UserError(f"prompt {todo[0]!r} was not encoded before the text encoder was freed "
                                "(--text-encoder-offload free); use --text-encoder-offload cpu")
            texts = [opensora_prompt(p, self.aes) if self.aes is not None else p.lower() for p in todo]
            ids, mask = self.tokenizer(texts, self.max_length)
            dev = next(self.text_encoder.parameters()).device
            y = self.text_encoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            # cached without the padding: STDiT3 masks padded tokens out of cross-attention, so zeros read back
            # in their place give the same output, and a 300-token T5-XXL row shrinks to the prompt's length
            for p, yi, mi in zip(todo, y.cpu(), mask):
                self._cache[p] = yi[: int(mi.sum())].clone()
        y = torch.zeros(len(prompts), self.max_length, self._cache[prompts[0]].shape[-1])
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens = self._cache[p]
            y[i, : len(tokens)], mask[i, : len(tokens)] = tokens.float(), 1
        return y[:, None].to(self.device), mask.to(self.device)

    def model_kwargs(self, b: int) -> dict:
        full = lambda v: torch.full((b,), float(v), device=self.device)
        return dict(fps=full(self.fps), height=full(self.height), width=full(self.width))

    def transform(self, t: torch.Tensor) -> torch.Tensor:
        if not self.use_timestep_transform:
            return t
        return osr.timestep_transform(t, self.height, self.width, self.frames)

    # --- Alg. 1 line 4: N candidates per prompt from the current policy
    def _conditioning(self, net: nn.Module, prompts: list[str], n: int):
        """[cond; null] text features for both CFG halves, the shared mask, and the size kwargs."""
        y, mask = self.encode_prompts(prompts)
        y, mask = y.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        null = getattr(net, "module", net).y_embedder.y_embedding  # (a DDP wrapper holds the net as .module)
        y_all = torch.cat([y, null[None, None].to(y).expand_as(y)])  # [cond; null]
        return y_all, mask, self.model_kwargs(2 * y.shape[0])

    def _cfg_velocity(self, net, y_all, mask, kw):
        def velocity(z_in, t_in):
            with self.autocast():
                return net(z_in, t_in, y_all, mask=mask, **kw)[:, : self.dit.in_channels].float()
        return velocity

    @torch.no_grad()
    def sample(self, prompts: list[str], n: int, seeds: list[int], net: nn.Module | None = None,
               steps: int | None = None, cfg: float | None = None, until: int | None = None,
               source: torch.Tensor | None = None, eta: float = 1.0):
        """Clean latents (len(prompts) * n, C, T, H, W), candidates of a prompt adjacent. All candidates and
        both CFG halves go through the network as ONE batch per step; candidate j uses seeds[j] for its noise.
        With `until=i` it stops after i of the steps and returns (z_t, t): the partly denoised latents (ReFL).
        With `source` (len(prompts), C, T, H, W), DenseDPO's aligned candidates: candidate j is prompt i's source
        corrupted with its own noise to the state at t = eta * 1000, x_t = (1 - eta) x + eta noise, and denoised
        from there over the sampler's remaining steps; eta = 1 is plain sampling."""
        net = net or self.dit
        assert len(seeds) == len(prompts) * n and (source is None or until is None)
        y_all, mask, kw = self._conditioning(net, prompts, n)
        z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(self.device)
        was_training = net.training
        net.eval()
        ts = osr.sampling_timesteps(steps or self.sample_steps, self.transform)
        if source is not None:
            t0 = eta * osr.NUM_TIMESTEPS
            z = osr.add_noise(source.to(z).repeat_interleave(n, 0), z, torch.tensor(t0))
            ts = [t0] + [t for t in ts if t < t0]
        end = 0.0 if until is None else ts[until]  # ts[:None] is every step
        z = osr.euler_cfg_sample(self._cfg_velocity(net, y_all, mask, kw), z, ts[:until],
                                 self.cfg if cfg is None else cfg, end=end)
        net.train(was_training)
        return z if until is None else (z, ts[until])

    def aligned_level(self, eta: float, steps: int | None = None) -> tuple[float, float]:
        """(a, b) of x_t = a x + b noise where DenseDPO's aligned copies start: the flow form itself, exactly at eta
        (the sampler starts at t = eta * 1000, then takes its remaining steps)."""
        return 1.0 - eta, eta

    def sde_schedule(self, prompts: list[str], n: int, net: nn.Module, steps: int | None = None):
        """GRPO's rollout (grpo.sample_sde): the guided velocity v(z, t) of `net` (x0 - noise, Open-Sora's sign), the
        K + 1 noise levels sigma_i = t_i / 1000 (the last 0) and the K timesteps t_i the network sees."""
        y_all, mask, kw = self._conditioning(net, prompts, n)
        velocity = self._cfg_velocity(net, y_all, mask, kw)
        timesteps = osr.sampling_timesteps(steps or self.sample_steps, self.transform)
        sigmas = [t / osr.NUM_TIMESTEPS for t in timesteps] + [0.0]
        return lambda z, t: self.guided_velocity(velocity, z, t), sigmas, timesteps

    def guided_velocity(self, velocity, z: torch.Tensor, t: float, cfg: float | None = None) -> torch.Tensor:
        """Open-Sora's classifier-free guided velocity at timestep t (both halves in one batch)."""
        t_in = torch.full((2 * z.shape[0],), t, device=z.device)
        cond, uncond = velocity(torch.cat([z, z]), t_in).chunk(2)
        return uncond + (self.cfg if cfg is None else cfg) * (cond - uncond)

    def grpo_velocity(self, net: nn.Module, z: torch.Tensor, t: float, prompts: list[str], n: int) -> torch.Tensor:
        """The guided velocity WITH gradients at one step (timestep t) of a stored trajectory (GRPO's training
        forward), in Open-Sora's sign: x0 - noise."""
        y_all, mask, kw = self._conditioning(net, prompts, n)
        return self.guided_velocity(self._cfg_velocity(net, y_all, mask, kw), z, t)

    def predict_x0(self, net: nn.Module, z: torch.Tensor, t: float, prompts: list[str],
                   cfg: float | None = None) -> torch.Tensor:
        """One guided network call WITH gradients (ReFL): the clean latents the velocity at (z, t) points to,
        x0 = z_t + (t / 1000) v, exact for rectified flow's x_t = (1 - t/1000) x0 + (t/1000) noise."""
        y_all, mask, kw = self._conditioning(net, prompts, 1)
        t_in = torch.full((2 * z.shape[0],), t, device=z.device)
        cond, uncond = self._cfg_velocity(net, y_all, mask, kw)(torch.cat([z, z]), t_in).chunk(2)
        v = uncond + (self.cfg if cfg is None else cfg) * (cond - uncond)
        return z + (t / osr.NUM_TIMESTEPS) * v

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) -> latents (B, C, T', H', W'), the posterior means (DenseDPO's sources)."""
        out = []
        for v in videos.split(1):
            x = v.permute(0, 4, 1, 2, 3).to(self.device, self.dtype) / 127.5 - 1
            out.append(self.vae.encode(x).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 videos (B, T, H, W, 3), one video at a time to bound memory."""
        out = []
        for z in latents.split(1):
            x = self.vae.decode(z.to(self.dtype), num_frames=self.frames).float()
            x = ((x.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # as Open-Sora saves
            out.append(x.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(out)

    def decode_float(self, latents: torch.Tensor, latent_frames: int | None = None) -> torch.Tensor:
        """Differentiable decode to float videos (B, T, H, W, 3) on 0..255 (ReFL). Only the first
        `latent_frames` latent frames are decoded (Open-Sora: 5 latent frames = one 17-frame VAE chunk): the
        memory of the decoder's backward grows with every frame, so decode only what the reward needs."""
        lf = latents.shape[2] if latent_frames is None else min(latent_frames, latents.shape[2])
        frames = max(f for f in range(1, self.frames + 1) if self.vae.latent_frames(f) <= lf)
        with self.autocast():
            x = self.vae.decode(latents[:, :, :lf].to(self.dtype), num_frames=frames).float()
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 4, 1)

    # --- what the Diffusion-DPO loss needs (Alg. 1 line 7)
    def training_timesteps(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """The DPO t, from the distribution the network was trained on (Diffusion-DPO samples t as pretraining
        did): Open-Sora's logit-normal; for the toy model, its pretraining mix (toy.pretraining_timesteps), a
        high_noise_share of them uniform on the noisiest fifth, where layout and motion are decided."""
        t = osr.training_timesteps(b, generator)
        if self.high_noise_share:
            high = 800 + 200 * torch.rand(b, generator=generator)
            t = torch.where(torch.rand(b, generator=generator) < self.high_noise_share, high, t)
        return self.transform(t.to(self.device))

    def errors(self, net: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               y: torch.Tensor, mask: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Per-sample MSE between the net's velocity and the rectified-flow target x0 - noise, mean over all
        non-batch dims (or per segment of latent frames: mean_error), fp32. Captions are never dropped here (Open-Sora
        would drop them in train mode)."""
        x_t = osr.add_noise(x0, noise, t)
        with self.autocast():
            v = net(x_t, t, y, mask=mask, **self.model_kwargs(x0.shape[0]))[:, : self.dit.in_channels]
        return mean_error((v.float() - osr.velocity_target(x0, noise).float()).pow(2), segments)

    # --- memory and weights
    def set_grad_checkpointing(self, on: bool):
        self.dit.grad_checkpointing = on

    def frozen_copy(self) -> nn.Module:
        """The reference network G_ref: a copy of the policy that no optimizer sees and that runs under no_grad
        only. It keeps the policy's dtype AND its requires_grad flags: under autocast a weight that requires grad
        is cast to bf16 once and cached, one that does not is cast at every use, and the errors then differ in
        their last bits (tiny model, bf16 autocast on a CPU); equal weights must give equal errors."""
        return copy.deepcopy(self.dit).eval()

    def save_weights(self, folder: str, net: nn.Module | None = None, file: str = "model.safetensors"):
        """DiT weights as safetensors plus config.json: the layout of hpcai-tech/OpenSora-STDiT-v3, so a
        checkpoint folder works anywhere a DiT folder does (`--dit checkpoint-200`)."""
        net = net or self.dit
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(state, os.path.join(folder, file), metadata={"model": self.name})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**net.config, "model": self.name}, f, indent=1)

    def load_weights(self, file: str, net: nn.Module | None = None):
        """Fine-tuned DiT weights saved by save_weights; refuses a file made for another model."""
        from safetensors import safe_open

        if not os.path.isfile(file):
            raise UserError(f"no weights file {file}")
        with safe_open(file, "pt") as f:
            made_for = (f.metadata() or {}).get("model")
        if made_for is not None and made_for != self.name:
            raise UserError(f"{file} holds weights of model {made_for!r}, not {self.name!r}")
        load_state(net or self.dit, file, f"weights for {self.name}", fill_missing=("rope.freqs",))


# ----------------------------------------------------------------------------------------------------------
# Builders: --model NAME


def size_for(resolution: str, aspect: str, size: str | None, multiple: int) -> tuple[int, int]:
    """A named Open-Sora size, or an explicit HxW that must be a multiple of `multiple` pixels."""
    if size:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size must look like 240x432, got {size!r}") from None
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise UserError(f"--size {size}: height and width must be positive multiples of {multiple} pixels")
        return h, w
    try:
        return osr.image_size(resolution, aspect)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_opensora(dit: str = DIT_ID, vae: str = VAE_ID, text_encoder: str = T5_ID, resolution: str = "240p",
                   aspect: str = "9:16", size: str | None = None, frames: int | None = None, **_) -> OpenSoraModel:
    """Open-Sora v1.2 as the paper fine-tunes it: 240p 9:16, 51 frames, 24 fps, 30 steps, cfg 7.0, aes 6.5."""
    height, width = size_for(resolution, aspect, size, 16)
    frames = frames or 51
    if frames < 1 or 1 < frames < 17:  # Open-Sora's timestep shift counts whole 17-frame chunks: 0 chunks -> 0/0
        raise UserError(f"--frames {frames}: Open-Sora v1.2 takes 1 frame (an image) or at least 17 (it trained on "
                        "51 / 102 ...)")
    net = load_dit(dit)
    ae = load_vae(vae)
    t5, tok = load_t5(text_encoder)
    return OpenSoraModel("opensora", net, ae, t5, tok, height, width, frames, max_length=net.config["model_max_length"])


TINY_DIT = dict(in_channels=3, patch_size=(1, 4, 4), hidden_size=64, depth=2, num_heads=4, pred_sigma=False,
                caption_channels=32, model_max_length=48, input_sq_size=32, qk_norm=True)


def build_tiny(size: str | None = None, frames: int | None = None, dit: str | None = None, **_) -> OpenSoraModel:
    """The embedded default: the same STDiT3 class, small, working on 32x32 pixels directly, with a random
    byte-level T5. No files, no downloads; samples an 8-frame video on a CPU in well under a second."""
    height, width = size_for("", "", size or "32x32", 8)
    if dit:
        net = load_dit(dit)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = osr.STDiT3(**TINY_DIT)
    return OpenSoraModel("tiny", net, PixelSpace(), tiny_t5(TINY_DIT["caption_channels"]), ByteTokenizer(),
                      height, width, frames or 8, fps=8, sample_steps=20, cfg=4.0, beta=500.0,
                      max_length=TINY_DIT["model_max_length"], aes=None, use_timestep_transform=False,
                      segment_seconds=0.25)


def lazy(module: str, builder: str):
    """A builder imported on first use: diffusers_models and toy import this file, so this file cannot import them."""
    return lambda **kwargs: getattr(importlib.import_module(module), builder)(**kwargs)


MODELS = {"toy": lazy("toy", "build_toy"), "opensora": build_opensora,
          "cogvideox": lazy("diffusers_models", "build_cogvideox"), "wan": lazy("diffusers_models", "build_wan"),
          "wan2.2-5b": lazy("diffusers_models", "build_wan22_5b"),
          "wan2.2-14b": lazy("diffusers_models", "build_wan22_14b"), "ltx": lazy("ltx_video", "build_ltx"),
          "tiny": build_tiny}


def build_model(name: str, **kwargs) -> VideoModel:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
