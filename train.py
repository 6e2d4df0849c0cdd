"""OnlineVPO training: Algorithm 1 of the paper as one loop, plus the paper's baselines.

    python train.py --model opensora --reward videoscore --n 4 --k 200     # the paper's setting
    python train.py --steps 40 --batch-size 4 --k 20                        # the shipped toy model, CPU, minutes
    python train.py --method offline                                        # Table 4d: offline DPO
    python train.py --method refl                                           # Table 4c: ReFL
    torchrun --nproc_per_node 8 train.py --model opensora ...               # many GPUs (parallel.py)

For each prompt: sample N videos from the current policy, score them, take best vs worst, apply the
Diffusion-DPO loss against the reference model; every K optimizer steps the reference becomes the policy.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

import dpo
import parallel
from inputs import UserError, default_prompts, load_prompts, video_names
from model import MODELS
from reward import REWARDS, build_reward, pick
from sample import add_model_args, model_from_args, write_video


METHOD_NAMES = {"online": "OnlineVPO", "offline": "offline DPO", "refl": "ReFL"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--reward", default=None, help=f"video reward: {', '.join(REWARDS)} (default: toy for the toy "
                   "model, videoscore otherwise)")
    p.add_argument("--reward-dim", default=None, help="reward dimension the pairs are built on; 'global' = mean "
                   "of all (default: the reward's temporal consistency, paper Table 4b)")
    p.add_argument("--method", default="online", choices=list(METHOD_NAMES),
                   help="online: OnlineVPO (Alg. 1); offline: DPO on pairs sampled once from the initial policy, "
                   "fixed reference (Table 4d); refl: reward feedback learning (Table 4c)")
    p.add_argument("--offline-pairs", type=int, default=200, help="--method offline: prompts sampled for pairs")
    p.add_argument("--refl-latent-frames", type=int, default=None,
                   help="--method refl: latent frames decoded for the reward (default: all)")
    p.add_argument("--reward-path", default=None, help="local folder or Hub id of the reward's weights "
                   "(default: the reward's own Hub id)")
    p.add_argument("--reward-batch", type=int, default=4, help="videos per reward forward")
    p.add_argument("--reward-offload", action="store_true", help="keep the reward model on the CPU except while "
                   "it scores (frees its memory for sampling and training)")
    p.add_argument("-n", "--n", type=int, default=4, help="candidates sampled per prompt (paper: 4); under torchrun "
                   "write -n: torchrun's own parser takes --n for an abbreviation of its --nnodes/--nproc-per-node")
    p.add_argument("--k", type=int, default=200, help="reference update every K optimizer steps; 0 = never "
                   "(paper: 200)")
    p.add_argument("--beta", type=float, default=None, help="DPO beta (default: the model's, see README)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (Open-Sora: 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per optimizer step (paper: 8)")
    p.add_argument("--sample-batch", type=int, default=1, help="prompts sampled together in one call")
    p.add_argument("--min-gap", type=float, default=0.0, help="a best-worst reward gap <= this is a tie: skipped")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--prompts", default=None, help="txt (one per line) or csv (default: prompts/toy.txt for the "
                   "toy model, prompts/train.txt otherwise)")
    p.add_argument("--prompt-column", default=None, help="csv column holding the prompts (default: text)")
    p.add_argument("--eval-prompts", default=None, help="fixed prompts for --sample-every")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/vpo")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="write eval mp4s every this many steps; 0 = never")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --out, or from the given checkpoint folder")
    # memory levers; the defaults are right for one 80 GB GPU at the paper's setting (see README, bench.py)
    p.add_argument("--no-grad-checkpointing", action="store_true", help="faster, more memory")
    p.add_argument("--text-encoder-offload", default="free", choices=["none", "cpu", "free"],
                   help="after every training and eval prompt is encoded once (the prompt-embedding cache): free "
                   "the text encoder (T5-XXL: 9.5 GB in bf16), park it on the CPU, or keep it (none)")
    p.add_argument("--ref-dtype", default=None, choices=["fp32", "bf16"], help="storage dtype of the reference "
                   "network (default: the compute dtype, bf16 on GPU)")
    p.add_argument("--ref-offload", action="store_true", help="keep the reference on the CPU except during its "
                   "DPO forward")
    p.add_argument("--vae-micro-batch", type=int, default=None, help="frames per VAE spatial-decoder call "
                   "(opensora; Open-Sora's 4): lower decodes in more, smaller chunks")
    p.add_argument("--split-pair", action="store_true", help="DPO forward/backward of winners and losers one after "
                   "the other: half the activation memory for one extra no-grad forward (same gradient)")
    p.add_argument("--fsdp", action="store_true", help="shard policy and reference with FSDP2 (fully_shard) "
                   "instead of replicating them with DDP (models that do not fit on one GPU)")
    p.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many NaN/inf steps in a row")
    args = p.parse_args(argv)
    args.reward = args.reward or ("toy" if args.model == "toy" else "videoscore")
    args.prompts = args.prompts or default_prompts(args.model, "train")
    args.eval_prompts = args.eval_prompts or default_prompts(args.model, "eval")
    return args


def check_args(args):
    if args.model not in MODELS:  # names first: loading a reward or a model takes minutes
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    if args.reward not in REWARDS:
        raise UserError(f"unknown reward {args.reward!r}; choose one of {', '.join(REWARDS)}")
    if args.n < 2 and args.method != "refl":
        raise UserError("--n must be at least 2: a preference pair needs two candidates")
    for name in ("batch_size", "sample_batch", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.k < 0:
        raise UserError("--k must be >= 0 (0 = never update the reference)")
    if args.offline_pairs < 1:
        raise UserError("--offline-pairs must be at least 1")
    if args.refl_latent_frames is not None and args.refl_latent_frames < 1:
        raise UserError("--refl-latent-frames must be at least 1")
    if args.vae_micro_batch is not None and args.vae_micro_batch < 1:
        raise UserError("--vae-micro-batch must be at least 1")
    if args.batch_size % parallel.WORLD:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the {parallel.WORLD} processes: every "
                        "rank takes an equal share of each step's prompts")
    if args.fsdp and parallel.WORLD == 1:
        raise UserError("--fsdp shards the model across processes: start the run with torchrun --nproc_per_node G")
    if args.fsdp and args.ref_offload:
        raise UserError("--ref-offload and --fsdp do not combine: FSDP2 already shards the reference")


# ----------------------------------------------------------------------------------------------------------
# Deterministic data and noise: everything random is a function of (seed, prompt counter), so a resumed run
# draws exactly what an uninterrupted one would.


def prompt_at(prompts: list[str], seed: int, counter: int) -> str:
    epoch, pos = divmod(counter, len(prompts))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return prompts[order[pos]]


def candidate_seeds(seed: int, counter: int, n: int) -> list[int]:
    return [(seed * 1_000_003 + counter * n + j) % 2**63 for j in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint-<step>/ written to a temporary folder, then renamed (atomic on one filesystem).
# Full (unsharded) weights and optimizer state: a checkpoint resumes on any number of ranks, DDP or FSDP2.


def save_checkpoint(out: str, model, ref, opt, state: dict, args) -> str:
    """Every rank calls this (gathering sharded weights is collective); rank 0 writes."""
    policy, reference = parallel.savable(model.dit), parallel.savable(ref) if ref is not None else None
    opt_state = parallel.optimizer_state(model.dit, opt)
    final = os.path.join(out, f"checkpoint-{state['step']}")
    if parallel.is_main():
        tmp = os.path.join(out, f".tmp-checkpoint-{state['step']}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_weights(tmp, net=policy)  # policy: model.safetensors + config.json, loadable as --dit
        if reference is not None:
            model.save_weights(tmp, net=reference, file="ref.safetensors")
        torch.save(opt_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    parallel.barrier()
    return final


def latest_checkpoint(out: str) -> str | None:
    found = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    return found[-1] if found else None


def load_checkpoint(path: str, model, ref) -> dict:
    """Weights into the plain (not yet wrapped or sharded) networks; the optimizer follows in load_optimizer."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise UserError(f"{path} is not a train.py checkpoint (no state.json)")
    model.load_weights(os.path.join(path, "model.safetensors"))
    if ref is not None:
        model.load_weights(os.path.join(path, "ref.safetensors"), net=ref)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def load_optimizer(path: str, model, opt):
    parallel.load_optimizer_state(model.dit, opt, torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    torch.set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True)["torch"])


