"""PickScore, HPSv2 and ImageReward per frame, through their real loading paths on tiny random weights saved in
each release's own layout (a transformers CLIPModel folder; OpenCLIP's {'state_dict': ...}; ImageReward.pt with
med_config.json), loaded back and checked against the same weights scored directly."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import image_rewards
import reward
from model import UserError

PROMPT = "a red ball rolls to the left"


def save_clip_tokenizer(folder) -> int:
    """CLIP's tokenizer files for a byte-level vocabulary without merges (every character a token)."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's byte-to-unicode table, as CLIP's
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    os.makedirs(folder, exist_ok=True)
    json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n")
    return len(vocab)


def tiny_clip(vocab: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(projection_dim=16, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=224, patch_size=32,
                                                           hidden_act="gelu", layer_norm_eps=1e-5),
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu",
                                      layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1))
    net = CLIPModel(cfg).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    return net


def frames(n: int = 3, h: int = 48, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 4, 5, generator=g) * 255
    return F.interpolate(x, size=(h, w), mode="bilinear").permute(0, 2, 3, 1).round().to(torch.uint8)


def test_preprocessing_sizes_crop_and_pad():
    f = frames(2, 240, 320)
    assert image_rewards.clip_pixels(f).shape == (2, 3, 224, 224)
    x = image_rewards.hps_pixels(f)  # long side to 224, then 28 black rows above and below
    assert x.shape == (2, 3, 224, 224)
    black = (-torch.tensor(image_rewards.CLIP_MEAN) / torch.tensor(image_rewards.CLIP_STD)).view(1, 3, 1, 1)
    assert torch.allclose(x[:, :, :28], black.expand(2, 3, 28, 224)) and not torch.allclose(x[:, :, 28:30], black)
    assert torch.allclose(x[:, :, -28:], black.expand(2, 3, 28, 224))


def test_pickscore_is_the_frame_mean_of_the_scaled_cosine(tmp_path):
    vocab = save_clip_tokenizer(tmp_path / "processor")
    net = tiny_clip(vocab)
    net.save_pretrained(tmp_path / "PickScore_v1")  # safetensors, as the release
    ps = reward.build_reward("pickscore", path=str(tmp_path / "PickScore_v1"), processor=str(tmp_path / "processor"))
    f = frames()
    with torch.no_grad():
        ids = ps.tokenizer([PROMPT], return_tensors="pt").input_ids
        t = F.normalize(net.get_text_features(input_ids=ids).pooler_output, dim=-1)
        i = F.normalize(net.get_image_features(pixel_values=image_rewards.clip_pixels(f)).pooler_output, dim=-1)
        direct = (net.logit_scale.exp() * (i @ t.T)[:, 0]).mean()
    assert ps.score(f[None], [PROMPT])["pickscore"].item() == pytest.approx(direct.item(), abs=1e-5)
    x = f[None].float().requires_grad_()
    ps.score_float(x, [PROMPT])["pickscore"].sum().backward()  # ReFL: gradients reach the pixels
    assert x.grad.abs().sum() > 0


