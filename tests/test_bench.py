"""bench.py: its CPU tables, its FLOP counts, the full-size models it builds, and its one-line errors."""
import json
import math

import pytest
import torch

import bench
import opensora as osr
import reward as rw
from inputs import UserError


def stdit3_forward_flops(cfg: dict, B: int, T: int, H: int, W: int) -> int:
    """Multiply-adds x 2 of one STDiT3 forward, by hand from the architecture (opensora.py): every linear,
    the patch conv, spatial attention over the H*W tokens of a frame, temporal attention over the T frames,
    cross-attention over all caption tokens (masked ones are computed too)."""
    C, L, Cc = cfg["hidden_size"], cfg["model_max_length"], cfg["caption_channels"]
    pt, ph, pw = cfg["patch_size"]
    T, S = math.ceil(T / pt), math.ceil(H / ph) * math.ceil(W / pw)
    N = T * S
    out = cfg["in_channels"] * (2 if cfg["pred_sigma"] else 1)
    lin = lambda tokens, cin, cout: 2 * tokens * cin * cout
    f = lin(B * N, cfg["in_channels"] * pt * ph * pw, C)  # patch embedding
    f += 2 * (lin(B, 256, C) + lin(B, C, C)) + lin(B, C, 6 * C)  # timestep, fps, t_block
    f += lin(B * L, Cc, C) + lin(B * L, C, C)  # caption projection
    per_block = (lin(B * N, C, 3 * C) + lin(B * N, C, C)  # self-attention projections
                 + lin(B * N, C, C) + lin(B * L, C, 2 * C) + 4 * B * N * L * C + lin(B * N, C, C)  # cross
                 + lin(B * N, C, int(C * cfg["mlp_ratio"])) + lin(B * N, int(C * cfg["mlp_ratio"]), C))
    f += cfg["depth"] * (2 * per_block + 4 * B * T * S * S * C + 4 * B * S * T * T * C)  # + spatial, temporal
    return f + lin(B * N, C, pt * ph * pw * out)


def count_forward(net, B: int, T: int, H: int, W: int, device="cpu") -> int:
    cfg = net.config
    x = torch.randn(B, cfg["in_channels"], T, H, W, device=device)
    y = torch.randn(B, 1, cfg["model_max_length"], cfg["caption_channels"], device=device)
    size = torch.full((B,), 256.0)  # height/width only set the position-embedding scale
    with bench.flop_counter() as counter, torch.no_grad():
        net(x, torch.full((B,), 500.0, device=device), y, mask=torch.ones(B, y.shape[2], dtype=torch.bool,
            device=device), fps=torch.full((B,), 24.0, device=device), height=size, width=size)
    return counter.get_total_flops()


def test_flop_counter_counts_attention_on_cpu_exactly():
    """The counter behind the MFU table: a real CPU forward of the tiny DiT gives the hand count, attention
    included (torch's FlopCounterMode alone does not count the CPU attention kernel)."""
    torch.manual_seed(0)
    net = osr.STDiT3(**bench.TINY_DIT)
    flops = count_forward(net, 2, 5, 8, 16)
    assert flops == stdit3_forward_flops(net.config, 2, 5, 8, 16) > 0


def test_full_size_models_on_the_meta_device():
    """--size full builds the published architectures: STDiT3 (1.21 B parameters), the v1.2 VAE, T5-v1.1-XXL's
    encoder and VideoScore's Idefics2; on the meta device this costs no memory. One 240p/51-frame sampling
    step (4 candidates x 2 CFG halves) is 108 TFLOP."""
    model, reward, _ = bench.build("full", "meta", "videoscore")
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert round(params(model.dit) / 1e9, 2) == 1.21
    assert round(params(model.text_encoder) / 1e9, 2) == 4.76
    assert round(params(reward.net) / 1e9, 2) == 8.27
    assert 350e6 < params(model.vae) < 450e6
    bench.set_point(model, bench.parse_point("240p:51"))
    assert model.latent_shape == (4, 15, 30, 53)
    flops = count_forward(model.dit, 8, *model.latent_shape[1:], device="meta")
    assert flops == stdit3_forward_flops(model.dit.config, 8, *model.latent_shape[1:])
    assert round(flops / 1e12) == 108


