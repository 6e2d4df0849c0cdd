"""VideoScore through the real loading path, on a tiny random Idefics2 saved as the published checkpoint is."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

import reward
import videoscore
from model import UserError
from reward import build_reward, pick
from videos import read_video, write_video
from videoscore import VIDEOSCORE_TEMPLATE, VideoScore, frame_indices, videoscore_prompt

N_LATENTS = 4  # image tokens per frame (64 in the real model)
PROC = {"image_processor_type": "Idefics2ImageProcessor", "processor_class": "Idefics2Processor",
        "do_convert_rgb": True, "do_image_splitting": False, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 2, "rescale_factor": 1 / 255, "size": {"shortest_edge": 20, "longest_edge": 40}}


def save_tokenizer(folder: str) -> int:
    """A Mistral-style tokenizer.json (sentencepiece BPE with byte fallback, Prepend/Replace normalizer, BOS
    post-processor) with Idefics2's three added tokens after the vocabulary, as in the real checkpoint."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in sorted(set(VIDEOSCORE_TEMPLATE.split())):  # a piece per template word keeps sequences short
        piece = "▁"
        for c in word:
            vocab.setdefault(piece, len(vocab)), vocab.setdefault(c, len(vocab))
            if piece + c not in vocab:
                merges.append((piece, c))
                vocab[piece + c] = len(vocab)
            piece += c
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in
                            ("<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>")])
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return tok.get_vocab_size()


