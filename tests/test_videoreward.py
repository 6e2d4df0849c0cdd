"""VideoAlign's VideoReward through the real loading path, on a tiny random Qwen2-VL saved as the release is:
model_config.json, checkpoint-N/model.pth (PEFT names, LoRA unmerged), checkpoint-N/tokenizer/, the base config."""
import hashlib
import json
import os

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import image_rewards
import reward
import videoreward
from model import UserError
from videos import read_video, write_video

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>", *videoreward.VIDEOREWARD_TOKENS]
NORM = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105, "TA_std": 2.5121}


def save_tokenizer(folder: str) -> dict:
    """A byte-level BPE (Qwen2's kind) without merges, the Qwen2-VL and reward tokens added after the bytes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def peft_state(net, head: torch.Tensor, rank: int, g: torch.Generator) -> dict:
    """Qwen2VLModel's weights under transformers 4.45 + PEFT names, a random LoRA on every language-model linear
    (B non-zero, so the merge matters), as VideoAlign's torch.save(model.state_dict()) writes them."""
    out = {}
    for k, v in net.state_dict().items():
        k = "visual." + k[len("visual."):] if k.startswith("visual.") else "model." + k[len("language_model."):]
        module, _, leaf = k.rpartition(".")
        if module.startswith("model.layers.") and module.rsplit(".", 1)[1].endswith("_proj"):
            out[f"base_model.model.{module}.base_layer.{leaf}"] = v
            if leaf == "weight":
                out[f"base_model.model.{module}.lora_A.default.weight"] = torch.randn(rank, v.shape[1], generator=g) * .3
                out[f"base_model.model.{module}.lora_B.default.weight"] = torch.randn(v.shape[0], rank, generator=g) * .3
        else:
            out[f"base_model.model.{k}"] = v
    out["base_model.model.lm_head.weight"] = out["base_model.model.model.embed_tokens.weight"]
    out["base_model.model.rm_head.weight"] = head
    return out