def openclip_state(net, arch) -> dict:
    """A transformers CLIPModel's weights in OpenCLIP's layout (what HPSv2's checkpoints hold)."""
    sd, out = net.state_dict(), {}
    out.update({"logit_scale": sd["logit_scale"], "visual.proj": sd["visual_projection.weight"].T,
                "text_projection": sd["text_projection.weight"].T,
                "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
                "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
                "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
                "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
                "positional_embedding": sd["text_model.embeddings.position_embedding.weight"]})
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        out.update({f"{a}.{p}": sd[f"{b}.{p}"] for p in ("weight", "bias")})
    for src, tower, n in (("visual.transformer", "vision_model", arch["vision_cfg"]["layers"]),
                          ("transformer", "text_model", arch["text_cfg"]["layers"])):
        for i in range(n):
            a, b = f"{src}.resblocks.{i}", f"{tower}.encoder.layers.{i}"
            for p in ("weight", "bias"):
                out[f"{a}.attn.in_proj_{p}"] = torch.cat([sd[f"{b}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                for old, new in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{a}.{old}.{p}"] = sd[f"{b}.{new}.{p}"]
    return out


def test_hpsv2_loads_openclip_checkpoints_and_scores_the_plain_cosine(tmp_path):
    vocab = save_clip_tokenizer(tmp_path / "tok")
    net = tiny_clip(vocab)
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
                                            "patch_size": 32, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 77, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 2,
                         "mlp_ratio": 2.0}}
    torch.save({"state_dict": openclip_state(net, arch)}, tmp_path / "HPS_v2.1_compressed.pt")
    hps = reward.build_reward("hpsv2", path=str(tmp_path), tokenizer=str(tmp_path / "tok"), arch=arch)
    f = frames()
    with torch.no_grad():
        ids = hps.tokenizer([PROMPT], return_tensors="pt").input_ids
        t = F.normalize(net.get_text_features(input_ids=ids).pooler_output, dim=-1)
        i = F.normalize(net.get_image_features(pixel_values=image_rewards.hps_pixels(f)).pooler_output, dim=-1)
        direct = (i @ t.T)[:, 0].mean()  # img_score.py: no logit scale
    assert hps.score(f[None], [PROMPT])["hps"].item() == pytest.approx(direct.item(), abs=1e-5)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickled module, not a state dict
    with pytest.raises(UserError, match="cannot read .*pickled.pt as a plain state dict"):
        reward.build_reward("hpsv2", path=str(tmp_path / "pickled.pt"), tokenizer=str(tmp_path / "tok"), arch=arch)


def test_imagereward_maps_blip_weights_and_normalises(tmp_path):
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        sorted(set(PROMPT.split())) + list("abcdefghijklmnopqrstuvwxyz")
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    vocab = len(words) + 2  # + [DEC] and [ENC]
    med = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
               max_position_embeddings=40, layer_norm_eps=1e-12, vocab_size=vocab, pad_token_id=0,
               encoder_width=48, add_cross_attention=True)
    json.dump(med, open(tmp_path / "med_config.json", "w"))
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32)
    torch.manual_seed(0)
    vis = BlipVisionModel(BlipVisionConfig(**vision, hidden_act="gelu", layer_norm_eps=1e-6)).eval()
    txt = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=32, encoder_hidden_size=48, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                       layer_norm_eps=1e-12), add_pooling_layer=False).eval()
    head = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Dropout(), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(), torch.nn.Linear(128, 64), torch.nn.Dropout(), torch.nn.Linear(64, 16),
                               torch.nn.Linear(16, 1)).eval()
    for p in [*vis.parameters(), *txt.parameters()]:
        p.data.normal_(0, 0.3)
    names = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
             ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
             ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
             ("self_attn.qkv", "attn.qkv"), ("post_layernorm", "norm")]
    state = {}
    for k, v in vis.state_dict().items():  # ImageReward.pt's names: BLIP's own ViT
        for new, old in names:
            k = k.replace(new, old)
        state[f"blip.visual_encoder.{k}"] = v
    state.update({f"blip.text_encoder.{k}": v for k, v in txt.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in head.state_dict().items()})
    torch.save(state, tmp_path / "ImageReward.pt")
    ir = reward.build_reward("imagereward", path=str(tmp_path), vision=vision)
    f = frames()
    tok = ir.tokenizer(PROMPT, padding="max_length", max_length=35, return_tensors="pt")
    assert tok.input_ids.shape == (1, 35) and tok.input_ids[0, 0].item() == 101  # [CLS] kept, padded to 35
    with torch.no_grad():
        img = vis(pixel_values=image_rewards.clip_pixels(f, crop_round=True)).last_hidden_state
        cls = txt(input_ids=tok.input_ids.expand(3, -1), attention_mask=tok.attention_mask.expand(3, -1),
                  encoder_hidden_states=img).last_hidden_state[:, 0]
        direct = ((head(cls)[:, 0] - 0.16717362830052426) / 1.0333394966054072).mean()
    assert ir.score(f[None], [PROMPT])["imagereward"].item() == pytest.approx(direct.item(), abs=1e-4)
    del state["mlp.layers.7.weight"]  # ImageReward.py's strict=False would leave it random: here one line
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="does not fit its head part"):
        reward.build_reward("imagereward", path=str(tmp_path), vision=vision)
