"""CogVideoX and Wan2.1 behind the VideoModel interface, on tiny random pipelines saved by diffusers itself."""
import json
import os

import pytest
import torch

import diffusers
import grpo
import train
from diffusers_models import load_model
from model import UserError, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {"cogvideox": diffusers.CogVideoXPipeline, "wan": diffusers.WanPipeline}
SIZE = dict(size="32x32", frames=9)


def pipeline(name, folder):
    """The diffusers pipeline from the same folder. diffusers loads Wan's transformer only with `accelerate`
    installed (its fp32-kept modules); without it the pipeline gets the transformer loaded by hand."""
    kwargs = {}
    if name == "wan" and not diffusers.utils.is_accelerate_available():
        kwargs["transformer"] = load_model(diffusers.WanTransformer3DModel, os.path.join(folder, "transformer"))
    pipe = PIPELINES[name].from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("key", ["cogvideox", "cogvideox-rope", "wan"])
def test_our_sampler_reproduces_the_diffusers_pipeline(diffusers_folders, key):
    name = key.split("-")[0]
    model = build_model(name, dit=diffusers_folders[key], **SIZE).to("cpu")
    prompts, seeds = ["a red ball rolls", "a cat sleeps"], [3, 4, 5, 6]
    ours = model.sample(prompts, 2, seeds, steps=3)
    videos = model.decode(ours)
    assert ours.shape == (4, *model.latent_shape) and videos.shape == (4, 9, 32, 32, 3)

    noise = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    layout = (lambda z: z.transpose(1, 2)) if name == "cogvideox" else (lambda z: z)  # CogVideoX: (B, T, C, H, W)
    call = dict(prompt=[p for p in prompts for _ in range(2)], latents=layout(noise), height=32, width=32, num_frames=9,
                num_inference_steps=3, guidance_scale=model.cfg, max_sequence_length=model.max_length)
    last = {}
    keep = lambda pipe, i, t, kw: last.update(kw) or {}  # the pipeline's latents after each step
    frames = pipeline(name, diffusers_folders[key])(**call, output_type="np", callback_on_step_end=keep).frames
    theirs = layout(last["latents"])
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    frames = torch.from_numpy(frames) * 255  # float pixels in [0, 255]
    assert (videos.float() - frames).abs().max() <= 0.5 + 1e-3  # ours are the same pixels rounded to uint8


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_candidates_and_both_cfg_halves_share_one_forward_per_step(diffusers_folders, name):
    model = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu")
    batches = []
    hook = model.dit.register_forward_hook(lambda mod, args, kwargs, out: batches.append(len(kwargs["hidden_states"])),
                                           with_kwargs=True)
    z = model.sample(["a dog runs"], 4, [0, 1, 2, 3], steps=3)
    hook.remove()
    assert batches == [8, 8, 8]  # 3 steps, each one forward of 4 candidates x [uncond; cond]
    alone = model.sample(["a dog runs"], 1, [2], steps=3)
    assert torch.allclose(alone[0], z[2], atol=1e-5)  # a candidate depends on its own seed only
    assert not torch.allclose(z[0], z[1])


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_one_onlinevpo_step_saves_a_diffusers_checkpoint_and_resumes(diffusers_folders, name, tmp_path):
    args = ["--model", name, "--reward", "pixel", "--dit", diffusers_folders[name], "--size", "32x32", "--frames", "5", "--sample-steps", "2", "--n",
            "2", "--batch-size", "1", "--lr", "1e-3", "--out", str(tmp_path), "--prompts",
            os.path.join(ROOT, "prompts/train.txt")]
    train.main(args + ["--steps", "1"])
    ckpt = tmp_path / "checkpoint-1"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.ref.safetensors",
            "scheduler_config.json"} <= set(os.listdir(ckpt))
    with open(tmp_path / "metrics.jsonl") as f:
        row = json.loads(f.readline())
    assert row["pairs"] == 1 and row["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert row["beta"] == 500.0
    train.main(args + ["--steps", "2", "--resume"])  # loads policy and reference back from the diffusers files
    assert os.path.isdir(tmp_path / "checkpoint-2")


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_fine_tuned_weights_load_in_the_diffusers_pipeline_and_as_dit(diffusers_folders, name, tmp_path):
    model = build_model(name, dit=diffusers_folders[name], **SIZE)
    ref = model.frozen_copy()
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(0.01)
    model.save_weights(str(tmp_path))
    model.save_weights(str(tmp_path), net=ref, file="ref.safetensors")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    cls = type(model.dit)  # the diffusers way: PipelineClass.from_pretrained(base, transformer=...)
    if name == "wan" and not diffusers.utils.is_accelerate_available():
        transformer = load_model(cls, str(tmp_path))  # what from_pretrained does, which needs accelerate for Wan
    else:
        transformer = cls.from_pretrained(str(tmp_path))
    pipe = PIPELINES[name].from_pretrained(diffusers_folders[name], transformer=transformer)
    assert same(pipe.transformer, model.dit)
    as_dit = build_model(name, dit=str(tmp_path), vae=diffusers_folders[name], text_encoder=diffusers_folders[name], **SIZE)
    assert same(as_dit.dit, model.dit)  # a checkpoint folder is a --dit (its scheduler saved next to it)
    fresh = build_model(name, dit=diffusers_folders[name], **SIZE)
    fresh.load_weights(str(tmp_path / "model.safetensors"))  # the names train.py and sample.py use
    fresh_ref = fresh.frozen_copy()
    fresh.load_weights(str(tmp_path / "ref.safetensors"), net=fresh_ref)
    assert same(fresh.dit, model.dit) and same(fresh_ref, ref) and not same(fresh_ref, model.dit)


def test_weights_of_another_model_or_configuration_are_refused(diffusers_folders, tmp_path):
    cog = build_model("cogvideox", dit=diffusers_folders["cogvideox"], **SIZE)
    build_model("wan", dit=diffusers_folders["wan"], **SIZE).save_weights(str(tmp_path / "wan"))
    with pytest.raises(UserError, match="holds weights of model 'wan', not 'cogvideox'"):
        cog.load_weights(str(tmp_path / "wan" / "model.safetensors"))
    build_model("tiny").save_weights(str(tmp_path / "tiny"))
    with pytest.raises(UserError, match="holds weights of model 'tiny', not 'cogvideox'"):
        cog.load_weights(str(tmp_path / "tiny" / "model.safetensors"))
    build_model("cogvideox", dit=diffusers_folders["cogvideox-rope"], **SIZE).save_weights(str(tmp_path / "rope"))
    with pytest.raises(UserError, match="saved from another CogVideoXTransformer3DModel .use_rotary_positional_emb"):
        cog.load_weights(str(tmp_path / "rope" / "model.safetensors"))


@pytest.mark.parametrize("name, kwargs, message", [
    ("cogvideox", dict(frames=48), "--frames 48: cogvideox takes 4k[+]1 frames .its VAE compresses time 4x., e.g. 45"),
    ("wan", dict(frames=80), "--frames 80: wan takes 4k[+]1 frames"),
    ("cogvideox", dict(size="40x32"), "--size 40x32: height and width must be positive multiples of 16 pixels"),
    ("wan", dict(size="480x830"), "multiples of 16 pixels"),
])
def test_a_size_the_model_cannot_take_is_one_clear_line(diffusers_folders, name, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_model(name, dit=diffusers_folders[name], **{**SIZE, **kwargs})


def test_bad_input_through_the_cli_and_missing_weights(diffusers_folders, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "wan", "--reward", "pixel", "--dit", diffusers_folders["wan"], "--frames", "10", "--out", str(tmp_path)])
    assert str(e.value.code) == "error: --frames 10: wan takes 4k+1 frames (its VAE compresses time 4x), e.g. 9 or 81"
    with pytest.raises(UserError, match="huggingface-cli download THUDM/CogVideoX-2b --local-dir /nonexistent/cog"):
        build_model("cogvideox", dit="/nonexistent/cog")


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_prompt_embeddings_are_cached_so_the_text_encoder_can_leave(diffusers_folders, name):
    model = build_model(name, dit=diffusers_folders[name], **SIZE)
    y, mask = model.encode_prompts(["a cat", "a red ball", "a cat"])
    assert y.shape == (3, model.max_length, 32) and torch.equal(y[0], y[2]) and mask.sum(1).tolist() == [6, 11, 6]
    if name == "wan":  # WanPipeline zeroes the features after each prompt's tokens
        assert y[0, 6:].abs().max() == 0 and y[0, :6].abs().min() > 0
    model.text_encoder = None  # a cached prompt needs no text encoder
    assert torch.equal(model.encode_prompts(["a cat"])[0][0], y[0])


def test_cogvideox_error_is_its_own_training_loss(diffusers_folders):
    """CogVideoX is fine-tuned on the x0 error weighted by 1 / (1 - abar_t) (diffusers' CogVideoX training example);
    our per-sample v-prediction error is the same number."""
    model = build_model("cogvideox", dit=diffusers_folders["cogvideox"], **SIZE)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, *model.latent_shape, generator=g), torch.randn(3, *model.latent_shape, generator=g)
    t = torch.tensor([10, 500, 990])
    y, mask = model.encode_prompts(["a", "b", "c"])
    with torch.no_grad():
        e = model.errors(model.dit, x0, noise, t, y, mask)
        x_t = model.scheduler.add_noise(x0, noise, t)
        x0_pred = model.scheduler.get_velocity(model.predict(model.dit, x_t, t, y), x_t, t)
        weight = 1 / (1 - model.scheduler.alphas_cumprod[t].float()).view(-1, 1, 1, 1, 1)
    assert torch.allclose(e, (weight * (x0_pred - x0) ** 2).flatten(1).mean(1), rtol=1e-4)


