"""Wan2.2 (TI2V-5B as text-to-video, the A14B two-expert model) and LTX-Video 0.9.x behind the VideoModel interface,
on tiny random pipelines saved by diffusers itself: the same checks as CogVideoX and Wan2.1 get, and the two experts'
boundary."""
import json
import os

import pytest
import torch

import diffusers
import dpo
import lora
import train
from diffusers_models import load_model
from model import UserError, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = ["wan2.2-5b", "wan2.2-14b", "ltx"]
SIZE = dict(size="64x64", frames=9)  # the 5B's VAE compresses 16x and its patches are 2: 64 is the smallest easy size


def pipeline(name, folder):
    """The diffusers pipeline from the same folder (Wan's transformers loaded by hand without `accelerate`)."""
    kwargs = {}
    if name.startswith("wan") and not diffusers.utils.is_accelerate_available():
        for part in ("transformer", "transformer_2"):
            if os.path.isdir(os.path.join(folder, part)):
                kwargs[part] = load_model(diffusers.WanTransformer3DModel, os.path.join(folder, part))
    pipe = (diffusers.LTXPipeline if name == "ltx" else diffusers.WanPipeline).from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(name, pipe, model, prompts, noise, steps=3):
    """The pipeline's latents after its last step, in our (B, C, T, H, W) layout; LTX packs them into tokens."""
    packed = name == "ltx"
    call = dict(prompt=prompts, latents=pipe._pack_latents(noise, 1, 1) if packed else noise, height=64, width=64,
                num_frames=9, num_inference_steps=steps, guidance_scale=model.cfg, max_sequence_length=model.max_length)
    if name == "wan2.2-14b":
        call["guidance_scale_2"] = model.cfg_low
    last = {}
    out = pipe(**call, output_type="np", callback_on_step_end=lambda p, i, t, kw: last.update(kw) or {}).frames
    theirs = pipe._unpack_latents(last["latents"], *model.latent_shape[1:], 1, 1) if packed else last["latents"]
    return theirs, torch.from_numpy(out) * 255


def seeded(model, seeds):
    return torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("name", NEW)
def test_our_sampler_reproduces_the_diffusers_pipeline_bit_for_bit(diffusers_folders, name):
    """All candidates and both CFG halves in one forward per step, and still the pipeline's numbers exactly."""
    model = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu")
    prompts, seeds = ["a red ball rolls", "a cat sleeps"], [3, 4, 5, 6]
    ours = model.sample(prompts, 2, seeds, steps=3)
    videos = model.decode(ours)
    assert ours.shape == (4, *model.latent_shape) and videos.shape == (4, 9, 64, 64, 3)
    theirs, frames = pipeline_latents(name, pipeline(name, diffusers_folders[name]), model,
                                      [p for p in prompts for _ in range(2)], seeded(model, seeds))
    assert torch.equal(ours, theirs)
    assert (videos.float() - frames).abs().max() <= 0.5 + 1e-3  # the same pixels rounded to uint8


def test_the_two_experts_split_sampling_and_training_at_the_pipelines_boundary(diffusers_folders):
    """WanPipeline: `transformer` at timesteps >= boundary_ratio x 1000 with guidance_scale, `transformer_2` below
    with guidance_scale_2. The DPO error of a batch with t on both sides is each sample through its own expert, and
    the gradient reaches only the expert that saw the sample."""
    model = build_model("wan2.2-14b", dit=diffusers_folders["wan2.2-14b"], **SIZE).to("cpu")
    experts = model.dit
    assert experts.boundary == 875.0 and (model.cfg, model.cfg_low) == (4.0, 3.0)
    seen = []
    hooks = [net.register_forward_hook(lambda mod, a, kw, out, tag=tag: seen.append((tag, int(kw["timestep"][0]))),
                                       with_kwargs=True)
             for tag, net in (("high", experts.transformer), ("low", experts.transformer_2))]
    model.sample(["a dog runs"], 2, [0, 1], steps=3)
    for h in hooks:
        h.remove()
    assert [tag for tag, _ in seen] == ["high", "low", "low"]  # timesteps 999 | 857, 600 around 875
    assert all((t >= 875) == (tag == "high") for tag, t in seen)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, *model.latent_shape, generator=g), torch.randn(2, *model.latent_shape, generator=g)
    y, mask = model.encode_prompts(["a", "b"])
    t = torch.tensor([950.0, 300.0])
    with torch.no_grad():
        both = model.errors(experts, x0, noise, t, y, mask)
        alone = [model.errors(experts, x0[i:i + 1], noise[i:i + 1], t[i:i + 1], y[i:i + 1], mask[i:i + 1])
                 for i in range(2)]
    assert torch.allclose(both, torch.cat(alone), rtol=1e-6)
    experts.zero_grad()
    model.errors(experts, x0[:1], noise[:1], t[:1], y[:1], mask[:1]).sum().backward()
    assert all(p.grad is None for p in experts.transformer_2.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.transformer.parameters())


