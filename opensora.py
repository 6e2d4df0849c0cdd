"""Open-Sora v1.2 in plain torch: the STDiT3 denoiser, its video VAE and rectified flow.

Written from the architecture of hpcaitech/Open-Sora v1.2.0 so that the published checkpoints
(`hpcai-tech/OpenSora-STDiT-v3`, `hpcai-tech/OpenSora-VAE-v1.2`) load key-for-key, without the `opensora`
package and its colossalai / xformers / apex dependencies. The spatial VAE is diffusers' AutoencoderKL.
Module names mirror the checkpoint's keys; comments say where we deliberately differ.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------------------
# Resolutions, named as Open-Sora names them: (height, width) per resolution and aspect-ratio name.
# Open-Sora's "9:16" is the key 0.56 = height/width, i.e. a landscape 240x426 frame at 240p.

_AR_KEYS = ["3:8", "9:21", "12:25", "1:2", "9:17", "27:50", "9:16", "5:8", "2:3", "3:4", "1:1", "4:3", "3:2",
            "16:9", "17:9", "2:1", "50:27"]
_SIZES = {
    "240p": [(196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426), (252, 404),
             (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240), (440, 232), (452, 226),
             (462, 222)],
    "360p": [(294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640), (380, 608),
             (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360), (660, 350), (678, 340),
             (692, 332)],
    "480p": [(392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854), (506, 810),
             (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480), (880, 466), (906, 454),
             (924, 444)],
    "720p": [(588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306), (720, 1280),
             (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832), (1176, 784), (1280, 720),
             (1320, 698), (1358, 680), (1386, 666)],
}
RESOLUTIONS = {res: dict(zip(_AR_KEYS, sizes)) for res, sizes in _SIZES.items()}


def image_size(resolution: str, aspect: str) -> tuple[int, int]:
    """(height, width) in pixels for an Open-Sora resolution name ("240p") and aspect name ("9:16")."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    if aspect not in RESOLUTIONS[resolution]:
        raise ValueError(f"unknown aspect ratio {aspect!r}; choose one of {', '.join(_AR_KEYS)}")
    return RESOLUTIONS[resolution][aspect]


# ----------------------------------------------------------------------------------------------------------
# STDiT3 building blocks


class RMSNorm(nn.Module):
    """Llama/T5 RMSNorm used as q/k norm over the head dim, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT timestep features, cos half first then sin half, fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear; also used for fps (Open-Sora's SizeEmbedder)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t, dtype):
        return self.mlp(sinusoid(t, self.freq_dim).to(dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the hidden size; y_embedding is the learned null caption used for CFG."""

    def __init__(self, in_channels: int, hidden: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden, hidden)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, y):
        # Open-Sora drops captions at random whenever model.training is true; never here, so the DPO loss never
        # sees a random null caption (the null caption enters only as classifier-free guidance's, model.py).
        return self.y_proj(y)


