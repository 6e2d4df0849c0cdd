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


@pytest.fixture(scope="session")
def diffusers_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny CogVideoX (plain and with RoPE), Wan2.1, Wan2.2 (5B, A14B) and LTX-Video pipelines saved by diffusers'
    save_pretrained, once a session."""
    from tiny_diffusers import save_tiny

    root = tmp_path_factory.mktemp("pipelines")
    return {"cogvideox": save_tiny("cogvideox", str(root / "cogvideox")),
            "cogvideox-rope": save_tiny("cogvideox", str(root / "cogvideox-rope"), rope=True),
            "wan": save_tiny("wan", str(root / "wan")),
            **{name: save_tiny(name, str(root / name)) for name in ("wan2.2-5b", "wan2.2-14b", "ltx")}}


# ----------------------------------------------------------------------------------------------------------
# Two tiers. `python -m pytest -q tests` (the README's command) runs the fast tier; tests marked `slow`
# (several processes, multi-step training probes, bench.py's forks, the browser) run with `-m slow`.


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process, multi-step or browser tests; run with -m slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr"):  # any -m expression chooses for itself
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


# ----------------------------------------------------------------------------------------------------------
# Refusals in-process: a tool's main(argv) called here as its command line calls it. What the user would see is
# the SystemExit message (printed by Python on exit) plus whatever reached stderr and any warning raised.


def refusal(main, argv: list[str], capsys) -> str:
    """The one line a refused command shows: main(argv) must end in a non-zero exit whose message is exactly one
    `error: ...` line, with nothing else on stderr or stdout (no progress: nothing was started). Any other
    exception propagates, as the traceback a user would see."""
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")
        main(argv)
    out, err = capsys.readouterr()
    shown = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    code = e.value.code
    assert isinstance(code, str) and code, f"exit status {code!r}: not a refusal with a message"
    lines = [line for line in err.splitlines() + shown + code.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert out == "", out
    return lines[0]
