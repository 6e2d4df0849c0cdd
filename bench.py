"""Scale and speed of one OnlineVPO step, with random weights (nothing is downloaded).

    python bench.py                                   # CPU: tiny models, parts a-c, under a minute
    python bench.py --size full                       # GPU: Open-Sora v1.2 at its published size, all parts
    python bench.py --size full --parts d --steps 10  # GPU: only the MFU table, 10 sampling steps per point

Parts (--parts a,b,c,d):
  a  seconds per phase of one OnlineVPO step: sample (N candidates, one batched call), decode, reward,
     DPO forward (policy + reference), DPO backward, optimizer;
  b  peak memory of an OnlineVPO step vs a GRPO step (grpo.py) vs a ReFL step across (resolution, frames) points,
     as the paper's Fig. 7;
  c  N candidates sampled in one batched call vs N calls of one;
  d  GPU only: model FLOPs utilisation (MFU) of sampling and of the DPO step.
The step is train.py's own: the method's entry in train.METHODS (train.online_pairs + train.dpo_step for
OnlineVPO, grpo.grpo_backward for GRPO, baselines.refl_backward for ReFL) over a run.Run built from train.py's
flags around the random models, so its memory levers are train.py's defaults: gradient checkpointing, the
reference stored like the policy (fp32), the text encoder freed once every prompt is encoded. The loop's phase
clock is bench's for the measured steps. Tables print as markdown with the machine named.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import sys
import time

from inputs import (ANY, UserError, check_domains, command, known_device, refuse_empty, writable_file,
                    write_atomically)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import opensora as osr
import train
import videoscore as rw
from model import ByteTokenizer, OpenSoraModel, tiny_t5
from reward import PixelReward
from run import Run

PARTS = ("a", "b", "c", "d")
PROMPTS = ["a red fox trotting through fresh snow in a pine forest at dawn",  # the run's prompts; c samples
           "waves crashing against black volcanic rocks under a stormy sky"]  # the first

# ----------------------------------------------------------------------------------------------------------
# Models with random weights. "full" is Open-Sora v1.2 as published (hpcai-tech/OpenSora-STDiT-v3 config.json,
# the v1.2 VAE, DeepFloyd/t5-v1_1-xxl's shape); "tiny" is the same classes, small, for a CPU.

FULL_DIT = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                pred_sigma=True, caption_channels=4096, model_max_length=300, input_sq_size=512, qk_norm=True)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_DIT = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=64, depth=2, num_heads=4, pred_sigma=True,
                caption_channels=32, model_max_length=48, input_sq_size=32, qk_norm=True)
# "medium": the tiny models around a STDiT3 whose weights and AdamW state outweigh a small step's activations on a
# CPU (70 M parameters), for the full vs LoRA memory columns (--lora-rank)
MEDIUM_DIT = dict(TINY_DIT, hidden_size=512, depth=8, num_heads=8)
# The published denoisers' shapes (their Hub config.json), for the computed full vs LoRA memory table (--lora-memory)
COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=30,
                    text_embed_dim=4096, time_embed_dim=512, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2)  # THUDM/CogVideoX-2b transformer/config.json
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}  # Wan-AI/Wan2.1-T2V-14B-Diffusers
WAN22_5B = {**WAN_1_3B, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48,
            "out_channels": 48}  # Wan-AI/Wan2.2-TI2V-5B-Diffusers (30 layers, dim 3072)
# Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of WAN_14B's shape, boundary_ratio 0.875
LTX_2B = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
              attention_head_dim=64, cross_attention_dim=2048, num_layers=28,
              caption_channels=4096)  # Lightricks/LTX-Video (0.9.x, 2B) transformer/config.json
# The VAE's decoder is what ReFL backpropagates through; it is big enough here that its activations show in b.
TINY_VAE = dict(micro_frame_size=17, micro_batch_size=4,
                spatial_config=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                    norm_num_groups=8, block_out_channels=[16, 16, 16],
                                    down_block_types=["DownEncoderBlock2D"] * 3,
                                    up_block_types=["UpDecoderBlock2D"] * 3),
                temporal_config=dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=8, num_res_blocks=1,
                                     channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                                     num_groups=4))
# VideoScore's network: Mantis-8B-Idefics2 = SigLIP-so400m at 980 px, a perceiver to 64 tokens per frame,
# Mistral-7B, and a 5-way regression head (reward.py). Image token ids as Idefics2's tokenizer adds them.
VIDEOSCORE_CONFIG = dict(
    model_type="idefics2", image_token_id=32001, num_labels=5,
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=980, patch_size=14),
    perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96,
                          num_key_value_heads=4),
    text_config=dict(model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                     max_position_embeddings=32768, pad_token_id=0))
VIDEOSCORE_PROC = {"size": {"shortest_edge": 378, "longest_edge": 980}, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "rescale_factor": 1 / 255}


@contextlib.contextmanager
def building(device, dtype: torch.dtype = torch.float32):
    """Create modules directly on `device` in `dtype`: an 8B model initialises in seconds on a GPU, and on the
    meta device it takes no memory at all (parameter counts)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