def test_training_timesteps_follow_each_models_schedule(diffusers_folders):
    g = torch.Generator().manual_seed(0)
    cog = build_model("cogvideox", dit=diffusers_folders["cogvideox"], **SIZE).training_timesteps(20000, g)
    assert cog.dtype == torch.long and cog.min() == 0 and cog.max() == 999  # uniform over the 1000 DDPM steps
    wan = build_model("wan", dit=diffusers_folders["wan"], **SIZE).training_timesteps(20000, g)
    assert 0 < wan.min() and wan.max() < 1000
    assert wan.median().item() == pytest.approx(750, abs=10)  # flow_shift 3 maps the median sigma 0.5 to 0.75


@pytest.mark.parametrize("name", ["cogvideox", "wan", *[pytest.param(n, marks=pytest.mark.slow)
                                                          for n in ("wan2.2-5b", "wan2.2-14b", "ltx")]])
def test_gradient_checkpointing_uses_diffusers_switch_and_keeps_gradients(diffusers_folders, name):
    model = build_model(name, dit=diffusers_folders[name], **SIZE)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, *model.latent_shape, generator=g), torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([950, 300])  # wan2.2-14b: one sample per expert
    y, mask = model.encode_prompts(["a", "b"])
    grads = []
    for on in (False, True):
        model.set_grad_checkpointing(on)
        assert model.dit.gradient_checkpointing is on
        model.dit.zero_grad()
        model.errors(model.dit, x0, noise, t, y, mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.dit.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_wan_grpo_rollout_is_the_pipelines_schedule_stepped_as_an_sde(diffusers_folders):
    """GRPO on Wan (Flow-GRPO's wan_pipeline_with_logprob): the scheduler's own timesteps and sigmas, the guided
    prediction, the SDE step. With a FlowMatchEuler scheduler and no noise it is the pipeline's Euler loop exactly;
    by default its noise is Flow-GRPO's Wan2.1 std_t = sigmas[1] s."""
    model = build_model("wan", dit=diffusers_folders["wan"], **SIZE).to("cpu")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]
    traj, log_probs, sigmas, timesteps = grpo.sample_sde(model, ["a red ball rolls"], 2, gens(), None, steps=3)
    assert len(traj) == 4 and log_probs.shape == (3, 2) and sigmas[-1] == 0.0 and torch.isfinite(log_probs).all()
    assert [int(t) for t in timesteps] == [int(s * 1000) for s in sigmas[:-1]]  # UniPC's int timesteps
    model.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    traj, _, _, _ = grpo.sample_sde(model, ["a red ball rolls"], 2, gens(), 1e-12, steps=3)
    assert torch.equal(traj[-1], model.sample(["a red ball rolls"], 2, [3, 4], steps=3))


