"""The VideoModel interface on the tiny model and on Open-Sora built from small saved folders."""
import os

import pytest
import torch

from model import UserError, build_model, opensora_prompt


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny").to("cpu")


def test_tiny_sampling_is_deterministic_per_seed_and_batch_independent(tiny):
    a = tiny.sample(["a red ball moves left"], 2, [5, 6], steps=4)
    b = tiny.sample(["a red ball moves left"], 2, [5, 6], steps=4)
    assert a.shape == (2, 3, 8, 32, 32) and torch.equal(a, b)
    alone = tiny.sample(["a red ball moves left"], 1, [6], steps=4)
    assert torch.allclose(alone[0], a[1], atol=1e-4)  # a candidate does not depend on its batch mates
    assert not torch.allclose(a[0], a[1])
    videos = tiny.decode(a)
    assert videos.shape == (2, 8, 32, 32, 3) and videos.dtype == torch.uint8


def test_prompt_cache_and_opensora_caption_format(tiny):
    y, mask = tiny.encode_prompts(["x", "yy", "x"])
    assert y.shape == (3, 1, 48, 32) and torch.equal(y[0], y[2]) and mask.sum(1).tolist() == [2, 3, 2]
    assert opensora_prompt("A Dog, running.") == "a dog, running. aesthetic score: 6.5."


def test_opensora_loads_through_the_real_path(small_opensora):
    m = build_model("opensora", dit=small_opensora["dit"], vae=small_opensora["vae"],
                    text_encoder=small_opensora["t5"], size="32x48", frames=20).to("cpu")
    assert m.latent_shape == (4, 6, 16, 24)
    z = m.sample(["a red ball"], 2, [0, 1], steps=3)
    assert z.shape == (2, 4, 6, 16, 24)
    assert m.decode(z).shape == (2, 20, 32, 48, 3)
    y, mask = m.encode_prompts(["a red ball"])
    assert y.shape == (1, 1, 12, 16) and mask.sum().item() == 7  # 6 words + </s>


def test_save_and_load_weights_round_trip(tiny, tmp_path):
    other = build_model("tiny")
    for p in other.dit.parameters():
        p.data.add_(1.0)
    other.save_weights(str(tmp_path))
    loaded = build_model("tiny", dit=str(tmp_path))  # a saved folder is a --dit folder
    tiny2 = build_model("tiny")
    tiny2.load_weights(os.path.join(tmp_path, "model.safetensors"))
    for net in (loaded.dit, tiny2.dit):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.dit.state_dict().values()))


def test_weights_of_another_model_are_refused(tiny, small_opensora, tmp_path):
    tiny.save_weights(str(tmp_path))
    m = build_model("opensora", dit=small_opensora["dit"], vae=small_opensora["vae"],
                    text_encoder=small_opensora["t5"], size="32x32", frames=17)
    with pytest.raises(UserError, match="model 'tiny', not 'opensora'"):
        m.load_weights(os.path.join(tmp_path, "model.safetensors"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(size="240x430"), "multiples of 16"),
    (dict(resolution="1080q"), "unknown resolution"),
    (dict(aspect="7:5"), "unknown aspect ratio"),
    (dict(dit="/nonexistent/stdit"), "huggingface-cli download hpcai-tech/OpenSora-STDiT-v3 --local-dir /nonexistent"),
])
def test_bad_opensora_input_is_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_model("opensora", **kwargs)


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'sora2'"):
        build_model("sora2")