class PositionEmbedding2D(nn.Module):
    """2D sincos spatial embedding, rescaled to the base size so resolutions share positions."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half)),
                             persistent=False)

    def _sincos(self, pos):
        out = pos[:, None] * self.inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # sin first (unlike the timestep one)

    def forward(self, h: int, w: int, scale: float, base_size: int, dtype, device) -> torch.Tensor:
        gh = torch.arange(h, device=device) / scale * (base_size / h)
        gw = torch.arange(w, device=device) / scale * (base_size / w)
        # token order is row-major (h, w); the FIRST half of the channels encodes the w coordinate
        ww = gw[None, :].expand(h, w).reshape(-1)
        hh = gh[:, None].expand(h, w).reshape(-1)
        return torch.cat([self._sincos(ww), self._sincos(hh)], dim=-1)[None].to(dtype)


class RotaryEmbedding(nn.Module):
    """Temporal RoPE as rotary_embedding_torch 0.5.3 computes it: theta 10000, interleaved (GPT-J) pairs."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, x):  # x (..., T, head_dim), rotated along T
        T = x.shape[-2]
        angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * self.freqs.float()[None]
        angles = angles.repeat_interleave(2, dim=-1)
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
        return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = [rope]  # a list so the shared rope module is not registered (and saved) once per block

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope[0] is not None:  # RoPE after qk-norm (Open-Sora's non-legacy order)
            q, k = self.rope[0](q), self.rope[0](k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Video tokens attend to their own sample's valid text tokens (Open-Sora: xformers block-diagonal)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask):  # x (B, N, C), y (B, L, C), mask (B, L) bool
        B, N, C = x.shape
        hd = C // self.heads
        q = self.q_linear(x).view(B, N, self.heads, hd).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class STDiT3Block(nn.Module):
    """adaLN-single block: self-attention (over space or over time), cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool,
                 rope: RotaryEmbedding | None):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads, qk_norm, rope if temporal else None)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, y_mask, t_mlp, T: int, S: int):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(B, 6, C)).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # attend over the T frames at each spatial position
            h = h.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            h = self.attn(h).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        else:  # attend over the S positions within each frame
            h = self.attn(h.reshape(B * T, S, C)).view(B, N, C)
        x = x + gate_msa * h
        x = x + self.cross_attn(x, y, y_mask)  # no norm, no gate: as in Open-Sora
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t):  # modulated by the raw t embedding, not t_mlp
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))  # pad at the end, as Open-Sora
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T*H*W, C)


class STDiT3(nn.Module):
    """Open-Sora v1.2's spatial-temporal DiT. Takes the keyword arguments of the published config.json."""

    def __init__(self, in_channels: int = 4, patch_size=(1, 2, 2), hidden_size: int = 1152, depth: int = 28,
                 num_heads: int = 16, mlp_ratio: float = 4.0, pred_sigma: bool = True, caption_channels: int = 4096,
                 model_max_length: int = 300, input_sq_size: int = 512, qk_norm: bool = True,
                 class_dropout_prob: float = 0.1, **ignored):
        # ignored: keys of the published config that do not change the math (enable_flash_attn,
        # enable_layernorm_kernel, enable_sequence_parallelism, drop_path, architectures, model_type, ...).
        # class_dropout_prob changes nothing either (no caption dropout, CaptionEmbedder) but stays in self.config,
        # so a saved config.json reads as the published one.
        super().__init__()
        self.config = dict(in_channels=in_channels, patch_size=list(patch_size), hidden_size=hidden_size,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, pred_sigma=pred_sigma,
                           caption_channels=caption_channels, model_max_length=model_max_length,
                           input_sq_size=input_sq_size, qk_norm=qk_norm, class_dropout_prob=class_dropout_prob)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.patch_size = tuple(patch_size)
        self.input_sq_size = input_sq_size
        self.grad_checkpointing = False

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, False, None) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, True, self.rope) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Open-Sora's init: xavier linears, zero fps output and zero temporal-block outputs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def forward(self, x, timestep, y, mask=None, fps=None, height=None, width=None):
        """x (B, C, T, H, W) latents; timestep (B,) on 0..1000; y (B, 1, L, caption_channels) T5 features;
        mask (B, L) text mask (None = all tokens valid); fps, height, width (B,) in frames/s and pixels.
        Returns (B, out_channels, T, H, W) float32; the velocity is the first in_channels channels."""
        dtype = self.x_embedder.proj.weight.dtype
        B, _, Tx, Hx, Wx = x.shape
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        pt, ph, pw = self.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
        S = H * W

        # spatial position embedding: base size from the token grid, scale from the first sample's pixels
        scale = float((height[0] * width[0]) ** 0.5) / self.input_sq_size
        pos = self.pos_embed(H, W, scale, round(S**0.5), dtype, x.device)

        t = self.t_embedder(timestep, dtype) + self.fps_embedder(fps.to(dtype), dtype)
        t_mlp = self.t_block(t)

        if mask is None:
            mask = torch.ones(y.shape[0], y.shape[2], dtype=torch.bool, device=x.device)
        if mask.shape[0] != y.shape[0]:  # Open-Sora reuses the prompts' mask for their null captions
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        y = self.y_embedder(y).squeeze(1)
        mask = mask.bool()

        x = self.x_embedder(x).view(B, T, S, -1) + pos
        x = x.flatten(1, 2)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = self._run(spatial, x, y, mask, t_mlp, T, S)
            x = self._run(temporal, x, y, mask, t_mlp, T, S)
        x = self.final_layer(x, t)

        # unpatchify: (B, T*H*W, pt*ph*pw*C) -> (B, C, T*pt, H*ph, W*pw), then crop the padding
        x = x.view(B, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H * ph, W * pw)
        if (T * pt, H * ph, W * pw) != (Tx, Hx, Wx):  # crop only when padded: FSDP2 warns about returned views
            x = x[:, :, :Tx, :Hx, :Wx]
        return x.float()

    def _run(self, block, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ----------------------------------------------------------------------------------------------------------
# The VAE: SDXL's 2D VAE per frame, then a causal 3D VAE that compresses time 4x (17 frames -> 5 latents)

SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                       block_out_channels=[128, 256, 512, 512], act_fn="silu", sample_size=1024,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TEMPORAL_VAE_CONFIG = dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                           channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                           num_groups=32)
SPATIAL_SCALE = 0.18215  # hard-coded in Open-Sora (not the SDXL VAE's own 0.13025)