def test_cpu_tables(tmp_path, capsys):
    """a: every phase of the loop's step takes time, and there is no encode phase (the run's prompt cache);
    c: batched and sequential sampling give the same latents for the same seeds; d: skipped on a CPU with a line
    saying why; the machine is named."""
    out = tmp_path / "bench.json"
    bench.main(["--parts", "a,c,d", "--point", "16x32:17", "--steps", "3", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("Machine: ") and "torch " + torch.__version__ in printed
    assert "d. MFU: skipped, it needs a GPU" in printed
    r = json.loads(out.read_text())
    assert list(r["a"]["seconds"]) == ["sample", "decode", "reward", "DPO forward", "DPO backward", "optimizer"]
    assert all(v > 0 for v in r["a"]["seconds"].values())
    assert r["c"]["batched_s"] > 0 and r["c"]["sequential_s"] > 0 and r["c"]["max_abs_diff"] < 1e-4
    assert "| phase | seconds | share |" in printed and "| total |" in printed


def test_mfu_counts_the_sampler_and_the_dpo_step():
    """Part d's function on the tiny CPU model: sampling FLOPs are steps x one forward of the 2N batch (the hand
    count); the DPO step is policy forward + backward + reference forward, about 4 forwards of 2 videos, the
    same with --split-pair (its extra no-grad pass saves memory, it is not model FLOPs)."""
    model, reward, _ = bench.build("tiny", "cpu", "pixel")
    bench.set_point(model, bench.parse_point("16x32:17"))
    C, T, H, W = model.latent_shape
    one = stdit3_forward_flops(model.dit.config, 4, T, H, W)  # 2 candidates x 2 CFG halves
    dpo_one = stdit3_forward_flops(model.dit.config, 2, T, H, W)
    dpo = []
    for split in (False, True):
        r = bench.mfu(bench.make_run(model, reward, "pixel", "online", n=2, split=split), steps=3, peak_tflops=1.0)
        assert r["sample_tflop"] * 1e12 == pytest.approx(3 * one, rel=1e-6)
        assert 3.5 * dpo_one < r["dpo_tflop"] * 1e12 < 4.5 * dpo_one
        assert r["sample_mfu"] > 0 and r["dpo_mfu"] > 0 and r["sample_s"] > 0
        dpo.append(r["dpo_tflop"])
    assert dpo[1] == pytest.approx(dpo[0], rel=1e-6)


def test_steps_are_the_training_loops_own(monkeypatch):
    """bench times train.py's method-table entries, not copies of them: the online step calls online_pairs then
    dpo_step on its run (which holds a reference) and its optimizer step moves the weights; the ReFL step calls
    refl_backward on a run built with --method refl, which holds no reference (Fig. 7); the GRPO step calls
    grpo_backward on a run that holds the reference of its KL term."""
    calls = []
    spy = lambda name, f: lambda run, *a: calls.append((name, run)) or f(run, *a)
    for name in ("online_pairs", "dpo_step"):
        monkeypatch.setattr(bench.train, name, spy(name, getattr(bench.train, name)))
    for method, name in (("refl", "refl_backward"), ("grpo", "grpo_backward")):
        entry = bench.train.METHODS[method]
        monkeypatch.setitem(bench.train.METHODS, method, entry._replace(backward=spy(name, entry.backward)))
    model, reward, _ = bench.build("tiny", "cpu", "pixel")
    bench.set_point(model, bench.parse_point("16x32:17"))
    online = bench.make_run(model, reward, "pixel", "online", n=2)
    before = [p.detach().clone() for p in model.dit.parameters()]
    bench.method_step(online, bench.Clock(model.device), 2)
    assert calls == [("online_pairs", online), ("dpo_step", online)] and online.ref is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.dit.parameters()))
    refl = bench.make_run(model, reward, "pixel", "refl", n=2)
    bench.method_step(refl, bench.Clock(model.device), 2)
    assert calls[2:] == [("refl_backward", refl)] and refl.ref is None
    grpo_run = bench.make_run(model, reward, "pixel", "grpo", n=2)
    bench.method_step(grpo_run, bench.Clock(model.device), 2)
    assert calls[3:] == [("grpo_backward", grpo_run)] and grpo_run.ref is not None and grpo_run.examples == 2