def test_a_wan_grpo_run_and_cogvideox_refused(diffusers_folders, tmp_path):
    args = ["--model", "wan", "--reward", "pixel", "--dit", diffusers_folders["wan"], "--size", "32x32", "--frames", "5",
            "--sample-steps", "3", "--n", "3", "--batch-size", "1", "--lr", "1e-3", "--method", "grpo", "--k", "0",
            "--prompts", os.path.join(ROOT, "prompts/train.txt")]
    train.main(args + ["--steps", "2", "--out", str(tmp_path / "wan")])
    rows = [json.loads(line) for line in open(tmp_path / "wan" / "metrics.jsonl")]
    assert rows[0]["pairs"] == 3 and rows[0]["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[1]["kl"] > 0
    assert os.path.isfile(tmp_path / "wan" / "checkpoint-2" / "diffusion_pytorch_model.safetensors")
    cog = [a if a != "wan" else "cogvideox" for a in args]
    cog[cog.index(diffusers_folders["wan"])] = diffusers_folders["cogvideox"]
    with pytest.raises(SystemExit) as e:
        train.main(cog + ["--steps", "1", "--out", str(tmp_path / "cog")])
    assert str(e.value.code) == ("error: --method grpo needs a flow-matching model (opensora, toy, tiny, wan, wan2.2-5b, "
                                 "wan2.2-14b, ltx), not "
                                 "'cogvideox': its sampler has no SDE form here")