class RandomVideoScore(rw.VideoScore):
    """reward.VideoScore (its frame selection, resize, prompt and forward) over a network of VideoScore's
    architecture with random bf16 weights: the real reward's cost, not its scores. No tokenizer file either:
    the image tokens are exact, the prompt text gets one id per 4 characters (about a Llama tokenizer's count)."""

    def __init__(self, device, config: dict = VIDEOSCORE_CONFIG, proc: dict = VIDEOSCORE_PROC, offload: bool = False,
                 dtype: torch.dtype = torch.bfloat16):
        from transformers import Idefics2Config

        self.device, self.max_frames, self.batch_size, self.offload = torch.device(device), 16, 4, offload
        cfg = Idefics2Config.from_dict(config)
        cfg.perceiver_config.rms_norm_eps = cfg.text_config.rms_norm_eps  # as reward.load_videoscore
        cfg.perceiver_config.hidden_size = cfg.text_config.hidden_size
        with building(device, dtype):
            self.net = rw.Idefics2ForSequenceClassification(cfg).eval().requires_grad_(False)
        self.n_latents, self.proc = cfg.perceiver_config.resampler_n_latents, proc
        special = {rw.FAKE: cfg.image_token_id - 1, rw.IMAGE: cfg.image_token_id}  # text ids stay below both
        split = re.compile(f"({re.escape(rw.FAKE)}|{re.escape(rw.IMAGE)})")

        def tokenize(text: str) -> list[int]:
            ids = [1]  # BOS
            for piece in split.split(text):
                ids += [special[piece]] if piece in special else \
                    [3 + sum(piece[i:i + 4].encode()) % (special[rw.FAKE] - 3) for i in range(0, len(piece), 4)]
            return ids

        self.tokenize = tokenize
        if offload:
            self.net.to("cpu")