def write_eval_samples(model, prompts: list[str], out: str, step: int, seed: int):
    """Every rank samples (a sharded network needs all ranks in every forward); rank 0 writes."""
    folder = os.path.join(out, "samples", f"step-{step}")
    for k, prompt in enumerate(prompts):
        videos = model.decode(model.sample([prompt], 2, candidate_seeds(seed + 1, k, 2)))
        if parallel.is_main():
            os.makedirs(folder, exist_ok=True)
            for name, video in zip(video_names(prompts, 2)[k], videos):
                write_video(os.path.join(folder, name), video, model.fps)


# ----------------------------------------------------------------------------------------------------------
# Memory levers (README "Memory"): what stays on the accelerator besides the policy and its optimizer


def cache_prompts(model, prompts: list[str], offload: str):
    """The prompt-embedding cache: every prompt the run will use is encoded once, then the text encoder is freed
    (T5-XXL: 4.8 B parameters) or parked on the CPU, where it still encodes an unseen prompt (slowly)."""
    if offload == "none":
        return
    extra = [model.negative_prompt] if hasattr(model, "negative_prompt") else []  # diffusers models' CFG text
    todo = list(dict.fromkeys(prompts + extra))
    for i in range(0, len(todo), 32):
        model.encode_prompts(todo[i: i + 32])
    if offload == "cpu":
        model.text_encoder.to("cpu")
    else:
        model.text_encoder = None
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def borrowed(module: torch.nn.Module, device: torch.device, offload: bool):
    """--ref-offload: the reference lives on the CPU and visits the accelerator for its forward only."""
    if offload:
        module.to(device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")


# ----------------------------------------------------------------------------------------------------------
# One prompt batch of each method: online and offline DPO share dpo_backward; ReFL is its own loss.

def online_pairs(model, reward, dim, prompts, counters, args, log, times) -> list | None:
    """Alg. 1 lines 4-6: sample N videos per prompt from the current policy, score them, pick best vs worst.
    One (prompt, winner latents, loser latents) per prompt, None for a tie; None if a sample is
    NaN/inf (a broken policy: NaN videos would all tie, silently)."""
    batch = [prompt_at(prompts, args.seed, c) for c in counters]
    seeds = [s for c in counters for s in candidate_seeds(args.seed, c, args.n)]
    tic = time.perf_counter()
    latents = model.sample(batch, args.n, seeds)
    times["sample"] += time.perf_counter() - tic
    if not torch.isfinite(latents).all():
        return None
    tic = time.perf_counter()
    videos = model.decode(latents)
    times["decode"] += time.perf_counter() - tic
    tic = time.perf_counter()
    scores = pick(reward.score(videos, [p for p in batch for _ in range(args.n)]), dim).view(-1, args.n)
    times["reward"] += time.perf_counter() - tic
    found = []
    for i, prompt in enumerate(batch):
        pair = dpo.select_pair(scores[i], args.min_gap)  # ties give no pair
        log["reward_mean"].append(scores[i].mean().item())
        if pair is None:
            found.append(None)
            continue
        w, l = pair
        log["reward_w"].append(scores[i, w].item())
        log["reward_l"].append(scores[i, l].item())
        log["gap"].append((scores[i, w] - scores[i, l]).item())
        # the sampled latents themselves: no VAE re-encode
        found.append((prompt, latents[i * args.n + w], latents[i * args.n + l]))
    return found


def dpo_backward(model, net, ref, beta, found, args, log, weight: float = 1.0, sync: bool = True) -> tuple[int, bool]:
    """Alg. 1 lines 7-8: the Diffusion-DPO loss on (counter, (prompt, winner, loser)) pairs; winner and loser
    share one noise and one t, drawn from (seed, counter). `net` is the policy as the gradients see it (DDP or
    FSDP2); `sync`: reduce gradients across ranks in this backward (the optimizer step's last one). Gradients sum
    to the mean over the step's global batch: DDP and FSDP2 average over ranks, hence the factor WORLD.
    weight=0 runs a placeholder that only keeps the ranks' collectives in step."""
    P = len(found)
    gens = [torch.Generator().manual_seed(args.seed * 104729 + c) for c, _ in found]
    chosen = [pair[0] for _, pair in found]
    x0 = torch.stack([pair[1] for _, pair in found] + [pair[2] for _, pair in found]).to(model.device)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device).repeat(2, 1, 1, 1, 1)
    t = torch.cat([model.training_timesteps(1, g) for g in gens]).repeat(2)
    y, mask = model.encode_prompts(chosen + chosen)
    scale = weight * P * parallel.WORLD / args.batch_size
    with torch.no_grad(), borrowed(ref, model.device, args.ref_offload):
        ref_err = model.errors(ref, x0, noise, t, y, mask)
    # a NaN loss still runs backward: the ranks stay in step, and its NaN gradient skips the step on every rank
    if not args.split_pair:
        with parallel.gradient_sync(net, sync):
            policy_err = model.errors(net, x0, noise, t, y, mask)
            loss, m = dpo.diffusion_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], beta)
            (loss * scale).backward()
    else:  # --split-pair: dL/de from a no-grad pass, then sum_i dL/de_i * de_i/dtheta, winners then losers
        with torch.no_grad():
            policy_err = model.errors(net, x0, noise, t, y, mask)
        policy_err.requires_grad_(True)
        loss, m = dpo.diffusion_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], beta)
        (coef,) = torch.autograd.grad(loss * scale, policy_err)
        for half, last in ((slice(0, P), False), (slice(P, 2 * P), True)):
            with parallel.gradient_sync(net, sync and last):
                e = model.errors(net, x0[half], noise[half], t[half], y[half], mask[half])
                (e * coef[half]).sum().backward()
    if weight == 0:
        return 0, True
    for key in ("loss", "accuracy", "margin", "kl"):
        log[key] += [m[key]] * P
    return P, bool(torch.isfinite(loss))


