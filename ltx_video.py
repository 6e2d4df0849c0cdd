"""LTX-Video 0.9.x as an OnlineVPO base model, on diffusers_models' flow-matching classes.

    python train.py --model ltx           # Lightricks/LTX-Video: 161 frames, 480x704, 50 steps, guidance 3

What differs from Wan: the transformer takes packed tokens (B, T H W, C) with the T5 mask and a RoPE scaled by the
frame rate and the VAE's compression; the scheduler's sigmas are shifted by mu from the video's token count; the
LTX VAE normalises latents with its own statistics and scaling factor. Sampling equals LTXPipeline's bit for bit on
tiny random weights (tests/test_new_models.py).
"""
import copy

import torch
import torch.nn as nn

from diffusers_models import FlowModel, check_video, load, load_model, locate, read_json
from inputs import UserError



class LTXVideo(FlowModel):
    """Lightricks/LTX-Video through diffusers (LTXPipeline); the transformer takes packed tokens (B, T H W, C)."""
    name = family = "ltx"
    frame_rate = 25  # LTXPipeline's frame_rate: the RoPE's time scale is time_factor / frame_rate

    @property
    def vae_spatial(self) -> int:
        return self.vae.spatial_compression_ratio

    @property
    def time_factor(self) -> int:
        return self.vae.temporal_compression_ratio

    def predict(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latents packed into tokens (LTXPipeline._pack_latents with patch 1: (B, T H W, C)) and back."""
        b, c, f, h, w = z.shape
        tokens = z.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
        s = self.vae_spatial
        out = net(hidden_states=tokens, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                  num_frames=f, height=h, width=w, rope_interpolation_scale=(self.time_factor / self.frame_rate, s, s),
                  return_dict=False)[0]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

    @property
    def mu(self) -> float:
        """LTXPipeline's dynamic shift from the video's latent token count (calculate_shift)."""
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        c, (_, f, h, w) = self.scheduler.config, self.latent_shape
        return calculate_shift(f * h * w, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def fresh_scheduler(self, steps: int | None, device):
        """LTXPipeline: sigmas linspace(1, 1/N, N), shifted by mu (and stretched to the scheduler's terminal)."""
        import numpy as np

        n = steps or self.sample_steps
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=self.mu, device=device)
        return scheduler

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """The scheduler's exponential time shift at this video's mu: e^mu / (e^mu + 1/u - 1)."""
        return self.scheduler.time_shift(self.mu, 1.0, u)

    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.vae.latents_mean.view(1, -1, 1, 1, 1).to(like), self.vae.latents_std.view(1, -1, 1, 1, 1).to(like))

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """LTXPipeline: un-normalise (mean, std, scaling factor); a timestep-conditioned VAE (0.9.1 on) decodes at
        the pipeline's default decode_timestep 0 with no added noise."""
        mean, std = self.latent_stats(z)
        z = z * std / self.vae.config.scaling_factor + mean
        temb = torch.zeros(len(z), device=z.device, dtype=z.dtype) if self.vae.config.timestep_conditioning else None
        return self.vae.decode(z, temb, return_dict=False)[0]

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x).latent_dist.mode()  # the LTX pipelines' _normalize_latents
        mean, std = self.latent_stats(z)
        return (z - mean) * self.vae.config.scaling_factor / std


LTX_ID = "Lightricks/LTX-Video"


def build_ltx(dit: str | None = None, vae: str | None = None, text_encoder: str | None = None,
              size: str | None = None, frames: int | None = None, **_) -> LTXVideo:
    """LTX-Video 0.9.x with LTXPipeline's defaults: 161 frames at 480x704 (its example), 50 steps, guidance 3,
    negative prompt "", 128 text tokens, frame rate 25."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    parts = locate(LTX_ID, dit, vae, text_encoder)
    tc, sc = read_json(parts["transformer"], "config.json"), read_json(parts["scheduler"], "scheduler_config.json")
    if tc.get("patch_size", 1) != 1 or tc.get("patch_size_t", 1) != 1:
        raise UserError("ltx: transformers with patches larger than one latent pixel are not supported (LTX-Video "
                        "0.9.x has patch 1)")
    if sc["_class_name"] != "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"ltx: scheduler {sc['_class_name']} is not LTXPipeline's FlowMatchEulerDiscreteScheduler")
    vae_net = load_model(AutoencoderKLLTXVideo, parts["vae"])
    height, width, frames = check_video("ltx", size, (480, 704), vae_net.spatial_compression_ratio, frames, 161,
                                        vae_net.temporal_compression_ratio)
    return LTXVideo(load_model(LTXVideoTransformer3DModel, parts["transformer"]), vae_net,
                    load(T5EncoderModel, parts["text_encoder"]).eval(), load(AutoTokenizer, parts["tokenizer"]),
                    load(FlowMatchEulerDiscreteScheduler, parts["scheduler"]), height, width, frames, fps=25,
                    sample_steps=50, cfg=3.0, max_length=128)