def test_wan22_5b_trains_with_one_timestep_per_sample_the_pipelines_per_token_numbers(diffusers_folders):
    """TI2V-5B's pipeline gives every latent token its own timestep (all equal in text-to-video); the training
    forward gives one per sample, which must be the same prediction."""
    model = build_model("wan2.2-5b", dit=diffusers_folders["wan2.2-5b"], **SIZE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *model.latent_shape, generator=g)
    y, mask = model.encode_prompts(["a", "b"])
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        per_token = model.predict(model.dit, z, t, y)
    with torch.enable_grad():
        per_sample = model.predict(model.dit, z, t, y)
    assert torch.allclose(per_sample, per_token, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_an_adapter_checkpoint_loads_in_the_diffusers_pipeline(diffusers_folders, name, tmp_path):
    """The policy adapter as diffusers' load_lora_weights reads it; for the A14B one file per expert, the second
    loaded with load_into_transformer_2=True. The pipeline with the adapters then samples what our model does."""
    model = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu")
    config = lora.add_adapters(model.dit, 4, alpha=8)
    with torch.no_grad():
        for i, p in enumerate(lora.trainable(model.dit)):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    states = {n: lora.adapter_state(model.dit, n) for n in (lora.POLICY, lora.REFERENCE)}
    lora.save_files(str(tmp_path), states, {**config, "base": diffusers_folders[name]}, name)
    pipe = pipeline(name, diffusers_folders[name])
    pipe.load_lora_weights(str(tmp_path))
    if name == "wan2.2-14b":
        pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights_transformer_2.safetensors",
                               adapter_name="low_noise", load_into_transformer_2=True)
    seeds = [3, 4]
    ours = model.sample(["a red ball rolls"], 2, seeds, steps=3)
    theirs, _ = pipeline_latents(name, pipe, model, ["a red ball rolls"] * 2, seeded(model, seeds))
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    plain = build_model(name, dit=diffusers_folders[name], **SIZE).to("cpu").sample(["a red ball rolls"], 2, seeds,
                                                                                    steps=3)
    assert (plain - theirs).abs().max() > 1e-3 * theirs.abs().max()  # the adapters do change the output


def test_segments_follow_each_vae_first_frame_alone_then_its_time_factor(diffusers_folders):
    """DenseDPO's segments from the model's own VAE arithmetic: Wan2.2's VAE compresses time 4x like Wan2.1's, LTX's
    8x (this tiny LTX VAE 4x); the first frame is its own latent frame in both."""
    wan = build_model("wan2.2-5b", dit=diffusers_folders["wan2.2-5b"], size="64x64", frames=121)
    assert wan.latent_spans[:3] == [(0, 1), (1, 5), (5, 9)] and len(wan.latent_spans) == 31
    # 121 frames at 24 fps, 1 s segments: five, the last longer
    assert dpo.segments(wan.latent_spans, 24)[0] == ((0, 25), (0, 7))
    ltx = build_model("ltx", dit=diffusers_folders["ltx"], size="64x64", frames=17)
    assert ltx.time_factor == 4 and ltx.latent_spans == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]


