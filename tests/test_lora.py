"""LoRA (lora.py): the reference as a second adapter, checkpoints in diffusers' layout, resume, merge, bad input."""
import json
import math
import os

import pytest
import torch
from conftest import refusal
from safetensors.torch import load_file

import lora
import sample
import train
from model import UserError, build_model
from test_diffusers_models import SIZE, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "2",
        "--batch-size", "2", "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def inputs(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *model.latent_shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    y, mask = model.encode_prompts(["a cat", "a dog"][:b])
    return x0, noise, torch.tensor([300.0, 700.0][:b]), y, mask


def nudge(net, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.trainable(net):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_base_then_exactly_the_policy_after_an_update(dtype):
    model = build_model("tiny", size="16x16")
    base = model.frozen_copy()
    lora.add_adapters(model.dit, 4)
    model.dtype = dtype  # bf16 autocast on the CPU: equal weights must still give equal errors
    x = inputs(model)
    with lora.reference(model.dit) as ref:
        start = model.errors(ref, *x)
    assert torch.equal(start, model.errors(base, *x)) and torch.equal(start, model.errors(model.dit, *x))
    nudge(model.dit)  # a few optimizer steps: the policy moves, the reference stays the base
    policy = model.errors(model.dit, *x)
    with lora.reference(model.dit) as ref:
        assert torch.equal(model.errors(ref, *x), start) and not torch.equal(policy, start)
    lora.update_reference(model.dit)  # Alg. 1 line 14
    with lora.reference(model.dit) as ref:
        assert torch.equal(model.errors(ref, *x), policy)
    assert torch.equal(model.errors(model.dit, *x), policy)  # and the policy is routed back through its own adapter


def test_only_the_policy_adapter_trains_and_the_reference_costs_no_network_copy():
    model = build_model("toy")
    total = sum(p.numel() for p in model.dit.parameters())
    config = lora.add_adapters(model.dit, 8)
    trained = lora.trainable(model.dit)
    names = [n for n, p in model.dit.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and ".policy." in n for n in names)
    # 3 spatial + 3 temporal blocks x 7 linears (qkv, proj, cross q, kv, proj, fc1, fc2), r (d_in + d_out) numbers each
    layers = lora.lora_layers(model.dit)
    assert len(layers) == 42 and len(trained) == 2 * 42
    assert sum(p.numel() for p in trained) == sum(8 * (m.in_features + m.out_features) for m in layers) == 105984
    assert total == 1041840  # the network itself, frozen, held once: policy and reference share it
    assert config == dict(rank=8, alpha=8.0, dropout=0.0, targets=lora.TARGETS["stdit3"])


def test_lora_run_starts_at_log_2_saves_adapters_and_resumes_exactly(tmp_path):
    flags = FAST + ["--lora-rank", "4", "--k", "2"]
    train.main(flags + ["--steps", "3", "--out", str(tmp_path / "a")])
    train.main(flags + ["--steps", "1", "--out", str(tmp_path / "b")])
    train.main(flags + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
             for line in open(tmp_path / x / "metrics.jsonl")] for x in "ab"]
    assert rows[0] == rows[1] and rows[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert sorted(os.listdir(ckpt)) == sorted([lora.ADAPTER_FILE, lora.REFERENCE_FILE, lora.CONFIG_FILE, "optimizer.pt",
                                               "rng.pt", "state.json", "args.json", "adapter_config.json",
                                               lora.PEFT_FILE])  # the last two: peft's layout (STDiT3)
    for file in (lora.ADAPTER_FILE, lora.REFERENCE_FILE):
        a, b = load_file(ckpt / file), load_file(tmp_path / "b" / "checkpoint-3" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in a)  # diffusers' key layout
    # step 2 updated the reference (K = 2), step 3 moved the policy on: they differ again
    policy, ref = load_file(ckpt / lora.ADAPTER_FILE), load_file(ckpt / lora.REFERENCE_FILE)
    assert not all(torch.equal(policy[k], ref[k]) for k in policy)


@pytest.mark.parametrize("method", ["offline", "structural", "dense"])
def test_every_dpo_method_trains_the_policy_adapter_from_log_2(tmp_path, method):
    """--lora-rank with the other DPO methods: the first loss is log 2 (policy adapter == reference adapter == base),
    and only the policy adapter moves (with --k 0 the reference adapter keeps its zero B)."""
    own = ["--offline-pairs", "2"] if method == "offline" else ["--k", "0"]  # offline's reference is fixed anyway
    train.main(FAST + ["--lora-rank", "4", "--method", method, *own, "--steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    policy = load_file(tmp_path / "checkpoint-2" / lora.ADAPTER_FILE)
    ref = load_file(tmp_path / "checkpoint-2" / lora.REFERENCE_FILE)
    assert all(not ref[k].any() for k in ref if "lora_B" in k)
    assert any(policy[k].any() for k in policy if "lora_B" in k)


def test_merged_weights_and_the_adapter_sample_the_same_videos(tmp_path):
    train.main(FAST + ["--lora-rank", "4", "--steps", "2", "--merge-lora", "--out", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    assert {"model.safetensors", "config.json", lora.ADAPTER_FILE} <= set(os.listdir(ckpt))
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    common = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "1",
              "--prompts", str(tmp_path / "p.txt")]
    adapter = build_model("tiny", size="16x16", frames=4)
    lora.add_adapters(adapter.dit, 4)
    lora.load_adapter(os.path.join(ckpt, lora.ADAPTER_FILE), adapter.dit, "tiny")
    merged = build_model("tiny", size="16x16", frames=4, dit=ckpt)  # a merged checkpoint is a plain --dit
    x = inputs(adapter)
    assert torch.allclose(adapter.errors(adapter.dit, *x), merged.errors(merged.dit, *x), rtol=1e-5, atol=1e-7)
    os.remove(os.path.join(ckpt, "model.safetensors"))  # sample.py then reads the adapter (and its base) itself
    sample.main(common + ["--checkpoint", ckpt, "--out", str(tmp_path / "s")])
    assert sorted(os.listdir(tmp_path / "s")) == ["a cat-0.mp4", "a dog-0.mp4"]


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_an_adapter_checkpoint_loads_in_the_diffusers_pipeline(diffusers_folders, name, tmp_path):
    model = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu")
    config = lora.add_adapters(model.dit, 4, alpha=8)  # alpha != r: the pipeline must read the scale from the file
    nudge(model.dit, scale=0.2)
    states = {n: lora.adapter_state(model.dit, n) for n in (lora.POLICY, lora.REFERENCE)}
    lora.save_files(str(tmp_path), states, {**config, "base": diffusers_folders[name]}, name)
    pipe = pipeline(name, diffusers_folders[name])
    pipe.load_lora_weights(str(tmp_path))  # finds pytorch_lora_weights.safetensors, the policy adapter
    prompts, seeds = ["a red ball rolls"], [3, 4]
    ours = model.sample(prompts, 2, seeds, steps=3)
    noise = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    layout = (lambda z: z.transpose(1, 2)) if name == "cogvideox" else (lambda z: z)  # CogVideoX: (B, T, C, H, W)
    last = {}
    pipe(prompt=prompts * 2, latents=layout(noise), height=32, width=32, num_frames=9, num_inference_steps=3,
         guidance_scale=model.cfg, max_sequence_length=model.max_length, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: last.update(kw) or {})
    theirs = layout(last["latents"])
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    plain = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu").sample(prompts, 2, seeds, steps=3)
    assert (plain - theirs).abs().max() > 1e-3 * theirs.abs().max()  # the adapter does change the output


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "error: --lora-rank must be at least 1 (0 = full fine-tuning), got -1"),
    (["--lora-alpha", "8"], "error: --lora-alpha needs --lora-rank (LoRA is off)"),
    (["--lora-rank", "4", "--lora-targets", "nothing_here"], "error: --lora-targets 'nothing_here' matches no layer"),
    (["--lora-rank", "4", "--ref-offload"], "error: --ref-offload has nothing to offload with --lora-rank"),
])
def test_bad_lora_flags_are_one_line(tmp_path, capsys, flags, message):
    assert refusal(train.main, FAST + ["--steps", "1", "--out", str(tmp_path), *flags], capsys).startswith(message)


def test_resuming_the_other_kind_of_checkpoint_or_another_models_adapter_is_one_line(tmp_path, capsys):
    train.main(FAST + ["--lora-rank", "4", "--steps", "1", "--out", str(tmp_path / "lora")])
    train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "full")])
    refused = lambda *a: refusal(train.main, FAST + ["--steps", "2", "--resume", *a], capsys)
    assert "holds LoRA adapters (rank 4): resume with --lora-rank 4" in refused("--out", str(tmp_path / "lora"))
    assert "holds full weights, not LoRA adapters" in refused("--out", str(tmp_path / "full"), "--lora-rank", "4")
    assert "holds adapters with rank 4, this run asks for 8" in refused("--out", str(tmp_path / "lora"),
                                                                         "--lora-rank", "8")
    toy = build_model("toy")
    lora.add_adapters(toy.dit, 4)
    with pytest.raises(UserError, match="is an adapter of model 'tiny', not 'toy'"):
        lora.load_adapter(str(tmp_path / "lora" / "checkpoint-1" / lora.ADAPTER_FILE), toy.dit, "toy")