class TiedReward(rw.PixelReward):
    def score(self, videos, prompts, fps=None):
        return {d: torch.zeros(len(prompts)) for d in self.dims}


def test_a_tied_step_is_reported_not_paired():
    """The loop skips a prompt whose candidates tie; the benchmark then has no DPO step to time and says so,
    instead of pairing candidates the loop would not have paired."""
    model, reward, _ = bench.build("tiny", "cpu", "pixel")
    bench.set_point(model, bench.parse_point("16x32:17"))
    run = bench.make_run(model, TiedReward(), "pixel", "online", n=2)
    clock = bench.Clock(model.device)
    with pytest.raises(UserError, match="tied"):
        bench.method_step(run, clock, 1)
    assert run.ties == 1 and "DPO forward" not in clock.seconds


@pytest.mark.slow
def test_refl_memory_grows_with_frames_and_exceeds_online(tmp_path, capsys):
    """b on a CPU (one fresh process per measurement): ReFL backpropagates through the VAE decoder, so its step
    needs more memory with more frames and more than OnlineVPO's (paper Fig. 7). GRPO's column sits between them:
    its backward holds all N guided videos' activations, DPO's only a winner's and a loser's."""
    out = tmp_path / "mem.json"
    bench.main(["--parts", "b", "--points", "32x64:17,32x64:51", "--device", "cpu", "--json", str(out)])
    b = json.loads(out.read_text())["b"]
    step = lambda cell: cell["peak"] - cell["before"]  # what the step itself adds (activations, gradients)
    refl, online = b["ReFL"], b["OnlineVPO"]
    assert step(refl["32x64:51"]) > 1.5 * step(refl["32x64:17"]) > 0
    assert step(refl["32x64:51"]) > step(online["32x64:51"]) > 0
    assert step(b["GRPO"]["32x64:51"]) > 1.5 * step(online["32x64:51"])
    assert "| 32x64:51 |" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_column_holds_less_than_full_fine_tuning(tmp_path, capsys):
    """--lora-rank on the medium STDiT3 (70 M parameters): full fine-tuning holds the fp32 policy, its AdamW moments
    and the fp32 reference copy (12 B per parameter over the model itself); LoRA adds only the adapters' share.
    Measured in fresh processes, so the difference has to be most of those 12 B x 70 M = 840 MB."""
    out = tmp_path / "mem.json"
    bench.main(["--size", "medium", "--parts", "b", "--points", "8x8:17", "--lora-rank", "16", "--device", "cpu",
                "--json", str(out)])
    b = json.loads(out.read_text())["b"]
    full, low = b["OnlineVPO"]["8x8:17"], b["OnlineVPO LoRA"]["8x8:17"]
    assert full["peak"] - low["peak"] > 600 and full["before"] - low["before"] > 600
    assert "OnlineVPO LoRA r=16" in capsys.readouterr().out