class CausalConv3d(nn.Module):
    """Conv3d padded with zeros only at the front in time (causal), symmetric in space."""

    def __init__(self, cin: int, cout: int, kernel=3, stride=(1, 1, 1), bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt - stride[0], 0)
        self.conv = nn.Conv3d(cin, cout, (kt, kh, kw), stride=stride, bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class ResBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class TemporalEncoder(nn.Module):
    def __init__(self, c_in, c_out, filters, num_res_blocks, channel_multipliers, temporal_downsample, groups):
        super().__init__()
        self.conv_in = CausalConv3d(c_in, filters, 3, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        prev = filters
        for i, mult in enumerate(channel_multipliers):
            f = filters * mult
            self.block_res_blocks.append(nn.ModuleList(ResBlock3D(prev if j == 0 else f, f, groups)
                                                       for j in range(num_res_blocks)))
            prev = f
            if i < len(channel_multipliers) - 1:  # stride-2 causal conv in time, or nothing
                self.conv_blocks.append(CausalConv3d(f, f, 3, stride=(2, 1, 1)) if temporal_downsample[i]
                                        else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock3D(prev, prev, groups) for _ in range(num_res_blocks))
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv2 = CausalConv3d(prev, c_out, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, c_in, c_out, filters, num_res_blocks, channel_multipliers, temporal_downsample, groups):
        super().__init__()
        self.temporal_downsample = temporal_downsample
        prev = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(c_in, prev, 3)
        self.res_blocks = nn.ModuleList(ResBlock3D(prev, prev, groups) for _ in range(num_res_blocks))
        blocks, convs = [], []
        for i in reversed(range(len(channel_multipliers))):
            f = filters * channel_multipliers[i]
            blocks.insert(0, nn.ModuleList(ResBlock3D(prev if j == 0 else f, f, groups)
                                           for j in range(num_res_blocks)))
            prev = f
            if i > 0:  # conv to 2x channels, then depth-to-time doubles the frames
                convs.insert(0, CausalConv3d(f, f * 2, 3) if temporal_downsample[i - 1] else nn.Identity())
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(blocks), nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv_out = CausalConv3d(prev, c_out, 3)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_downsample[i - 1]:  # "B (C 2) T H W -> B C (T 2) H W"
                    B, C2, T, H, W = x.shape
                    x = x.view(B, C2 // 2, 2, T, H, W).permute(0, 1, 3, 2, 4, 5).reshape(B, C2 // 2, T * 2, H, W)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """Open-Sora's VAE_Temporal_SD: 4 SDXL latent channels in and out, time compressed by 4."""

    def __init__(self, in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                 channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True), num_groups=32):
        super().__init__()
        self.time_factor = 2 ** sum(temporal_downsample)
        args = (filters, num_res_blocks, channel_multipliers, temporal_downsample, num_groups)
        self.encoder = TemporalEncoder(in_out_channels, latent_embed_dim * 2, *args)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(latent_embed_dim, in_out_channels, *args)

    def front_pad(self, frames: int) -> int:
        return -frames % self.time_factor

    def latent_frames(self, frames: int) -> int:
        return (frames + self.front_pad(frames)) // self.time_factor

    def frame_spans(self, frames: int) -> list[tuple[int, int]]:
        """The pixel frames each latent frame encodes: the front padding makes latent frame 0 the first frame
        alone (17 frames -> 1 + 4 + 4 + 4 + 4), then time_factor frames each."""
        pad = self.front_pad(frames)
        return [(max(0, k * self.time_factor - pad), (k + 1) * self.time_factor - pad)
                for k in range(self.latent_frames(frames))]

    def encode(self, x):
        """The mean of the diagonal Gaussian posterior (its log-variance, the other half, is not needed)."""
        x = F.pad(x, (0, 0, 0, 0, self.front_pad(x.shape[2]), 0))
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z, num_frames: int):
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.front_pad(num_frames):]