def save_tiny_videoreward(root, norm: dict | None = NORM, zero_lora: bool = False) -> str:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    folder, base = os.path.join(root, "VideoReward"), os.path.join(root, "Qwen2-VL-2B-Instruct")
    ids = save_tokenizer(os.path.join(folder, "checkpoint-7", "tokenizer"))
    # the base model's config.json as Qwen2-VL-2B-Instruct ships it (transformers 4.45's flat layout), shrunk
    config = dict(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"], hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                  vocab_size=300, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3,
                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    os.makedirs(base, exist_ok=True)
    json.dump(config, open(os.path.join(base, "config.json"), "w"))
    cfg = Qwen2VLConfig.from_dict(config)
    cfg.text_config.vocab_size = len(SPECIALS) + 256  # resize_token_embeddings(len(tokenizer))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = Qwen2VLModel(cfg)
    for p in net.parameters():  # O(1) weights: scores that move when anything is off
        p.data = torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0)
    state = peft_state(net, torch.randn(1, 32, generator=g), rank=4, g=g)
    if zero_lora:
        state = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    torch.save(state, os.path.join(folder, "checkpoint-7", "model.pth"))
    model_config = {"data_config": {"max_frame_pixels": 200704, "num_frames": None, "fps": 2.0,
                                    "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                                    "sample_type": "uniform"},
                    "model_config": {"model_name_or_path": base, "output_dim": 1, "use_special_tokens": True,
                                     "reward_token": "special"},
                    "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 4, "lora_alpha": 8}}
    if norm:
        model_config["inference_config"] = norm
    json.dump(model_config, open(os.path.join(folder, "model_config.json"), "w"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_videoreward(str(tmp_path_factory.mktemp("vr")))


def moving_video(frames: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (1, 3, 12, 12), generator=g).float()
    v = torch.nn.functional.interpolate(v, size=(56, 70), mode="bilinear")[0].permute(1, 2, 0)
    return torch.stack([v.roll(2 * t, 1) for t in range(frames)]).clamp(0, 255).to(torch.uint8)


def test_the_published_prompt_sampling_and_resize_rules():
    text = videoreward.VIDEOREWARD_TEMPLATE.format(text_prompt="a red ball rolls to the left")
    # sha256 of what VideoAlign's own build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special") returns
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "061c9e57c27869feb58b9289602eb86bfd4ce9c8bfece878d2533bdaf554307d"
    assert videoreward.VIDEOREWARD_TEMPLATE.format(text_prompt="{x}").count("{x}") == 1  # braces stay literal
    # 2 frames per second of the video's own time: 24 frames at 8 fps -> 6 frames, as the original sampled them
    assert videoreward.videoreward_frames(24, 8.0, 2.0) == [0, 5, 9, 14, 18, 23]
    assert len(videoreward.videoreward_frames(24, 24.0, 2.0)) == 4  # at least 4
    assert len(videoreward.videoreward_frames(240, 24.0, 2.0)) == 20
    with pytest.raises(UserError, match="needs at least 2 frames"):
        videoreward.videoreward_frames(1, 8.0, 2.0)
    assert videoreward.qwen2vl_size(240, 320, 100352, 200704) == (280, 392)  # small videos are upscaled
    assert videoreward.qwen2vl_size(480, 832, 100352, 200704) == (336, 588)


def test_patch_rows_pair_consecutive_frames_in_qwen2vl_order():
    frames = moving_video(4)[:, :28, :56]  # 28 x 56: already a multiple of 28, no resize
    rows, grid = videoreward.qwen2vl_patches(frames, (28, 56))
    assert grid == [2, 2, 4] and rows.shape == (16, 3 * 2 * 14 * 14)
    x = (frames.permute(0, 3, 1, 2).double() / 255).float()
    x = (x - torch.tensor(image_rewards.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(image_rewards.CLIP_STD).view(1, 3, 1, 1)
    r = rows.view(16, 3, 2, 14, 14)  # channel, frame of the temporal pair, patch
    assert torch.allclose(r[0, :, 0], x[0, :, :14, :14]) and torch.allclose(r[0, :, 1], x[1, :, :14, :14])
    assert torch.allclose(r[1, :, 0], x[0, :, :14, 14:28])  # then the 2x2 block of one merged token
    assert torch.allclose(r[2, :, 0], x[0, :, 14:28, :14])


def test_scores_normalised_batched_and_bound_to_the_true_frame_rate(tiny):
    vr = reward.build_reward("videoreward", path=tiny)
    assert vr.dims == ["visual_quality", "motion_quality", "text_alignment", "overall"]
    videos = torch.stack([moving_video(16, seed=0), moving_video(16, seed=1), moving_video(16, seed=2)])
    prompts = ["a red ball rolls to the left", "x", "a much longer prompt " * 5]
    s = vr.score(videos, prompts, fps=4.0)  # 8 of the 16 frames
    assert torch.allclose(s["overall"], s["visual_quality"] + s["motion_quality"] + s["text_alignment"])
    one = [vr.score(v[None], [p], fps=4.0) for v, p in zip(videos, prompts)]
    for d in vr.dims:  # right padding changes nothing
        assert torch.allclose(s[d], torch.cat([o[d] for o in one]), atol=1e-5)
    assert s["motion_quality"].std() > 1e-3  # the videos are told apart
    # the same frames called 16 fps: 4 frames sampled, other scores (VideoAlign issue #21)
    assert not torch.allclose(vr.score(videos[:1], prompts[:1], fps=16.0)["motion_quality"], s["motion_quality"][:1])
    raw = reward.build_reward("videoreward", path=save_tiny_videoreward(os.path.dirname(tiny) + "/raw", norm=None))
    r = raw.score(videos[:1], prompts[:1], fps=4.0)
    assert r["visual_quality"].item() == pytest.approx(s["visual_quality"][0].item() * 2.2476 + 3.6757, abs=1e-4)
    with pytest.raises(UserError, match="needs the videos' true frame rate"):
        vr.score(videos, prompts)


def test_the_checkpoints_lora_is_applied(tiny):
    """model.pth holds the LoRA unmerged: W + alpha / r * B A must reach the network (B = 0 would not move it)."""
    without = save_tiny_videoreward(os.path.dirname(tiny) + "/nolora", zero_lora=True)
    v = moving_video()[None]
    a = reward.build_reward("videoreward", path=tiny).score(v, ["x"], fps=8.0)["overall"]
    b = reward.build_reward("videoreward", path=without).score(v, ["x"], fps=8.0)["overall"]
    assert (a - b).abs().item() > 1e-3
    w, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    merged = videoreward.merge_lora({"base_model.model.m.q_proj.base_layer.weight": w,
                                "base_model.model.m.q_proj.lora_A.default.weight": A,
                                "base_model.model.m.q_proj.lora_B.default.weight": B}, scale=2.0)
    assert list(merged) == ["m.q_proj.weight"] and torch.allclose(merged["m.q_proj.weight"], w + 2.0 * B @ A)


def test_reward_py_reads_the_frame_rate_from_the_file(tiny, tmp_path):
    v = moving_video(16)
    write_video(str(tmp_path / "a.mp4"), v, fps=8)
    out = reward.main(["score", str(tmp_path / "a.mp4"), "--reward", "videoreward", "--reward-path", tiny,
                       "--prompt", "x", "--device", "cpu"])
    decoded = read_video(str(tmp_path / "a.mp4"))
    direct = reward.build_reward("videoreward", path=tiny).score(decoded[None], ["x"], fps=8.0)
    assert out[str(tmp_path / "a.mp4")]["overall"] == pytest.approx(direct["overall"].item(), abs=1e-3)


def test_bad_checkpoints_are_one_line(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "checkpoint-7" / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read .*model.pth as a plain state dict"):
        reward.build_reward("videoreward", path=str(broken))
    os.remove(broken / "checkpoint-7" / "model.pth")
    with pytest.raises(UserError, match="has no checkpoint-N/model.pth"):
        reward.build_reward("videoreward", path=str(broken))
    with pytest.raises(UserError, match="folder '/no/such' does not exist"):
        reward.build_reward("videoreward", path="/no/such")
    cfg = json.load(open(os.path.join(tiny, "model_config.json")))
    cfg["data_config"]["prompt_template_type"] = "simple"
    shutil.copytree(tiny, tmp_path / "other")
    json.dump(cfg, open(tmp_path / "other" / "model_config.json", "w"))
    with pytest.raises(UserError, match="not the published VideoReward setting"):
        reward.build_reward("videoreward", path=str(tmp_path / "other"))