def save_tiny_videoscore(folder: str, proc: dict = PROC) -> str:
    """config.json, model.safetensors (keys model.* / score.* as Mantis saves them), tokenizer and processor
    files: everything the real path reads from TIGER-Lab/VideoScore."""
    from transformers import Idefics2Config

    os.makedirs(folder, exist_ok=True)
    vocab = save_tokenizer(folder)
    config = dict(
        architectures=["Idefics2ForSequenceClassification"], model_type="idefics2", image_token_id=vocab - 2,
        num_labels=5, problem_type="regression",
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        perceiver_config=dict(resampler_n_latents=N_LATENTS, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1, hidden_size=32),
        text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, pad_token_id=0))
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    json.dump(proc, open(os.path.join(folder, "preprocessor_config.json"), "w"))
    json.dump({"image_seq_len": N_LATENTS, "processor_class": "Idefics2Processor"},
              open(os.path.join(folder, "processor_config.json"), "w"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = videoscore.Idefics2ForSequenceClassification(Idefics2Config.from_dict(config))
        state = {k: (torch.randn_like(v) * 0.3 + ("norm" in k or "latents" in k)).contiguous()  # O(1) outputs
                 for k, v in net.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_videoscore(str(tmp_path_factory.mktemp("videoscore")))


@pytest.fixture(scope="module")
def vs(tiny) -> VideoScore:
    return build_reward("videoscore", path=tiny)


def video(b, t, h=24, w=30, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_prompt_is_the_trained_template_with_one_image_marker_per_frame(vs, tiny):
    # sha256 of REGRESSION_QUERY_PROMPT in TIGER-AI-Lab/VideoScore examples/run_videoscore.py (8e44973)
    assert hashlib.sha256(VIDEOSCORE_TEMPLATE.encode()).hexdigest() == \
        "49b386d9ea3003760c983cc258cf4211faf858d58191f95fcfacdf68a8fed2c0"
    text = videoscore_prompt("a red ball", 16)
    assert text == VIDEOSCORE_TEMPLATE.replace("{text_prompt}", "a red ball") + "<image> " * 16
    assert text.startswith("\nSuppose you are an expert") and "sub-score, \nthe lowest" in text
    assert text.endswith('"a red ball",\nall the frames of video are as follows:\n' + "<image> " * 16)
    # tokens: BOS, then per frame <fake> <image>*64 <fake> (64 = N_LATENTS here)
    ids = vs.inputs(video(1, 51), ["a red ball"])["input_ids"][0].tolist()
    image_id = vs.net.config.image_token_id
    assert ids[0] == 1 and ids.count(image_id) == 16 * N_LATENTS and ids.count(image_id - 1) == 2 * 16
    # the ids are tokenizer.json's own pipeline (as transformers 4.4x ran it); transformers 5's AutoTokenizer
    # rebuilds this Llama tokenizer and tokenizes the spaces after each image block differently
    block = "<fake_token_around_image>" + "<image>" * N_LATENTS + "<fake_token_around_image>"
    expanded = text.replace("<image>", block).replace("<fake_token_around_image>" * 2, "<fake_token_around_image>")
    assert ids == Tokenizer.from_file(os.path.join(tiny, "tokenizer.json")).encode(expanded).ids


def test_loads_the_published_layout(vs):
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
                for k in vs.net.state_dict()}
    assert prefixes == {"model.vision_model", "model.connector", "model.text_model", "score"}
    # Mantis builds the perceiver's norms with the text model's eps, transformers' config would give 1e-6
    assert vs.net.model.connector.perceiver_resampler.norm.variance_epsilon == 1e-5


def test_frame_indices_as_the_official_inference():
    # np.arange(0, 51, 51 / 16).astype(int): 51/16 = 3.1875 is exact in binary, so these are exact
    assert frame_indices(51, 16) == [0, 3, 6, 9, 12, 15, 19, 22, 25, 28, 31, 35, 38, 41, 44, 47]
    assert frame_indices(16, 16) == list(range(16)) and frame_indices(5, 16) == list(range(5))
    assert frame_indices(1, 16) == [0]
    long = frame_indices(200, 48)
    assert len(long) == 48 and long[:4] == [0, 4, 8, 12] and long[-1] == 195  # stride 200/48 = 4.1667


def test_five_raw_dimensions_deterministic_and_a_batch_equals_each_video_alone(vs, tiny):
    videos, prompts = video(3, 6), ["a", "the dog runs on the beach " * 3, "Ünïcode “quotes” 🎹"]
    s = vs.score(videos, prompts)
    assert list(s) == ["visual_quality", "temporal_consistency", "dynamic_degree", "text_to_video_alignment",
                       "factual_consistency"] and vs.default_dim == "temporal_consistency"
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in s.values())
    assert torch.equal(torch.stack(list(s.values())), torch.stack(list(vs.score(videos, prompts).values())))
    alone = torch.stack([torch.stack(list(vs.score(videos[i: i + 1], prompts[i: i + 1]).values()))[:, 0]
                         for i in range(3)], 1)
    torch.testing.assert_close(torch.stack(list(s.values())), alone, atol=1e-5, rtol=0)  # right padding is exact
    assert (alone[:, 0] - alone[:, 1]).abs().max() > 1e-3  # the prompt matters
    # two videos per forward and the offload path give the same numbers
    small = build_reward("videoscore", path=tiny, batch_size=2, offload=True)
    torch.testing.assert_close(torch.stack(list(small.score(videos, prompts).values())), alone, atol=1e-5, rtol=0)
    assert pick(s, "global").tolist() == pytest.approx(torch.stack(list(s.values())).mean(0).tolist())


def test_gray_and_one_frame_videos_are_scored(vs):
    gray = torch.full((1, 8, 24, 30, 3), 128, dtype=torch.uint8)
    one = video(1, 1)
    for v in (gray, one):
        assert all(torch.isfinite(x).all() for x in vs.score(v, ["x"]).values())
    # a float frame of exactly mid-gray normalises to all zeros, which Idefics2Model.forward would drop as
    # padding (then 8 image slots would have no features); here it is a frame
    mid = torch.full((1, 8, 24, 30, 3), 127.5)
    assert vs.inputs(mid, ["x"])["pixel_values"].abs().max() == 0
    assert torch.isfinite(vs.logits(mid, ["x"])).all()


def test_float_videos_give_gradients(vs):
    x = video(1, 4).float().requires_grad_(True)
    vs.logits(x, ["a"])[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_torch_preprocessing_matches_idefics2_image_processor(vs):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    official = Idefics2ImageProcessorPil(**{k: v for k, v in PROC.items() if not k.endswith("_class")
                                           and k != "image_processor_type"})
    for h, w in [(40, 60), (12, 18), (24, 30)]:  # down (longest side 40), up (to 20x20), unchanged
        frames = video(1, 5, h, w, seed=h)[0]
        want = official([[f.numpy() for f in frames]], return_tensors="pt")["pixel_values"][0]
        got = videoscore.idefics2_pixels(frames, vs.proc)
        assert got.shape == want.shape
        # PIL rounds to uint8 in fixed point: at most one level (2/255 after normalising) on a few pixels
        diff = (got - want).abs()
        assert diff.max() <= 2 / 255 + 1e-6 and (diff > 1e-6).float().mean() < 0.05


def test_bad_input_is_one_clear_line(tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist; download the weights with `huggingface-cli download "
                                        "TIGER-Lab/VideoScore"):
        build_reward("videoscore", path=str(tmp_path / "missing"))
    broken = save_tiny_videoscore(str(tmp_path / "broken"))
    os.remove(os.path.join(broken, "tokenizer.json"))
    with pytest.raises(UserError, match="has no tokenizer.json"):
        build_reward("videoscore", path=broken)
    os.remove(os.path.join(broken, "model.safetensors"))
    with pytest.raises(UserError, match="no file named model.safetensors"):
        build_reward("videoscore", path=broken)
    split = save_tiny_videoscore(str(tmp_path / "split"), proc={**PROC, "do_image_splitting": True})
    with pytest.raises(UserError, match="image splitting"):
        build_reward("videoscore", path=split)
    from safetensors.torch import load_file

    state = load_file(os.path.join(tiny, "model.safetensors"))
    state["score.weight"] = torch.zeros(4, 32)
    wrong = save_tiny_videoscore(str(tmp_path / "wrong"))
    save_file(state, os.path.join(wrong, "model.safetensors"))
    with pytest.raises(UserError, match="do not match"):
        build_reward("videoscore", path=wrong)
    vs = build_reward("videoscore", path=tiny)
    with pytest.raises(UserError, match="unknown reward dimension 'beauty'"):
        pick(vs.score(video(1, 2), ["x"]), "beauty")
    with pytest.raises(UserError, match="0 frames"):
        vs.score(torch.zeros(1, 0, 24, 30, 3, dtype=torch.uint8), ["x"])


def test_score_cli_reads_a_video_file(vs, tiny, tmp_path, capsys):
    path = str(tmp_path / "v.mp4")
    write_video(path, video(1, 9, 24, 30)[0], fps=8)
    out = reward.main(["score", path, "--prompt", "a red ball", "--reward", "videoscore", "--reward-path", tiny,
                       "--device", "cpu"])
    assert json.loads(capsys.readouterr().out) == out
    want = vs.score(read_video(path)[None], ["a red ball"])
    assert out[path] == {d: round(v.item(), 4) for d, v in want.items()}
