"""Our batched sampling of N videos (diffusers_models.py, ltx_video.py) against the diffusers pipeline called once
per video, for CogVideoX-2B, Wan2.1, Wan2.2 (5B, A14B) and LTX-Video: same weights, steps, guidance, initial noise
and prompt embeddings on both sides. Prints one JSON line: the seconds of each (best of 3), the speedup, and the
largest latent difference between the two, so the benchmark doubles as a parity check of our sampler on real
weights.

    python pipeline_bench.py --model wan          # tiny random components (tests/tiny_diffusers.py), CPU
    python pipeline_bench.py --model wan --dit Wan-AI/Wan2.1-T2V-1.3B-Diffusers --size 480x832 --frames 81
"""
import argparse
import json
import re
import tempfile
import time

from inputs import ANY, check_domains, command, known_device, refuse_empty

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)

from model import MODELS  # noqa: E402

PIPELINES = {"cogvideox": "CogVideoXPipeline", "wan": "WanPipeline", "wan2.2-5b": "WanPipeline",
             "wan2.2-14b": "WanPipeline", "ltx": "LTXPipeline"}


def make_pipeline(name: str, model):
    """The diffusers pipeline over our model's own components (the A14B's two experts, the 5B's per-token timesteps)."""
    import diffusers

    parts = dict(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae, transformer=model.dit,
                 scheduler=model.scheduler)
    if name == "wan2.2-14b":
        parts.update(transformer=model.dit.transformer, transformer_2=model.dit.transformer_2,
                     boundary_ratio=model.dit.boundary_ratio)
    elif name == "wan2.2-5b":
        parts.update(expand_timesteps=True)
    return getattr(diffusers, PIPELINES[name])(**parts)


def benchmark(name: str, dit: str, n: int = 4, steps: int = 10, size: str | None = None, frames: int | None = None,
              device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 3) -> dict:
    """Seconds to sample N videos of one prompt (latents only: same weights, steps, guidance, initial noise and
    prompt embeddings on both sides), best of `repeats`, and the largest latent difference between the two."""
    model = MODELS[name](dit=dit, size=size, frames=frames).to(device, dtype)
    pipe = make_pipeline(name, model)
    pipe.set_progress_bar_config(disable=True)
    prompt, seeds = "a red panda climbs a snowy tree", list(range(n))
    (y, mask), (neg, neg_mask) = model.encode_prompts([prompt]), model.encode_prompts([model.negative_prompt])
    noise = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    extra = {}
    if name == "cogvideox":  # pipeline latents <-> ours: CogVideoX (B, T, C, H, W), LTX packed tokens (B, T H W, C)
        into, back = (lambda z: z.transpose(1, 2)), (lambda z: z.transpose(1, 2))
    elif name == "ltx":
        into = lambda z: pipe._pack_latents(z, 1, 1)  # noqa: E731
        back = lambda z: pipe._unpack_latents(z, *model.latent_shape[1:])  # noqa: E731
        extra = dict(prompt_attention_mask=mask, negative_prompt_attention_mask=neg_mask)
    else:
        into = back = (lambda z: z)
    if name == "wan2.2-14b":
        extra = dict(guidance_scale_2=model.cfg_low)

    def pipeline_one(j):
        with model.autocast():
            out = pipe(prompt_embeds=y, negative_prompt_embeds=neg, latents=into(noise[j:j + 1].to(device)),
                       height=model.height, width=model.width, num_frames=model.frames, num_inference_steps=steps,
                       guidance_scale=model.cfg, output_type="latent", max_sequence_length=model.max_length, **extra)
        return back(out.frames).float()

    def best(fn):
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            tic = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
        return min(times), out

    ours_s, ours = best(lambda: model.sample([prompt], n, seeds, steps=steps))
    pipe_s, theirs = best(lambda: torch.cat([pipeline_one(j) for j in range(n)]))
    return {"model": name, "n": n, "steps": steps, "latent_shape": list(model.latent_shape), "ours_s": round(ours_s, 3),
            "pipeline_s": round(pipe_s, 3), "speedup": round(pipe_s / ours_s, 2),
            "max_latent_diff": float((ours - theirs).abs().max())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="batched sampling of N videos vs N diffusers pipeline calls")
    p.add_argument("--model", default="wan", choices=list(PIPELINES))
    p.add_argument("--dit", default=None, help="pipeline Hub id or folder (default: tiny random components)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", default=None, help="HxW (default: 32x32 tiny, the model's own otherwise)")
    p.add_argument("--frames", type=int, default=None, help="default: 9 tiny, the model's own otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    return p


DOMAINS = [  # inputs.check_domains, before a pipeline is written or loaded
    ("n", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("threads", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("frames", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("size", lambda v, a: re.fullmatch(r"[1-9]\d*x[1-9]\d*", v.lower()) is not None,
     "must look like 480x832 (height x width in pixels), got {v!r}"),
    ("device", lambda v, a: known_device(v), "{v!r}: not a device torch sees here (cpu; cuda or cuda:I for a "
     "visible GPU)"),
    ("dit", ANY, ""),
]


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    torch.set_num_threads(args.threads)
    bf16 = (args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")) == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.dit is None
        if tiny:  # the test suite's tiny random pipeline: imported only when no --dit is given
            from tests.tiny_diffusers import save_tiny
        dit = save_tiny(args.model, tmp) if tiny else args.dit
        size, frames = (args.size or "32x32", args.frames or 9) if tiny else (args.size, args.frames)
        print(json.dumps(benchmark(args.model, dit, args.n, args.steps, size, frames, args.device, dtype)))


if __name__ == "__main__":
    main()