def test_random_videoscore_scores_through_reward_py():
    """The full-size reward: reward.VideoScore's own preprocessing and forward over a network built from a config
    (here a tiny one), with image tokens where Idefics2 expects them; score_float keeps gradients (ReFL)."""
    config = dict(model_type="idefics2", image_token_id=300, num_labels=5,
                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=4),
                  perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                                        resampler_head_dim=8, num_key_value_heads=1),
                  text_config=dict(model_type="mistral", vocab_size=301, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=0))
    reward = bench.RandomVideoScore("cpu", config, dict(bench.VIDEOSCORE_PROC, size={"shortest_edge": 16,
                                                                                     "longest_edge": 32}),
                                    dtype=torch.float32)
    videos = torch.randint(0, 256, (2, 6, 24, 40, 3), dtype=torch.uint8)
    scores = reward.score(videos, ["a dog", "a cat"])
    assert list(scores) == reward.dims and all(v.shape == (2,) and torch.isfinite(v).all() for v in scores.values())
    x = videos.float().requires_grad_(True)
    reward.score_float(x, ["a dog", "a cat"])["temporal_consistency"].sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("argv, message", [
    (["--parts", "a,x"], "--parts 'a,x': unknown part; choose from a, b, c, d"),
    (["--parts", "ab"], "--parts 'ab': unknown part"),
    (["--points", "240q:51"], "bad point '240q:51'"),
    (["--point", "16x30:9"], "multiples of 8"),
    (["--mfu-points", "240p"], "bad point '240p'"),
    (["--points", "32x64:9"], "needs 1 or at least 17 frames"),
    (["--n", "1"], "--n must be at least 2"),
    (["--lora-rank", "-1"], "--lora-rank must be at least 1"),
    (["--size", "full", "--device", "cpu"], "--size full needs a GPU"),
])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--device", "cpu"] if "--device" not in argv else argv)
    code = e.value.code  # a string: Python prints it to stderr and exits with status 1
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code


def test_computed_lora_memory_of_the_published_denoisers(capsys):
    """--lora-memory: parameters counted on the meta device; an adapter is r (d_in + d_out) per adapted linear."""
    bench.main(["--lora-memory", "64"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert [rows[k][:2] for k in rows] == [["1.21 B", "95.0 M"], ["1.69 B", "66.4 M"], ["1.42 B", "87.5 M"],
                                           ["14.29 B", "306.7 M"], ["5.00 B", "161.2 M"], ["28.58 B", "613.4 M"],
                                           ["1.92 B", "95.4 M"]]
    # Wan2.2-TI2V-5B by hand: 30 blocks x 64 x (8 x (3072 + 3072) + 2 x (3072 + 14336)) = 161.2 M; the A14B two
    # Wan2.1-14B-shaped experts, each with its own adapters
    # STDiT3-XL/2 by hand: 56 blocks x 64 x (4608 + 2304 + 2304 + 3456 + 2304 + 5760 + 5760) = 94.96 M
    assert rows["Wan2.1-T2V-14B"][3] == "285.8"  # 20 B per parameter: fp32 policy, grads, AdamW, fp32 reference


@pytest.mark.slow
def test_counted_flops_of_the_diffusers_models_at_full_size(capsys):
    """--model-flops builds every diffusers denoiser at full size on the meta device. Wan2.1-1.3B at 480x832x81 by
    hand: 32,760 tokens, 30 blocks of width 1536 (FFN 8960): linear layers 2 x tokens x (6 d^2 + 2 d ffn) per block,
    self-attention 2 x 2 x tokens^2 x d, cross-attention to 512 text tokens 2 x 2 x tokens x 512 x d."""
    bench.main(["--model-flops"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    tokens, d, ffn, layers = 21 * 30 * 52, 1536, 8960, 30
    by_hand = layers * (2 * tokens * (6 * d * d + 2 * d * ffn) + 4 * tokens ** 2 * d + 4 * tokens * 512 * d) / 1e12
    assert float(rows["wan (Wan2.1-T2V-1.3B)"][1]) == pytest.approx(by_hand, rel=0.01)
    assert set(rows) == {"wan (Wan2.1-T2V-1.3B)", "wan2.2-5b (TI2V-5B)", "wan2.2-14b (one A14B expert)",
                         "wan2.2-14b at 480p", "ltx (LTX-Video 0.9)"}
