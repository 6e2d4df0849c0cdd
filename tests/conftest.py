import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_DIT = dict(in_channels=4, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=2, caption_channels=16,
                 model_max_length=12, enable_flash_attn=True, enable_layernorm_kernel=True)
SMALL_VAE = dict(micro_frame_size=17, micro_batch_size=4,
                 spatial_config=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                     norm_num_groups=8, block_out_channels=[8, 8],
                                     down_block_types=["DownEncoderBlock2D"] * 2,
                                     up_block_types=["UpDecoderBlock2D"] * 2),
                 temporal_config=dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=8, num_res_blocks=1,
                                      channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                                      num_groups=4))


def save_small_opensora(root):
    """Folders laid out as the published Open-Sora checkpoints, holding small random models."""
    import json

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    import opensora as osr

    torch.manual_seed(0)
    paths = {k: os.path.join(root, k) for k in ("dit", "vae", "t5")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    dit = osr.STDiT3(**SMALL_DIT)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, os.path.join(paths["dit"], "model.safetensors"))
    json.dump({**SMALL_DIT, "architectures": ["STDiT3"], "model_type": "STDiT3"},
              open(os.path.join(paths["dit"], "config.json"), "w"))
    vae = osr.OpenSoraVAE(**SMALL_VAE)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(paths["vae"], "model.safetensors"))
    json.dump({**SMALL_VAE, "architectures": ["VideoAutoencoderPipeline"]}, open(os.path.join(paths["vae"], "config.json"), "w"))
    words = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "dog", "runs", "aesthetic", "score:", "6.5."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=12).save_pretrained(paths["t5"])
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                            feed_forward_proj="gated-gelu")).save_pretrained(paths["t5"])
    return paths


@pytest.fixture(scope="session")
def small_opensora(tmp_path_factory):
    return save_small_opensora(str(tmp_path_factory.mktemp("opensora")))