def build(size: str, device: str, reward_name: str, seed: int = 0, reward_offload: bool = False):
    """(model, reward, reward label) with random weights; the model's size is set per point later."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    if size == "full":
        from transformers import T5Config, T5EncoderModel

        with building(dev):
            dit = osr.STDiT3(**FULL_DIT)  # the policy stays fp32 (autocast computes in bf16)
        with building(dev, dtype):
            vae = osr.OpenSoraVAE()
            t5 = T5EncoderModel(T5Config(**T5_XXL)).eval()
        # a byte-level tokenizer stands in for T5's sentencepiece (no files); the encoder always sees 300 tokens
        model = OpenSoraModel("opensora", dit, vae, t5, ByteTokenizer(), 240, 426, 51, max_length=300)
    else:
        dit = osr.STDiT3(**(MEDIUM_DIT if size == "medium" else TINY_DIT))
        vae = osr.OpenSoraVAE(**TINY_VAE)
        model = OpenSoraModel("bench-tiny", dit, vae, tiny_t5(TINY_DIT["caption_channels"]), ByteTokenizer(),
                           32, 64, 17, sample_steps=10, max_length=TINY_DIT["model_max_length"])
    model.to(dev, dtype)
    model.set_grad_checkpointing(True)  # lever 1 (train.py's default)
    if reward_name == "videoscore":
        return model, RandomVideoScore(dev, offload=reward_offload), "VideoScore architecture, random weights"
    return model, PixelReward(device=dev), "PixelReward (pixel formula, no network)"


def set_point(model: OpenSoraModel, point: tuple):
    _, model.height, model.width, model.frames = point


# ----------------------------------------------------------------------------------------------------------
# Clock and FLOP counter

# FlopCounterMode knows the CUDA attention kernels but not the CPU one: count it with the same formulas.
aten = torch.ops.aten
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}


def flop_counter() -> FlopCounterMode:
    """Matmul, convolution and attention FLOPs of everything run inside (forward and backward)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Clock:
    """Seconds per phase of a step, and with count=True its FLOPs too (FlopCounterMode on the real call).
    On a GPU both ends of a phase synchronize, so each phase is charged for its own kernels."""

    def __init__(self, device: torch.device, count: bool = False):
        self.device, self.count = device, count
        self.seconds, self.flops = {}, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        counter = flop_counter() if self.count else contextlib.nullcontext()
        sync(self.device)
        tic = time.perf_counter()
        with counter:
            yield
        sync(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - tic
        if self.count:
            self.flops[phase] = self.flops.get(phase, 0) + counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# The two steps: train.py's own loop functions over a run.Run that holds bench's prebuilt models


def make_run(model: OpenSoraModel, reward, reward_name: str, method: str, n: int, seed: int = 0,
             split: bool = False, lora_rank: int = 0) -> Run:
    """The training job as train.py builds it from its flags, over bench's random model and reward: its reference
    G_ref (none for ReFL: Fig. 7 compares that memory too), AdamW, and train.py's default memory levers
    (gradient checkpointing, the reference stored like the policy, every prompt encoded once and the text encoder
    freed). One prompt per step (--batch-size 1, --sample-batch 1); nothing is written (out None). split:
    train.py --split-pair (for GRPO --grpo-micro-batch 1). lora_rank > 0: train.py --lora-rank, adapters on the
    model (the reference a second adapter, no copy)."""
    split_flags = {"grpo": ["--grpo-micro-batch", "1"], "refl": []}.get(method, ["--split-pair"])  # ReFL: no pair
    args = train.parse_args(["--method", method, "--batch-size", "1", "--seed", str(seed), "--reward", reward_name,
                             "--device", str(model.device),
                             # the name only passes run.check_args: the prebuilt model is what runs
                             "--model", "opensora" if model.name == "opensora" else "tiny"]
                            + (["--n", str(n)] if method != "refl" else [])  # ReFL scores one video per prompt
                            + (split_flags if split else [])
                            + (["--lora-rank", str(lora_rank)] if lora_rank else [])
                            # GRPO: every measured step samples its own rollouts (a round's later steps would reuse
                            # the warm-up's, sampled at another point); the round's second trajectory is latents only
                            + (["--grpo-steps-per-round", "1"] if method == "grpo" else []))
    args.out = None
    method = train.entry(args)
    run = Run(args, method, model=model, reward=reward, prompts=PROMPTS)
    if method.start:  # GRPO's store of a sampling round's rollouts
        method.start(run)
    return run


@contextlib.contextmanager
def measured(run: Run, clock: Clock, steps: int):
    """The loop functions time their phases with run.clock and sample with model.sample_steps: bench's clock
    and step count for the duration."""
    old = run.model.sample_steps
    run.clock, run.model.sample_steps = clock, steps
    try:
        yield
    finally:
        run.model.sample_steps = old


def method_step(run: Run, clock: Clock, steps: int):
    """One step of train.py's loop for the run's --method, through its entry in train.METHODS (Alg. 1 lines 3-10
    for OnlineVPO: N candidates per prompt in one batched call, decoded, scored, best vs worst, the Diffusion-DPO
    loss against the reference and its backward; GRPO's SDE rollout and clipped update; ReFL's one step with
    gradients into the reward), then the optimizer step."""
    backward = train.METHODS[run.args.method].backward
    with measured(run, clock, steps):
        for counters, last in run.batches():
            backward(run, counters, last)
        if not run.examples:  # the loop skips a tie; the benchmark has nothing to time then, and says so
            raise UserError(f"the {run.args.n} candidates' rewards tied (or were NaN): this step has nothing to "
                            "train on and no update to measure; try another --seed")
        with clock("optimizer"):
            run.optimizer_step()


# ----------------------------------------------------------------------------------------------------------
# The parts


def phase_breakdown(run: Run, steps: int) -> dict:
    """a: seconds per phase of one OnlineVPO step, after a warm-up step (1 sampling step, the next prompt)."""
    method_step(run, Clock(run.model.device), 1)
    clock = Clock(run.model.device)
    method_step(run, clock, steps)
    return clock.seconds


def batched_vs_sequential(model, n: int, steps: int) -> dict:
    """c: one call sampling N candidates (one batch of 2N per step) vs N calls of one; same seeds, same latents."""
    prompt, seeds = PROMPTS[:1], list(range(n))
    model.sample(prompt, n, seeds, steps=1)  # warm-up
    model.sample(prompt, 1, seeds[:1], steps=1)
    sync(model.device)
    tic = time.perf_counter()
    batched = model.sample(prompt, n, seeds, steps=steps)
    sync(model.device)
    mid = time.perf_counter()
    sequential = torch.cat([model.sample(prompt, 1, [s], steps=steps) for s in seeds])
    sync(model.device)
    end = time.perf_counter()
    return dict(batched_s=mid - tic, sequential_s=end - mid, ratio=(mid - tic) / (end - mid),
                max_abs_diff=float((batched.float() - sequential.float()).abs().max()))


def mfu(run: Run, steps: int, peak_tflops: float) -> dict:
    """d: FLOPs counted on a warm-up step (1 sampling step: one forward of the 2N batch), then a timed step.
    Model FLOPs of the DPO step exclude what only saves memory (PaLM's MFU): the gradient-checkpointing recompute
    and --split-pair's no-grad pass, one policy forward each, i.e. half of the counted DPO forward (policy and
    reference forward on the same batch)."""
    count = Clock(run.model.device, count=True)
    method_step(run, count, 1)
    clock = Clock(run.model.device)
    method_step(run, clock, steps)
    f, s = count.flops, clock.seconds
    sample_flops = f["sample"] * steps
    extra = int(run.model.dit.grad_checkpointing) + int(run.args.split_pair)
    dpo_flops = f["DPO forward"] + f["DPO backward"] - extra * f["DPO forward"] / 2
    dpo_s = s["DPO forward"] + s["DPO backward"]
    return dict(sample_tflop=sample_flops / 1e12, sample_s=s["sample"],
                sample_mfu=sample_flops / s["sample"] / (peak_tflops * 1e12),
                dpo_tflop=dpo_flops / 1e12, dpo_s=dpo_s, dpo_mfu=dpo_flops / dpo_s / (peak_tflops * 1e12))


METHODS = {"OnlineVPO": "online", "GRPO": "grpo", "ReFL": "refl"}  # b's columns: train.py --method
LORA = "OnlineVPO LoRA"  # b's column with --lora-rank: the online method with adapters
MEMORY_STEPS = 2  # peak memory does not depend on the number of sampling steps (no gradients while sampling)


def gpu_peak(step) -> dict | str:
    """Peak allocated GB (10^9 bytes) of step() after a warm-up step (optimizer state, kernel workspaces), and
    what was allocated before it (weights, optimizer state, the reward); 'OOM' as Fig. 7 reports ReFL."""
    try:
        step()
        sync(torch.device("cuda"))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return dict(peak=torch.cuda.max_memory_allocated() / 1e9, before=before / 1e9)
    except torch.cuda.OutOfMemoryError:
        return "OOM"


def gpu_memory(run: Run, points: list) -> dict:
    """b on a GPU, in this process: one step of the run's method at every point."""
    out = {}
    for point in points:
        set_point(run.model, point)
        out[point[0]] = gpu_peak(lambda: method_step(run, Clock(run.model.device), MEMORY_STEPS))
        run.opt.zero_grad(set_to_none=True)  # after an OOM too
        free_memory(run.model.device)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


WARM_POINT = "8x8:17"  # the smallest step: it faults in the code of every kernel and creates the AdamW state


def child_memory(spec: dict, conn):
    """b on a CPU, in a fresh process per (method, point): after a warm-up step at WARM_POINT, the process's peak
    resident memory and its resident memory just before the step, both over what it held before building anything
    (torch and this file imported). A CPU has no allocator peak: the peak is the kernel's high-water mark."""
    try:
        start = rss_bytes()
        model, reward, _ = build(spec["size"], "cpu", spec["reward"], spec["seed"])
        lora = spec["method"] == LORA
        run = make_run(model, reward, spec["reward"], "online" if lora else METHODS[spec["method"]], spec["n"],
                       spec["seed"], spec["split"], spec["lora_rank"] if lora else 0)
        set_point(model, parse_point(WARM_POINT))
        method_step(run, Clock(model.device), MEMORY_STEPS)
        set_point(model, parse_point(spec["point"]))
        gc.collect()
        before = rss_bytes()
        method_step(run, Clock(model.device), MEMORY_STEPS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        conn.send(dict(peak=(peak - start) / 1e6, before=(before - start) / 1e6))
    except Exception as e:  # noqa: BLE001 - reported in the table's cell
        conn.send(f"failed: {type(e).__name__}: {e}")


def memory_columns(args) -> list[str]:
    return ["OnlineVPO"] + ([LORA] if args.lora_rank else []) + ["GRPO", "ReFL"]


def cpu_memory(args, points: list) -> dict:
    """One fresh process per (method, point), forked from a server that has imported this file once (a fresh
    interpreter would spend seconds importing torch and diffusers per measurement); as many at a time as the
    cores allow, since each measures only itself."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    import bench as this  # by name, so the server can preload it whether this file runs as a script or not

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["bench"])

    def measure(method: str, point: tuple):
        spec = dict(method=method, point=point[0], size=args.size, reward=args.reward, seed=args.seed, n=args.n,
                    split=args.split_pair, lora_rank=args.lora_rank)
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=this.child_memory, args=(spec, send))
        proc.start()
        send.close()
        try:
            value = receive.recv()
        except EOFError:  # the process died without a word
            value = None
        proc.join()
        if value is None:  # SIGKILL: the kernel's OOM killer
            value = "OOM" if proc.exitcode == -9 else f"failed: exit code {proc.exitcode}"
        return value

    methods = memory_columns(args)
    jobs = [(method, point) for method in methods for point in points]
    with ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // torch.get_num_threads())) as pool:
        values = list(pool.map(lambda job: measure(*job), jobs))
    out = {method: {} for method in methods}
    for (method, point), value in zip(jobs, values):
        out[method][point[0]] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_point(text: str) -> tuple:
    """'240p:51' (an Open-Sora resolution name, its 9:16 aspect as in the paper) or '64x128:17' (pixels)."""
    try:
        res, frames = text.strip().split(":")
        frames = int(frames)
        if "x" in res:
            h, w = (int(v) for v in res.split("x"))
        else:
            h, w = osr.image_size(res, "9:16")
    except ValueError:
        raise UserError(f"bad point {text!r}: write RESOLUTION:FRAMES, e.g. 240p:51 or 64x128:17 "
                        f"(resolutions: {', '.join(osr.RESOLUTIONS)})") from None
    if frames < 1 or h <= 0 or w <= 0 or ("x" in res and (h % 8 or w % 8)):
        raise UserError(f"bad point {text!r}: frames must be >= 1, pixel sizes positive multiples of 8")
    if 1 < frames < 17:  # opensora.timestep_transform: frames // 17 * 5 = 0 latent frames, t = 1000 -> NaN
        raise UserError(f"bad point {text!r}: Open-Sora's timestep shift needs 1 or at least 17 frames")
    return (text.strip(), h, w, frames)


DEFAULTS = {  # (a/c point, b points, d points)
    "tiny": ("64x128:51", "32x64:17,32x64:34,32x64:51,64x128:51", "32x64:17"),
    "full": ("240p:51", "240p:51,360p:51,480p:51,720p:51,720p:68", "240p:51,720p:68"),
}
DEFAULTS["medium"] = DEFAULTS["tiny"]
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]  # dense bf16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "medium", "full"], help="tiny: small random models "
                   "(CPU); medium: tiny with a 70 M-parameter STDiT3, whose weights and AdamW state dominate a CPU "
                   "step's memory (for --lora-rank); full: Open-Sora v1.2's published sizes, random weights (GPU)")
    p.add_argument("--parts", default=",".join(PARTS), help="which tables: any of a,b,c,d (default: all)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (paper: 4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps in a, c, d (default: the model's; "
                   "full 30 as the paper, tiny 10). b always uses 2: sampling has no gradients, memory is flat")
    p.add_argument("--point", default=None, help="RESOLUTION:FRAMES of parts a and c (full 240p:51, tiny 64x128:51)")
    p.add_argument("--points", default=None, help="comma-separated points of part b (full 240p:51,...,720p:68)")
    p.add_argument("--mfu-points", default=None, help="comma-separated points of part d (full 240p:51,720p:68)")
    p.add_argument("--reward", default=None, choices=["pixel", "videoscore"], help="videoscore: its architecture "
                   "with random weights (default for full); pixel: reward.PixelReward (default for tiny)")
    p.add_argument("--reward-offload", action="store_true", help="keep the reward on the CPU except while it "
                   "scores (train.py --reward-offload)")
    p.add_argument("--split-pair", action="store_true", help="the DPO step as train.py --split-pair (winners' and "
                   "losers' backward one after the other) in parts a, b and d; in b GRPO's update one video at a "
                   "time (train.py --grpo-micro-batch 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's dense bf16 TFLOP/s for MFU "
                   "(default: looked up for H200/H100/A100)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--lora-rank", type=int, default=0, help="b gets a column for OnlineVPO with LoRA adapters of "
                   "this rank (train.py --lora-rank), next to full fine-tuning")
    p.add_argument("--lora-memory", type=int, default=None, metavar="RANK", help="only print the computed table of "
                   "policy + gradients + AdamW + reference memory, full fine-tuning vs LoRA of this rank, for the "
                   "published denoisers (meta device: no memory, seconds)")
    p.add_argument("--model-flops", action="store_true", help="only print the counted FLOPs of sampling and of a DPO "
                   "step for the diffusers models at their full default shapes (meta device; a minute on a CPU)")
    return p


DOMAINS = [  # inputs.check_domains, before any model is built; check_args then the combinations
    ("parts", lambda v, a: all(x.strip() in PARTS for x in v.split(",")), "{v!r}: unknown part; choose from " + ", ".join(PARTS)),
    ("n", lambda v, a: v >= 2, "must be at least 2: a preference pair needs two candidates"),
    ("steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("lora_rank", lambda v, a: v >= 0, "must be at least 1 (0: no LoRA column), got {v}"),
    ("lora_memory", lambda v, a: v >= 1, "must be a rank of at least 1, got {v}"),
    ("peak_tflops", lambda v, a: math.isfinite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("device", lambda v, a: known_device(v), "{v!r}: not a device torch sees here (cpu; cuda or cuda:I for a "
     "visible GPU)"),
    *[(flag, ANY, "") for flag in ("point", "points", "mfu_points", "seed", "json")],  # points: parse_point
]


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    args.reward = args.reward or ("videoscore" if args.size == "full" else "pixel")
    point, points, mfu_points = DEFAULTS[args.size]
    args.point, args.points = args.point or point, args.points or points
    args.mfu_points = args.mfu_points or mfu_points
    return args


def check_args(args) -> dict:
    parts = [p.strip() for p in args.parts.split(",")]  # each one of PARTS: DOMAINS
    device = torch.device(args.device)
    if args.size == "full" and device.type != "cuda":
        raise UserError("--size full needs a GPU (tens of GB, hours on a CPU); on a CPU use --size tiny")
    if args.reward == "videoscore" and args.size != "full":
        raise UserError("--reward videoscore builds the 8B network: use it with --size full")
    peak = args.peak_tflops
    if "d" in parts and device.type == "cuda" and peak is None:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
        if peak is None:
            raise UserError(f"unknown peak bf16 TFLOP/s for {name!r}: pass --peak-tflops")
    return dict(parts=parts, device=device, peak=peak, point=parse_point(args.point),
                points=[parse_point(p) for p in args.points.split(",")],
                mfu_points=[parse_point(p) for p in args.mfu_points.split(",")])


def lora_memory(rank: int) -> str:
    """Computed, not measured: what the policy, its gradients, AdamW's two moments and the reference take in train.py
    for the published denoisers, full fine-tuning vs --lora-rank. Parameters are counted on the meta device. Full:
    fp32 policy 4 B, gradients 4 B, moments 8 B and an fp32 reference copy 4 B per parameter. LoRA: the frozen
    fp32 network 4 B per parameter once (2 B in the last column: --dtype bf16 stores the frozen base in bf16,
    lora.store_base; the few modules diffusers keeps in fp32 are not counted apart), plus per adapter number the
    policy adapter, its gradient, its moments and the reference adapter (4 + 4 + 8 + 4 B). Activations, the VAE,
    the text encoder and the reward come on top."""
    import diffusers

    import lora
    from diffusers_models import TwoExperts

    nets = {"Open-Sora v1.2 (STDiT3-XL/2)": lambda: osr.STDiT3(**FULL_DIT),
            "CogVideoX-2B": lambda: diffusers.CogVideoXTransformer3DModel(**COGVIDEOX_2B),
            "Wan2.1-T2V-1.3B": lambda: diffusers.WanTransformer3DModel(**WAN_1_3B),
            "Wan2.1-T2V-14B": lambda: diffusers.WanTransformer3DModel(**WAN_14B),
            "Wan2.2-TI2V-5B": lambda: diffusers.WanTransformer3DModel(**WAN22_5B),
            "Wan2.2-T2V-A14B (both experts)": lambda: TwoExperts(diffusers.WanTransformer3DModel(**WAN_14B),
                                                                 diffusers.WanTransformer3DModel(**WAN_14B), 0.875),
            "LTX-Video 0.9 (2B)": lambda: diffusers.LTXVideoTransformer3DModel(**LTX_2B)}
    gb = lambda n: n / 1e9
    rows = []
    for name, make in nets.items():
        with building("meta"):
            net = make()
            params = sum(p.numel() for p in net.parameters())
            lora.add_adapters(net, rank)
            adapter = sum(p.numel() for p in lora.trainable(net))
        full, low, low_bf16 = 20 * params, 4 * params + 20 * adapter, 2 * params + 20 * adapter
        rows.append([name, f"{params / 1e9:.2f} B", f"{adapter / 1e6:.1f} M", f"{gb(4 * params):.1f}",
                     f"{gb(full):.1f}", f"{gb(low):.1f}", f"{low / full:.2f}", f"{gb(low_bf16):.1f}"])
    return table(["denoiser", "parameters", f"adapter (r={rank})", "weights GB", "full FT GB", f"LoRA r={rank} GB",
                  "LoRA / full", "LoRA, bf16 base GB"], rows)


def diffusers_denoisers() -> dict:
    """The diffusers models' denoisers at full size, each with the transformer inputs of one video at its default
    shape (B = 1; latents from its VAE's compression): (build, inputs, shape) per name, built on the meta device."""
    import diffusers

    wan = lambda cfg, c, t, h, w: (  # noqa: E731
        lambda: diffusers.WanTransformer3DModel(**cfg),
        lambda b: dict(hidden_states=torch.randn(b, c, t, h, w), timestep=torch.full((b,), 500.0),
                       encoder_hidden_states=torch.randn(b, 512, 4096)))
    ltx_inputs = lambda b: dict(  # noqa: E731  (21 latent frames of 15 x 22: 161 frames at 480x704)
        hidden_states=torch.randn(b, 21 * 15 * 22, 128), timestep=torch.full((b,), 500.0),
        encoder_hidden_states=torch.randn(b, 128, 4096), encoder_attention_mask=torch.ones(b, 128), num_frames=21,
        height=15, width=22, rope_interpolation_scale=(8 / 25, 32, 32))
    return {"wan (Wan2.1-T2V-1.3B)": (*wan(WAN_1_3B, 16, 21, 60, 104), "480x832x81"),
            "wan2.2-5b (TI2V-5B)": (*wan(WAN22_5B, 48, 31, 44, 80), "704x1280x121"),
            "wan2.2-14b (one A14B expert)": (*wan(WAN_14B, 16, 21, 90, 160), "720x1280x81"),
            "wan2.2-14b at 480p": (*wan(WAN_14B, 16, 21, 60, 104), "480x832x81"),
            "ltx (LTX-Video 0.9)": (lambda: diffusers.LTXVideoTransformer3DModel(**LTX_2B), ltx_inputs, "480x704x161")}


def model_flops(n: int = 4, peak_tflops: float = 989.0, mfu: float = 0.35) -> str:
    """Counted on the meta device (FlopCounterMode: matmuls and attention), not measured: one transformer forward of
    one video at the model's default shape; a sampling step of N candidates with both CFG halves is 2N of those,
    the pipeline's steps that many times; a DPO step of one [winner; loser] pair is 10 (the pair's forward, its
    recompute under gradient checkpointing, a backward of twice the forward, and the reference's forward). Seconds
    at `mfu` of `peak_tflops` (an H200's dense bf16 989) are arithmetic."""
    steps = {"wan": 50, "wan2.2-5b": 50, "wan2.2-14b": 40, "ltx": 50}
    rows = []
    for name, (make, inputs, shape) in diffusers_denoisers().items():
        with building("meta"):
            net = make()
            kwargs = inputs(1)
        with flop_counter() as counter, torch.no_grad():
            net(**kwargs, return_dict=False)
        one = counter.get_total_flops() / 1e12
        sample = 2 * n * one * steps[name.split()[0]]
        rows.append([name, shape, f"{one:.0f}", f"{sample / 1e3:.1f}", f"{sample / (peak_tflops * mfu):.0f}",
                     f"{10 * one:.0f}", f"{10 * one / (peak_tflops * mfu):.1f}"])
    return table(["model", "shape", "TFLOP per video forward", f"PFLOP to sample N={n} (CFG, all steps)",
                  f"s at {mfu:.0%} of {peak_tflops:.0f} TFLOP/s", "TFLOP per DPO step (pair)", "s"], rows)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 1e9:.0f} GB), torch {torch.__version__}"
                f", CUDA {torch.version.cuda}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def log(message: str):
    """Progress on stderr, so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def run(args) -> dict:
    cfg = check_args(args)
    dev, parts = cfg["device"], cfg["parts"]
    where = machine(dev)
    print(f"Machine: {where}. Sizes: {args.size}; N = {args.n}; random weights.\n")
    results = {"machine": where, "size": args.size, "n": args.n, "reward": args.reward}
    log(f"building {args.size} models with random weights on {dev}")
    model, reward, reward_label = build(args.size, dev, args.reward, args.seed, args.reward_offload)
    steps = args.steps or model.sample_steps
    job = make_run(model, reward, args.reward, "online", args.n, args.seed, args.split_pair)
    set_point(model, cfg["point"])
    point = cfg["point"][0]
    if "a" in parts:
        log(f"a: one OnlineVPO step at {point}")
        sec = phase_breakdown(job, steps)
        total = sum(sec.values())
        print(f"### a. One OnlineVPO step, {point}, N = {args.n}, {steps} sampling steps\nReward: {reward_label}. "
              "Gradient checkpointing on, reference in fp32 like the policy. One prompt (train.py --sample-batch 1). "
              "No encode phase: the run encodes every prompt once at its start (the prompt-embedding cache), "
              "then frees T5.\n")
        print(table(["phase", "seconds", "share"], [[k, v, f"{100 * v / total:.0f}%"] for k, v in sec.items()]
                    + [["total", total, "100%"]]) + "\n")
        results["a"] = dict(point=point, steps=steps, seconds=sec)
    if "c" in parts:
        log(f"c: batched vs sequential sampling at {point}")
        r = batched_vs_sequential(model, args.n, steps)
        print(f"### c. Sampling N = {args.n} candidates, {point}, {steps} steps: one batched call vs {args.n} calls\n")
        print(table(["batched (s)", "sequential (s)", "batched / sequential", "max abs latent diff"],
                    [[r["batched_s"], r["sequential_s"], r["ratio"], f"{r['max_abs_diff']:.1e}"]]) + "\n")
        results["c"] = dict(point=point, steps=steps, **r)
    if "d" in parts:
        if dev.type != "cuda":
            print("### d. MFU: skipped, it needs a GPU (`python bench.py --size full` on one).\n")
        else:
            rows, results["d"] = [], {"peak_tflops": cfg["peak"], "steps": steps}
            for p in cfg["mfu_points"]:
                log(f"d: FLOPs and time at {p[0]}")
                set_point(model, p)
                r = mfu(job, steps, cfg["peak"])
                results["d"][p[0]] = r
                rows.append([p[0], r["sample_tflop"], r["sample_s"], f"{100 * r['sample_mfu']:.1f}%",
                             r["dpo_tflop"], r["dpo_s"], f"{100 * r['dpo_mfu']:.1f}%"])
            print(f"### d. Model FLOPs utilisation, bf16, peak {cfg['peak']:.0f} TFLOP/s, N = {args.n}, "
                  f"{steps} sampling steps\nDPO step = forward + backward of the policy and the reference "
                  "forward, without the checkpointing recompute (nor --split-pair's no-grad pass).\n")
            print(table(["point", "sampling TFLOP", "sampling s", "sampling MFU", "DPO TFLOP", "DPO s",
                         "DPO MFU"], rows) + "\n")
    if "b" in parts:
        log(f"b: memory at {args.points}")
        if dev.type == "cuda":
            mem = {"OnlineVPO": gpu_memory(job, cfg["points"])}
            for name in ("GRPO", "ReFL"):  # each a run of its own: ReFL's holds no reference
                del job
                free_memory(dev)
                job = make_run(model, reward, args.reward, METHODS[name], args.n, args.seed, args.split_pair)
                mem[name] = gpu_memory(job, cfg["points"])
            if args.lora_rank:  # last: the adapters stay on the network, the frozen base takes no AdamW state
                del job
                free_memory(dev)
                job = make_run(model, reward, args.reward, "online", args.n, args.seed, args.split_pair,
                               args.lora_rank)
                mem[LORA] = gpu_memory(job, cfg["points"])
            unit = "peak allocated GB (10^9 bytes; in brackets: allocated before the step, i.e. weights, " \
                   "AdamW state, reward)"
        else:
            del job, model, reward
            mem = cpu_memory(args, cfg["points"])
            unit = "peak resident MB (10^6 bytes; in brackets: resident just before the step, i.e. weights, AdamW " \
                   f"state, reward), both over the process before it built anything; a fresh process each, after " \
                   f"a warm-up step at {WARM_POINT}"
        lora_note = f", OnlineVPO with LoRA r={args.lora_rank} adapters" if args.lora_rank else ""
        print(f"### b. Memory of one step (Fig. 7): OnlineVPO (N = {args.n}){lora_note} vs GRPO (N = {args.n}) vs "
              f"ReFL; {unit}\n"
              f"Reward: {reward_label}. {MEMORY_STEPS} sampling steps.\n")
        digits = 1 if dev.type == "cuda" else 0  # GB on a GPU, MB on a CPU
        cell = lambda v: f"{v['peak']:.{digits}f} ({v['before']:.{digits}f})" if isinstance(v, dict) else v
        columns = memory_columns(args)
        print(table(["point (resolution:frames)"] + [c.replace(LORA, f"{LORA} r={args.lora_rank}") for c in columns],
                    [[p[0]] + [cell(mem[c][p[0]]) for c in columns] for p in cfg["points"]]) + "\n")
        results["b"] = dict(unit=unit, **mem)
    return results


@command()
def main(argv=None):
    args = parse_args(argv)
    if args.lora_memory is not None:
        print(lora_memory(args.lora_memory))
        return
    if args.model_flops:
        print(model_flops(args.n, args.peak_tflops or 989.0))
        return
    if args.json:
        writable_file(args.json, "--json")  # before the benchmark, not after it
    results = run(args)
    if args.json:
        write_atomically(args.json, [json.dumps(results, indent=1)])


if __name__ == "__main__":
    main()