class SpatialVAE(nn.Module):
    """Holds the diffusers AutoencoderKL as `.module` so the keys read spatial_vae.module.* as published."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.models import AutoencoderKL  # here: `python train.py --help` need not import diffusers

        self.module = AutoencoderKL(**config)


class OpenSoraVAE(nn.Module):
    """The v1.2 VideoAutoencoderPipeline: pixels (B, 3, T, H, W) in [-1, 1] <-> latents (B, 4, T', H/8, W/8)."""

    def __init__(self, micro_frame_size: int = 17, micro_batch_size: int = 4,
                 shift=(-0.10, 0.34, 0.27, 0.98), scale=(3.85, 2.32, 2.33, 3.06),
                 spatial_config: dict | None = None, temporal_config: dict | None = None, **ignored):
        super().__init__()
        self.spatial_vae = SpatialVAE(spatial_config or SDXL_VAE_CONFIG)
        self.temporal_vae = TemporalVAE(**(temporal_config or TEMPORAL_VAE_CONFIG))
        self.micro_frame_size = micro_frame_size
        self.micro_batch_size = micro_batch_size
        self.micro_z_frames = self.temporal_vae.latent_frames(micro_frame_size)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32)[None, :, None, None, None])
        self.spatial_factor = 2 ** (len(self.spatial_vae.module.config.block_out_channels) - 1)

    def latent_frames(self, frames: int) -> int:
        """Frames are cut into 17-frame chunks, each encoded on its own (51 -> 3 x 5 = 15)."""
        full, rest = divmod(frames, self.micro_frame_size)
        return full * self.micro_z_frames + (self.temporal_vae.latent_frames(rest) if rest else 0)

    def frame_spans(self, frames: int) -> list[tuple[int, int]]:
        """The pixel frames each latent frame encodes: every 17-frame chunk on its own (51 -> 3 x [1, 4, 4, 4, 4])."""
        return [(start + lo, start + hi) for start in range(0, frames, self.micro_frame_size)
                for lo, hi in self.temporal_vae.frame_spans(min(self.micro_frame_size, frames - start))]

    def _per_frame(self, fn, x):  # apply a 2D function to every frame, micro_batch_size frames at a time
        B = x.shape[0]
        x = x.transpose(1, 2).flatten(0, 1)
        x = torch.cat([fn(chunk) for chunk in x.split(self.micro_batch_size)])
        return x.unflatten(0, (B, -1)).transpose(1, 2)

    def encode(self, x):
        """Pixels -> normalised latents: the posterior means of both VAEs, so encoding is deterministic (Open-Sora
        samples both posteriors)."""
        ae = self.spatial_vae.module
        x = self._per_frame(lambda f: ae.encode(f).latent_dist.mean * SPATIAL_SCALE, x)
        zs = [self.temporal_vae.encode(chunk) for chunk in x.split(self.micro_frame_size, dim=2)]
        return (torch.cat(zs, dim=2) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def decode(self, z, num_frames: int):
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        chunks = []
        for i, chunk in enumerate(z.split(self.micro_z_frames, dim=2)):
            frames = min(self.micro_frame_size, num_frames - i * self.micro_frame_size)
            chunks.append(self.temporal_vae.decode(chunk, num_frames=frames))
        ae = self.spatial_vae.module
        return self._per_frame(lambda f: ae.decode(f / SPATIAL_SCALE).sample, torch.cat(chunks, dim=2))


# ----------------------------------------------------------------------------------------------------------
# Rectified flow (Open-Sora's RFLOW): t on 0..1000, t=1000 is pure noise, the model predicts x0 - noise.

NUM_TIMESTEPS = 1000


def timestep_transform(t: torch.Tensor, height, width, num_frames: int) -> torch.Tensor:
    """Shift timesteps towards noise for larger videos: ratio = sqrt(HW / 512^2) * sqrt(latent frames),
    t' = ratio t / (1 + (ratio - 1) t) on the unit interval. num_frames are pixel frames (51 -> 15)."""
    t = t / NUM_TIMESTEPS
    frames = 1 if num_frames == 1 else num_frames // 17 * 5
    ratio = math.sqrt(height * width / 512**2) * math.sqrt(frames)
    return ratio * t / (1 + (ratio - 1) * t) * NUM_TIMESTEPS


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t/1000) x0 + (t/1000) noise."""
    s = (t.float() / NUM_TIMESTEPS).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x0 - noise


def training_timesteps(n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Logit-normal t = sigmoid(N(0, 1)) * 1000, as Open-Sora v1.2 trains (before the transform)."""
    return torch.sigmoid(torch.randn(n, generator=generator)).to(device) * NUM_TIMESTEPS


def sampling_timesteps(steps: int, transform=None) -> list[float]:
    """t_i = (1 - i/steps) * 1000, i < steps, each optionally transformed."""
    ts = [(1.0 - i / steps) * NUM_TIMESTEPS for i in range(steps)]
    return [float(transform(torch.tensor(t))) if transform else t for t in ts]


@torch.no_grad()
def euler_cfg_sample(velocity, z: torch.Tensor, timesteps: list[float], cfg: float, end: float = 0.0) -> torch.Tensor:
    """Open-Sora's Euler sampler. velocity(z_in, t_in) takes both CFG halves in one batch [cond; uncond]
    and returns their velocities; the last step goes all the way to t = end (0: a clean sample)."""
    for i, t in enumerate(timesteps):
        t_in = torch.full((2 * z.shape[0],), t, device=z.device)
        cond, uncond = velocity(torch.cat([z, z]), t_in).chunk(2)
        v = uncond + cfg * (cond - uncond)
        dt = (t - (timesteps[i + 1] if i + 1 < len(timesteps) else end)) / NUM_TIMESTEPS
        z = z + v * dt
    return z