def test_wrong_parts_are_one_line(diffusers_folders):
    with pytest.raises(UserError, match="has no transformer_2: wan2.2-14b needs the two experts"):
        build_model("wan2.2-14b", dit=diffusers_folders["wan"], **SIZE)
    with pytest.raises(UserError, match="is not the Wan2.2 VAE .is_residual false.: use --model wan"):
        build_model("wan2.2-5b", dit=diffusers_folders["wan"], **SIZE)
    with pytest.raises(UserError, match="--frames 12: ltx takes 4k.1 frames"):
        build_model("ltx", dit=diffusers_folders["ltx"], size="64x64", frames=12)
    with pytest.raises(UserError, match="--size 48x64: height and width must be positive multiples of 32"):
        build_model("wan2.2-5b", dit=diffusers_folders["wan2.2-5b"], size="48x64", frames=9)


# ----------------------------------------------------------------------------------------------------------
# Every method through train.py: step 1 at log 2 (policy == reference), a checkpoint, a resume


def run_args(name, folder, out, *extra):
    return ["--model", name, "--reward", "pixel", "--dit", folder, "--size", "64x64", "--frames", "9",
            "--sample-steps", "3", "-n", "3" if "grpo" in extra else "2", "--batch-size", "1", "--lr", "1e-3",
            "--out", str(out), "--prompts", os.path.join(ROOT, "prompts/train.txt"), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method", ["online", "dense", "grpo", "lora"])
def test_each_method_runs_resumes_and_starts_at_log_2(diffusers_folders, name, method, tmp_path):
    extra = {"online": [], "dense": ["--method", "dense"], "grpo": ["--method", "grpo", "--k", "0"],
             "lora": ["--lora-rank", "4", "--merge-lora"]}[method]
    args = run_args(name, diffusers_folders[name], tmp_path, *extra)
    train.main(args + ["--steps", "1"])
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    if method == "grpo":
        assert row["ratio"] == pytest.approx(1.0, abs=1e-4) and row["pairs"] == 3
    else:
        assert row["loss"] == pytest.approx(0.6931, abs=1e-3) and row["pairs"] == 1
    train.main(args + ["--steps", "2", "--resume"])
    ckpt = tmp_path / "checkpoint-2"
    assert os.path.isfile(ckpt / "diffusion_pytorch_model.safetensors")  # with --merge-lora too: the merged weights
    if name == "wan2.2-14b":
        assert os.path.isfile(ckpt / "transformer_2" / "diffusion_pytorch_model.safetensors")
    if method == "lora":  # the merged weights sample what the base with the adapters does
        adapted = build_model(name, dit=diffusers_folders[name], **SIZE)
        config = lora.read_config(str(ckpt))
        lora.add_adapters(adapted.dit, config["rank"], config["alpha"], 0.0, config["targets"])
        lora.load_adapter(str(ckpt / lora.ADAPTER_FILE), adapted.dit, name)
        merged = build_model(name, dit=str(ckpt), vae=diffusers_folders[name], text_encoder=diffusers_folders[name],
                             **SIZE)
        a, b = adapted.sample(["a cat"], 1, [5], steps=2), merged.sample(["a cat"], 1, [5], steps=2)
        assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_with_adapters_the_frozen_base_is_stored_in_the_compute_dtype(diffusers_folders):
    """--lora-rank with --dtype bf16: the frozen base in bf16 (what diffusers keeps in fp32 stays fp32), the adapters
    fp32. Under bf16 autocast the adapted matmuls ran in bf16 already, so the errors hardly move; the base's bytes
    halve."""
    model = build_model("wan2.2-14b", dit=diffusers_folders["wan2.2-14b"], **SIZE).to("cpu", torch.bfloat16)
    lora.add_adapters(model.dit, 4)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, *model.latent_shape, generator=g), torch.randn(2, *model.latent_shape, generator=g)
    t, (y, mask) = torch.tensor([950.0, 300.0]), model.encode_prompts(["a", "b"])
    with torch.no_grad():
        before = model.errors(model.dit, x0, noise, t, y, mask)
    nbytes = lambda: sum(p.numel() * p.element_size() for p in model.dit.parameters())
    full = nbytes()
    lora.store_base(model.dit, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.dit.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".lora_" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "scale_shift_table" in n or "time_embedder" in n)
    assert dtypes["transformer.blocks.0.ffn.net.2.base_layer.weight"] == torch.bfloat16
    assert nbytes() < 0.75 * full
    with torch.no_grad():
        after = model.errors(model.dit, x0, noise, t, y, mask)
    assert torch.allclose(after, before, rtol=2e-2)


