"""The Open-Sora v1.2 port: published key sets, frame arithmetic, the timestep transform, checkpointing."""
import math

import pytest
import torch

import opensora as osr
from conftest import SMALL_DIT, SMALL_VAE


def expected_stdit3_xl_keys() -> dict:
    """STDiT3-XL/2 as published (hpcai-tech/OpenSora-STDiT-v3), written down from the architecture:
    depth 28, hidden 1152, 16 heads of 72, patch (1,2,2), 4 -> 8 channels (pred_sigma), T5 4096 x 300."""
    C, F = 1152, 4608
    keys = {
        "x_embedder.proj.weight": (C, 4, 1, 2, 2), "x_embedder.proj.bias": (C,),
        "t_block.1.weight": (6 * C, C), "t_block.1.bias": (6 * C,),
        "y_embedder.y_proj.fc1.weight": (C, 4096), "y_embedder.y_proj.fc1.bias": (C,),
        "y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,),
        "y_embedder.y_embedding": (300, 4096), "rope.freqs": (36,),
        "final_layer.scale_shift_table": (2, C), "final_layer.linear.weight": (32, C), "final_layer.linear.bias": (32,),
    }
    for emb in ("t_embedder", "fps_embedder"):
        keys.update({f"{emb}.mlp.0.weight": (C, 256), f"{emb}.mlp.0.bias": (C,),
                     f"{emb}.mlp.2.weight": (C, C), f"{emb}.mlp.2.bias": (C,)})
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(28):
            b = f"{kind}.{i}."
            keys.update({b + "scale_shift_table": (6, C), b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                         b + "attn.q_norm.weight": (72,), b + "attn.k_norm.weight": (72,),
                         b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                         b + "cross_attn.q_linear.weight": (C, C), b + "cross_attn.q_linear.bias": (C,),
                         b + "cross_attn.kv_linear.weight": (2 * C, C), b + "cross_attn.kv_linear.bias": (2 * C,),
                         b + "cross_attn.proj.weight": (C, C), b + "cross_attn.proj.bias": (C,),
                         b + "mlp.fc1.weight": (F, C), b + "mlp.fc1.bias": (F,),
                         b + "mlp.fc2.weight": (C, F), b + "mlp.fc2.bias": (C,)})
    return keys


def expected_temporal_vae_keys() -> dict:
    """VAE_Temporal_SD: filters 128, multipliers (1,2,2,4), 4 res blocks, time downsampling in stages 2 and 3."""
    keys = {}

    def res(prefix, cin, cout):
        keys.update({prefix + "norm1.weight": (cin,), prefix + "norm1.bias": (cin,),
                     prefix + "conv1.conv.weight": (cout, cin, 3, 3, 3), prefix + "norm2.weight": (cout,),
                     prefix + "norm2.bias": (cout,), prefix + "conv2.conv.weight": (cout, cout, 3, 3, 3)})
        if cin != cout:
            keys[prefix + "conv3.conv.weight"] = (cout, cin, 1, 1, 1)

    e, d = "temporal_vae.encoder.", "temporal_vae.decoder."
    keys[e + "conv_in.conv.weight"] = (128, 4, 3, 3, 3)
    prev = 128
    for i, f in enumerate((128, 256, 256, 512)):
        for j in range(4):
            res(f"{e}block_res_blocks.{i}.{j}.", prev if j == 0 else f, f)
        prev = f
    for i, f in ((1, 256), (2, 256)):
        keys.update({f"{e}conv_blocks.{i}.conv.weight": (f, f, 3, 3, 3), f"{e}conv_blocks.{i}.conv.bias": (f,)})
    for j in range(4):
        res(f"{e}res_blocks.{j}.", 512, 512)
    keys.update({e + "norm1.weight": (512,), e + "norm1.bias": (512,), e + "conv2.conv.weight": (8, 512, 1, 1, 1),
                 e + "conv2.conv.bias": (8,),
                 "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1), "temporal_vae.quant_conv.conv.bias": (8,),
                 "temporal_vae.post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
                 "temporal_vae.post_quant_conv.conv.bias": (4,),
                 d + "conv1.conv.weight": (512, 4, 3, 3, 3), d + "conv1.conv.bias": (512,)})
    for j in range(4):
        res(f"{d}res_blocks.{j}.", 512, 512)
    prev = 512
    for i, f in reversed(list(enumerate((128, 256, 256, 512)))):
        for j in range(4):
            res(f"{d}block_res_blocks.{i}.{j}.", prev if j == 0 else f, f)
        prev = f
    keys.update({f"{d}conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3), f"{d}conv_blocks.2.conv.bias": (1024,),
                 f"{d}conv_blocks.1.conv.weight": (512, 256, 3, 3, 3), f"{d}conv_blocks.1.conv.bias": (512,),
                 d + "norm1.weight": (128,), d + "norm1.bias": (128,),
                 d + "conv_out.conv.weight": (4, 128, 3, 3, 3), d + "conv_out.conv.bias": (4,),
                 "scale": (1, 4, 1, 1, 1), "shift": (1, 4, 1, 1, 1)})
    return keys


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_stdit3_has_the_published_keys():
    published_config = dict(caption_channels=4096, class_dropout_prob=0.1, depth=28, drop_path=0.0,
                            enable_flash_attn=True, enable_layernorm_kernel=True, enable_sequence_parallelism=False,
                            freeze_y_embedder=False, hidden_size=1152, in_channels=4, input_size=[None, None, None],
                            input_sq_size=512, mlp_ratio=4.0, model_max_length=300, num_heads=16,
                            only_train_temporal=False, patch_size=[1, 2, 2], pred_sigma=True, qk_norm=True,
                            skip_y_embedder=False, architectures=["STDiT3"], model_type="STDiT3")
    with torch.device("meta"):
        dit = osr.STDiT3(**published_config)
    assert shapes(dit) == expected_stdit3_xl_keys()