def placeholder(model, counter: int, prompts: list[str], args) -> list:
    """A zero-weight pair for a rank whose prompts all tied (or sampled NaN): every rank must make the same
    network calls, or DDP's and FSDP2's collectives wait forever."""
    z = torch.zeros(model.latent_shape)
    return [(counter, (prompt_at(prompts, args.seed, counter), z, z))]


def collect_offline_pairs(model, reward, dim, prompts, args, state_step: int = 0) -> list:
    """Table 4d, Diffusion-DPO style: --offline-pairs prompts sampled ONCE with the initial policy and scored
    by the same reward, best vs worst kept (ties as None); cached to OUT/offline_pairs.pt so a resumed run
    trains on the same pairs. Training then cycles through them with a fixed reference. With several ranks each
    samples every WORLD-th prompt (the same count everywhere) and the pairs are gathered onto every rank."""
    path = os.path.join(args.out, "offline_pairs.pt")
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["prompts_file"] == args.prompts and len(cached["pairs"]) == args.offline_pairs:
            return cached["pairs"]
    if state_step:  # the pairs must come from the initial policy, which a resumed run no longer has
        raise UserError(f"--method offline: {path} is missing or was made with other --prompts/--offline-pairs; "
                        "resume with the flags the run started with")
    times = dict.fromkeys(("sample", "decode", "reward"), 0.0)
    log = {key: [] for key in ("reward_mean", "reward_w", "reward_l", "gap")}
    mine = list(range(parallel.RANK, math.ceil(args.offline_pairs / parallel.WORLD) * parallel.WORLD,
                      parallel.WORLD))  # counters past the end are sampled too (equal work) and dropped
    pairs, broken = [], False
    for first in tqdm(range(0, len(mine), args.sample_batch), desc="collecting offline pairs",
                      disable=not parallel.is_main()):
        counters = mine[first: first + args.sample_batch]
        found = online_pairs(model, reward, dim, prompts, counters, args, log, times)
        broken = broken or found is None
        found = found or [None] * len(counters)
        pairs += [None if p is None else (p[0], p[1].cpu(), p[2].cpu()) for p in found]  # cached on disk
    everyone = parallel.gather((broken, list(zip(mine, pairs))))
    if any(b for b, _ in everyone):
        raise UserError("the initial policy sampled NaN/inf latents: cannot collect offline pairs")
    pairs = [p for c, p in sorted((cp for _, rank in everyone for cp in rank), key=lambda cp: cp[0])
             if c < args.offline_pairs]
    if all(pair is None for pair in pairs):
        raise UserError(f"all {len(pairs)} offline prompts gave ties (equal rewards): no pairs to train on")
    if parallel.is_main():
        tmp = path + ".tmp"
        torch.save({"prompts_file": args.prompts, "pairs": pairs}, tmp)
        os.replace(tmp, path)
    return pairs