@pytest.mark.slow
def test_ddp_keeps_both_experts_identical_across_ranks_and_fsdp_is_refused(diffusers_folders, tmp_path, capsys):
    """Two CPU ranks (gloo): a rank whose DPO timesteps all fall on one side of the boundary leaves the other expert
    without a gradient; DDP (find_unused_parameters) still ends every step with the same two experts on both ranks."""
    from test_parallel import same_ranks, torchrun

    from conftest import refusal

    args = run_args("wan2.2-14b", diffusers_folders["wan2.2-14b"], tmp_path / "ddp", "--steps", "4", "--save-every",
                    "2", "--batch-size", "2")
    torchrun(tmp_path, *args)
    same_ranks(str(tmp_path / "ddp"), 4)
    message = refusal(train.main, run_args("wan2.2-14b", diffusers_folders["wan2.2-14b"], tmp_path / "fsdp",
                                           "--steps", "1", "--fsdp"), capsys)
    assert message.startswith("error: --fsdp does not shard wan2.2-14b's two experts")


@pytest.mark.parametrize("name", NEW)
def test_eta_starts_the_aligned_copies_at_the_flow_forms_level(diffusers_folders, name):
    """DenseDPO's --eta on every backend: the copies start at the first sampling step whose noise share b / (a + b)
    is at most eta, and the scheduler's own noising at that step (UniPC's add_noise, FlowMatchEuler's scale_noise)
    is a x + b noise."""
    model = build_model(name, dit=diffusers_folders[name], **SIZE)
    for eta in (0.3, 0.7):
        scheduler = model.fresh_scheduler(20, "cpu")
        i = model.start_index(scheduler, eta)
        a, b = model.aligned_level(eta, 20)
        a_all, b_all = model.levels(scheduler)
        assert b / (a + b) <= eta + 1e-9 < b_all[i - 1] / (a_all[i - 1] + b_all[i - 1])
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(i)
        t = scheduler.timesteps[i: i + 1]
        one, zero = torch.ones(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1)
        assert float(model.noised(scheduler, one, zero, t).flatten()[0]) == pytest.approx(a, abs=1e-5)
        assert float(model.noised(scheduler, zero, one, t).flatten()[0]) == pytest.approx(b, abs=1e-5)


def test_ltx_grpo_rollout_without_noise_is_the_pipelines_euler_loop(diffusers_folders):
    """LTX ships FlowMatchEuler: GRPO's SDE rollout (grpo.sample_sde) with no noise is our sampler exactly, which is
    the pipeline's (test above)."""
    import grpo

    model = build_model("ltx", dit=diffusers_folders["ltx"], **SIZE).to("cpu")
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    traj, log_probs, sigmas, _ = grpo.sample_sde(model, ["a red ball rolls"], 2, gens, 1e-12, steps=3)
    assert sigmas[-1] == 0.0 and log_probs.shape == (3, 2)
    assert torch.allclose(traj[-1], model.sample(["a red ball rolls"], 2, [3, 4], steps=3), atol=1e-5)


def test_after_a_nan_stop_a_diffusers_checkpoint_is_recognised_as_good_or_bad(diffusers_folders, tmp_path):
    """The NaN stop names the last checkpoint whose weights are finite: in the diffusers layout too (before, only
    model.safetensors was read, so no wan/ltx checkpoint was ever found good), the second expert's file included."""
    from safetensors.torch import load_file, save_file

    import checkpoint

    model = build_model("wan2.2-14b", dit=diffusers_folders["wan2.2-14b"], **SIZE)
    model.save_weights(str(tmp_path))
    assert checkpoint.finite_weights(str(tmp_path))
    second = tmp_path / "transformer_2" / "diffusion_pytorch_model.safetensors"
    state = load_file(second)
    state["proj_out.bias"][0] = float("nan")
    save_file(state, second)
    assert not checkpoint.finite_weights(str(tmp_path))