def test_full_size_vae_has_the_published_keys():
    from diffusers.models import AutoencoderKL

    with torch.device("meta"):
        vae = osr.OpenSoraVAE()
        sdxl = AutoencoderKL(**osr.SDXL_VAE_CONFIG)
    got = shapes(vae)
    spatial = {k: v for k, v in got.items() if k.startswith("spatial_vae.module.")}
    assert spatial == {"spatial_vae.module." + k: tuple(v.shape) for k, v in sdxl.state_dict().items()}
    assert {k: v for k, v in got.items() if k not in spatial} == expected_temporal_vae_keys()


def test_timestep_transform_240p_51_frames():
    # ratio = sqrt(240*426 / 512^2) * sqrt(51 // 17 * 5)
    ratio = math.sqrt(240 * 426 / 512**2) * math.sqrt(15)
    for t in (1000.0, 500.0, 100.0):
        u = t / 1000
        want = ratio * u / (1 + (ratio - 1) * u) * 1000
        assert osr.timestep_transform(torch.tensor(t), 240, 426, 51).item() == pytest.approx(want, rel=1e-6)
    steps = osr.sampling_timesteps(30, lambda t: osr.timestep_transform(t, 240, 426, 51))
    assert steps[0] == pytest.approx(1000.0) and all(a > b for a, b in zip(steps, steps[1:]))
    assert steps[15] == pytest.approx(ratio * 0.5 / (1 + (ratio - 1) * 0.5) * 1000, rel=1e-6)


def test_vae_frames_51_to_15_to_51():
    torch.manual_seed(0)
    vae = osr.OpenSoraVAE(**SMALL_VAE).eval()
    assert vae.latent_frames(51) == 15
    assert [vae.latent_frames(f) for f in (17, 34, 68, 20, 1)] == [5, 10, 20, 6, 1]
    x = torch.rand(1, 3, 51, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, 4, 15, 8, 8)
        assert vae.decode(z, num_frames=51).shape == (1, 3, 51, 16, 16)
        assert vae.decode(vae.encode(x[:, :, :20]), num_frames=20).shape[2] == 20


def small_inputs(B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 3, 6, 10, generator=g)
    y = torch.randn(B, 1, 12, 16, generator=g)
    mask = torch.zeros(B, 12, dtype=torch.long)
    mask[0, :12], mask[1, :5] = 1, 1
    kw = dict(fps=torch.full((B,), 24.0), height=torch.full((B,), 48.0), width=torch.full((B,), 80.0))
    return x, torch.tensor([100.0, 900.0][:B]), y, mask, kw


def test_stdit3_output_shape_and_text_mask_respected():
    torch.manual_seed(0)
    dit = osr.STDiT3(**SMALL_DIT).eval()
    for p in dit.parameters():  # the published init zeroes temporal outputs; randomise to make this a real test
        torch.nn.init.normal_(p, std=0.1)
    x, t, y, mask, kw = small_inputs()
    out = dit(x, t, y, mask=mask, **kw)
    assert out.shape == (2, 8, 3, 6, 10) and out.dtype == torch.float32
    y2 = y.clone()
    y2[1, :, 5:] += 10.0  # padding tokens of sample 1 must not matter
    assert torch.allclose(dit(x, t, y2, mask=mask, **kw), out, atol=1e-5)
    y2[1, :, :5] += 1.0  # its valid tokens must
    assert not torch.allclose(dit(x, t, y2, mask=mask, **kw)[1], out[1], atol=1e-3)


def test_gradients_equal_with_and_without_checkpointing():
    torch.manual_seed(0)
    dit = osr.STDiT3(**SMALL_DIT)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y, mask, kw = small_inputs()
    grads = []
    for on in (False, True):
        dit.zero_grad()
        dit.grad_checkpointing = on
        dit(x, t, y, mask=mask, **kw).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in dit.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_train_mode_never_drops_captions():
    torch.manual_seed(0)
    dit = osr.STDiT3(**SMALL_DIT).train()  # Open-Sora would drop captions at random here
    x, t, y, mask, kw = small_inputs()
    assert torch.equal(dit(x, t, y, mask=mask, **kw), dit(x, t, y, mask=mask, **kw))