def test_an_open_sora_family_adapter_loads_in_peft_with_identical_outputs(tmp_path):
    """STDiT3 has no diffusers pipeline: its checkpoints also hold the policy adapter in peft's own layout, which
    PeftModel.from_pretrained loads onto the base network, giving our network's errors with that adapter."""
    from peft import PeftModel

    train.main(FAST + ["--lora-rank", "4", "--lr", "1e-2", "--steps", "1", "--out", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint-1")
    assert {"adapter_config.json", lora.PEFT_FILE} <= set(os.listdir(ckpt))
    ours = build_model("tiny", size="16x16", frames=4)
    lora.add_adapters(ours.dit, 4)
    lora.load_adapter(os.path.join(ckpt, lora.ADAPTER_FILE), ours.dit, "tiny")
    base = build_model("tiny", size="16x16", frames=4)
    peft_net = PeftModel.from_pretrained(base.dit, ckpt).eval()
    x = inputs(ours)
    with torch.no_grad():
        theirs, mine, plain = (ours.errors(net, *x) for net in (peft_net, ours.dit.eval(), build_model(
            "tiny", size="16x16", frames=4).dit))
    # peft's wrapper adds the adapter's term in its own order: measured 4.8e-7 apart on errors of about 3.2
    assert torch.allclose(theirs, mine, rtol=1e-6, atol=0) and (mine - plain).abs().max() > 1e-3  # not a zero adapter