def refl_backward(model, net, reward, dim, prompts, counters, args, log, times, sync: bool = True) -> bool:
    """Table 4c, ReFL (ImageReward's reward feedback learning, applied to video): denoise without gradients
    to a random step among the last quarter of the sampling steps, take ONE guided step with gradients,
    jump to the predicted x0, decode (only --refl-latent-frames latent frames) and maximise the reward.
    The reward's own weights are frozen: gradients reach the policy only."""
    batch = [prompt_at(prompts, args.seed, c) for c in counters]
    seeds = [candidate_seeds(args.seed, c, 1)[0] for c in counters]
    steps = model.sample_steps
    g = torch.Generator().manual_seed(args.seed * 15485863 + counters[0])
    stop = int(torch.randint(steps - max(1, steps // 4), steps, (1,), generator=g))
    tic = time.perf_counter()
    z, t = model.sample(batch, 1, seeds, until=stop)
    times["sample"] += time.perf_counter() - tic
    tic = time.perf_counter()
    with parallel.gradient_sync(net, sync):  # DDP: the forward and the backward inside
        x0 = model.predict_x0(net, z, t, batch)
        videos = model.decode_float(x0, args.refl_latent_frames)
        times["decode"] += time.perf_counter() - tic
        tic = time.perf_counter()
        r = pick(reward.score_float(videos, batch), dim).float()
        loss = -r.mean()
        (loss * len(batch) * parallel.WORLD / args.batch_size).backward()  # a NaN skips the step on every rank
    times["reward"] += time.perf_counter() - tic
    log["loss"] += [loss.item()] * len(batch)
    log["reward_mean"] += r.tolist()
    return bool(torch.isfinite(loss))


def merged(per_rank: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Every rank's (metric lists, phase times): lists joined, each phase timed by its slowest rank."""
    logs, times = zip(*per_rank)
    log = {key: [v for one in logs for v in one[key]] for key in logs[0]}
    return log, {key: max(one[key] for one in times) for key in times[0]}


def train(args) -> dict:
    check_args(args)
    args.device = parallel.setup(args.device)
    main_rank = parallel.is_main()
    prompts = load_prompts(args.prompts, args.prompt_column)
    eval_prompts = load_prompts(args.eval_prompts)[:4] if args.sample_every else []
    reward = build_reward(args.reward, device=args.device, path=args.reward_path, batch_size=args.reward_batch,
                          offload=args.reward_offload)
    dim = args.reward_dim or reward.default_dim
    if dim != "global" and dim not in reward.dims:
        raise UserError(f"unknown reward dimension {dim!r}; choose one of {', '.join(reward.dims)}, global")
    if args.method == "refl" and not hasattr(reward, "score_float"):
        raise UserError(f"--method refl needs a differentiable reward; {args.reward!r} is not")
    for part in vars(reward).values():  # the reward is a judge, never trained (ReFL's gradients stop at it)
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    model = model_from_args(args)
    if args.method == "refl" and not hasattr(model, "predict_x0"):
        raise UserError(f"--method refl is implemented for the Open-Sora family (opensora, toy, tiny), "
                        f"not {args.model!r}")
    if args.vae_micro_batch:
        if not hasattr(model.vae, "micro_batch_size"):
            raise UserError(f"--vae-micro-batch applies to Open-Sora's VAE, not to model {args.model!r}")
        model.vae.micro_batch_size = args.vae_micro_batch
    beta = args.beta if args.beta is not None else model.beta
    model.set_grad_checkpointing(not args.no_grad_checkpointing)
    cache_prompts(model, prompts + eval_prompts, args.text_encoder_offload)
    # G_ref <- G_theta at the start (Alg. 1 line 1); ReFL has no reference, and holds no copy (Fig. 7 memory)
    ref_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: model.dtype}[args.ref_dtype]
    ref = model.frozen_copy(ref_dtype) if args.method != "refl" else None
    k = args.k if args.method == "online" else 0  # offline DPO keeps its reference fixed
    state = {"model": args.model, "step": 0, "prompts_seen": 0, "ties": 0, "bad_steps": 0, "skipped_nan": 0,
             "ref_updates": 0}

    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    resume = None
    if args.resume:
        resume = latest_checkpoint(args.out) if args.resume == "latest" else args.resume
        if resume is None:
            raise UserError(f"--resume: no checkpoint-<step> folder in {args.out}")
        state = load_checkpoint(resume, model, ref)
        if state.get("model") != args.model:
            raise UserError(f"{resume} is a checkpoint of model {state.get('model')!r}, not {args.model!r}")
    # many ranks: DDP replicates the policy (rank 0's weights broadcast), or FSDP2 shards policy and reference
    net = parallel.wrap(model, args.fsdp)
    if args.fsdp and ref is not None:
        parallel.shard(ref, model.dtype)
    if ref is not None and args.ref_offload:
        ref.to("cpu")
    opt = torch.optim.AdamW(model.dit.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if resume:
        load_optimizer(resume, model, opt)
        for group in opt.param_groups:  # flags given now win over the saved optimizer's
            group.update(lr=args.lr, weight_decay=args.weight_decay)
    if main_rank and resume:
        keep = []  # drop metrics logged after the checkpoint by the interrupted run
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= state["step"]]
        with open(metrics_path, "w") as f:
            f.writelines(keep)
    elif main_rank:
        open(metrics_path, "w").close()
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    offline = None
    if args.method == "offline":
        offline = collect_offline_pairs(model, reward, dim, prompts, args, state["step"])
    bar = tqdm(total=args.steps, initial=state["step"], desc=METHOD_NAMES[args.method], dynamic_ncols=True,
               disable=not main_rank)
    model.dit.train()
    while state["step"] < args.steps:
        times = dict.fromkeys(("sample", "decode", "reward", "train"), 0.0)
        log = {key: [] for key in ("loss", "accuracy", "margin", "kl", "reward_mean", "reward_w", "reward_l", "gap")}
        pairs, ties, finite = 0, 0, True
        opt.zero_grad(set_to_none=True)
        # this rank's share of the step's global batch: every WORLD-th prompt (1 rank: all of them)
        mine = [state["prompts_seen"] + i for i in range(parallel.RANK, args.batch_size, parallel.WORLD)]
        state["prompts_seen"] += args.batch_size
        for first in range(0, len(mine), args.sample_batch):
            counters = mine[first: first + args.sample_batch]
            last = first + args.sample_batch >= len(mine)  # gradients are reduced in the step's last backward
            if args.method == "refl":
                finite = refl_backward(model, net, reward, dim, prompts, counters, args, log, times, last) and finite
                pairs += len(counters)
                continue
            if args.method == "online":
                found = online_pairs(model, reward, dim, prompts, counters, args, log, times)
            else:  # offline: the pairs collected once from the initial policy, never re-sampled
                found = [offline[c % len(offline)] for c in counters]
            if found is None:  # NaN/inf samples from a broken policy
                finite, found = False, []
            else:
                found = [(c, pair) for c, pair in zip(counters, found) if pair is not None]
                ties += len(counters) - len(found)
            tic = time.perf_counter()
            if found:
                P, ok = dpo_backward(model, net, ref, beta, found, args, log, sync=last)
                pairs, finite = pairs + P, finite and ok
            elif parallel.WORLD > 1:  # nothing to learn here, but the other ranks' collectives need us
                dpo_backward(model, net, ref, beta, placeholder(model, counters[0], prompts, args), args, log, 0.0, last)
            times["train"] += time.perf_counter() - tic

        tic = time.perf_counter()
        finite = parallel.all_true(finite, model.device)
        pairs, ties = parallel.total(pairs, model.device), parallel.total(ties, model.device)
        state["ties"] += ties
        grad_norm = None
        if pairs and finite:
            norm = torch.nn.utils.clip_grad_norm_(model.dit.parameters(), args.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
            finite = math.isfinite(grad_norm)  # identical on every rank: the gradients were reduced
        if pairs and finite:
            opt.step()
            state["bad_steps"] = 0
        elif not finite:  # NaN/inf loss, gradient or samples: skip this step, keep the weights as they were
            state["bad_steps"] += 1
            state["skipped_nan"] += 1
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        if k and state["step"] % k == 0:  # curriculum reference update: G_ref <- G_theta, on every rank
            dpo.update_reference(ref, model.dit)
            state["ref_updates"] += 1
        times["train"] += time.perf_counter() - tic

        log, times = merged(parallel.gather((log, times)))
        mean = lambda v: sum(v) / len(v) if v else None
        row = {"step": state["step"], "pairs": pairs, "ties": state["ties"], "ref_updates": state["ref_updates"],
               "skipped_nan": state["skipped_nan"], "grad_norm": grad_norm, "lr": args.lr, "beta": beta,
               "method": args.method, "reward_dim": dim, **{key: mean(v) for key, v in log.items()},
               **{f"time_{k}": round(v, 3) for k, v in times.items()}}
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        bar.set_postfix_str(f"loss {fmt(row['loss'])} r {fmt(row['reward_mean'])} w {fmt(row['reward_w'])} "
                            f"l {fmt(row['reward_l'])} acc {fmt(row['accuracy'])} ties {state['ties']}")

        if state["bad_steps"] >= args.max_bad_steps:
            last = latest_checkpoint(args.out)
            raise UserError(f"stopping: {state['bad_steps']} optimizer steps in a row had a NaN/inf loss, gradient "
                            f"or sample (lower --lr or --beta); last good checkpoint: {last or 'none'}")
        if state["bad_steps"] == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            save_checkpoint(args.out, model, ref, opt, state, args)
        if args.sample_every and state["step"] % args.sample_every == 0:
            write_eval_samples(model, eval_prompts, args.out, state["step"], args.seed)
    bar.close()
    return state


def main(argv=None):
    args = parse_args(argv)
    try:
        state = train(args)
    except UserError as e:  # every rank meets the same error; one prints it
        sys.exit(f"error: {e}" if parallel.is_main() else 1)
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume (continues from the latest checkpoint)")
    finally:
        parallel.shutdown()
    if not parallel.is_main():
        return
    print(f"done: {state['step']} steps, {state['ties']} ties skipped, {state['ref_updates']} reference updates; "
          f"metrics in {os.path.join(args.out, 'metrics.jsonl')}")


if __name__ == "__main__":
    main()
