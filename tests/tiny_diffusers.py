"""Tiny random CogVideoX and Wan2.1 pipelines in the published layouts, saved by diffusers itself: the fixtures of
the tests (conftest.diffusers_folders) and the default models of pipeline_bench.py. Nothing is downloaded."""
import torch

from inputs import UserError


def byte_tokenizer():
    """A T5-like tokenizer with no files: one token per UTF-8 byte (byte-level BPE without merges), </s> appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_tiny(name: str, folder: str, rope: bool = False, seed: int = 0) -> str:
    """A complete `name` pipeline of small random components (the same on every machine), written by the diffusers
    pipeline's own save_pretrained; `--dit folder` loads it. rope: a CogVideoX-5b-like transformer with RoPE."""
    import diffusers
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = byte_tokenizer()
    text = dict(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "cogvideox":
            pipe = diffusers.CogVideoXPipeline(
                tokenizer=tok, text_encoder=T5EncoderModel(T5Config(**text)),
                vae=diffusers.AutoencoderKLCogVideoX(
                    block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                    down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4),
                transformer=diffusers.CogVideoXTransformer3DModel(
                    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                    text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                    max_text_seq_length=16, use_rotary_positional_embeddings=rope),
                scheduler=diffusers.CogVideoXDDIMScheduler(  # the published CogVideoX-2b scheduler settings
                    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                    snr_shift_scale=3.0, timestep_spacing="trailing"))
        elif name == "wan":
            pipe = diffusers.WanPipeline(
                tokenizer=tok, text_encoder=UMT5EncoderModel(UMT5Config(**text)),
                vae=diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                               temperal_downsample=[False, True, True]),
                transformer=diffusers.WanTransformer3DModel(
                    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
                scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=3.0))
        elif name in ("wan2.2-5b", "wan2.2-14b"):
            pipe = tiny_wan22(name, tok, UMT5EncoderModel(UMT5Config(**text)))
        elif name == "ltx":
            pipe = diffusers.LTXPipeline(
                tokenizer=tok, text_encoder=T5EncoderModel(T5Config(**text)),
                vae=diffusers.AutoencoderKLLTXVideo(
                    latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                    spatio_temporal_scaling=(True, True, False, False),
                    decoder_spatio_temporal_scaling=(True, True, False, False),
                    decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
                    timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                    decoder_causal=False),
                transformer=diffusers.LTXVideoTransformer3DModel(
                    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(  # LTX-Video 0.9's published settings
                    use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                    max_image_seq_len=4096, shift_terminal=0.1))
        else:
            raise UserError(f"no tiny {name!r}; choose one of cogvideox, wan, wan2.2-5b, wan2.2-14b, ltx")
    pipe.save_pretrained(folder)
    return folder


def tiny_wan22(name: str, tok, text_encoder):
    """wan2.2-5b: the Wan2.2 VAE (residual, patchified by 2, 16x spatial) under a transformer on its 12 latent
    channels, WanPipeline with expand_timesteps; wan2.2-14b: two transformer experts on the Wan2.1 VAE, boundary 0.875
    (the A14B's), so 3 steps of flow_shift 3 run the first on the high-noise expert and the others on the low."""
    import diffusers

    transformer = lambda channels: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    if name == "wan2.2-5b":
        z = 12
        g = torch.Generator().manual_seed(1)  # per-channel statistics that are not the identity
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=torch.randn(z, generator=g).tolist(), latents_std=(torch.rand(z, generator=g) + 0.5).tolist())
        return diffusers.WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer(z),
                                     scheduler=scheduler, expand_timesteps=True)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    return diffusers.WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer(16),
                                 transformer_2=transformer(16), scheduler=scheduler, boundary_ratio=0.875)
