"""Running a training job: everything around Algorithm 1 that train.py should not have to show.

`Run` holds one job: the flags, the model and its reference, the reward, AdamW, the step counter and what the
step logs. Its methods are called by name from the loops (train.py, baselines.py), in this order each step:
    for counters, last in run.batches(): ...     # this rank's share of the step's prompts
    run.optimizer_step()                          # clip, AdamW; a NaN/inf step is skipped on every rank
    run.end_step()                                # metrics.jsonl, progress bar, checkpoint, eval mp4s
Also here: the flags (`parse_args`), deterministic prompts and seeds, checkpoints and resume, the memory levers.
"""
import argparse
import atexit
import contextlib
import functools
import glob
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile

import torch
from tqdm import tqdm

import dataset
import dpo
import lora
import parallel
from inputs import (UserError, check_safetensors, default_prompts, load_prompts, read_json, read_metrics, stream_seed,
                    video_names, writable_dir, write_atomically)
from reward import REWARDS, build_reward, parse_dim, reward_names
from sample import add_model_args, check_model_args, model_from_args, sample_videos, write_video

METHOD_NAMES = {"online": "OnlineVPO", "offline": "offline DPO", "refl": "ReFL", "dense": "DenseDPO",
                "structural": "StructuralDPO", "grpo": "GRPO"}
GUIDED = ("dense", "structural")  # DenseDPO's aligned candidates: corrupted copies of one video, denoised again
LOG_KEYS = ("loss", "accuracy", "margin", "kl", "reward_mean", "reward_w", "reward_l", "gap", "labelled",
            "ratio", "clipped")  # the last two: GRPO's importance ratio and the share of it clipped
# the paper's reward for real models; the toy world's judge for the toy model; no weights at all for the test model
DEFAULT_REWARDS = {"toy": "toy", "tiny": "pixel"}


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Algorithm 1 (the paper's hyperparameters)")
    g.add_argument("--method", default="online", choices=list(METHOD_NAMES),
                   help="online: OnlineVPO (Alg. 1); offline: DPO on pairs sampled once from the initial policy, "
                   "fixed reference (Table 4d); refl: reward feedback learning (Table 4c); dense: DenseDPO (aligned "
                   "candidates, a preference per segment); structural: aligned candidates, one label per video; "
                   "grpo: Flow-GRPO (grpo.py)")
    g.add_argument("-n", "--n", type=int, default=4, help="candidates sampled per prompt (paper: 4); under torchrun "
                   "write -n: torchrun's own parser takes --n for an abbreviation of its --nnodes/--nproc-per-node")
    g.add_argument("--k", type=int, default=200, help="reference update every K optimizer steps; 0 = never "
                   "(paper: 200)")
    g.add_argument("--beta", type=float, default=None, help="DPO beta (default: the model's, see README)")
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per optimizer step (paper: 8)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--min-gap", type=float, default=0.0, help="a best-worst reward gap <= this is a tie: skipped")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (Open-Sora: 1.0)")
    g.add_argument("--prompts", default=None, help="txt (one per line) or csv (default: prompts/toy.txt for the "
                   "toy model, prompts/train.txt otherwise)")
    g.add_argument("--prompt-column", default=None, help="csv column holding the prompts (default: text)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--offline-pairs", type=int, default=200, help="--method offline: prompts sampled for pairs")
    g.add_argument("--refl-latent-frames", type=int, default=None,
                   help="--method refl: latent frames decoded for the reward (default: all)")
    g = p.add_argument_group("GRPO (--method grpo, Flow-GRPO's formulation)")
    g.add_argument("--grpo-noise-level", type=float, default=None, help="the SDE sampler's noise level a: std_t = a "
                   "sqrt(s / (1 - s)) (default: Flow-GRPO's 0.7; for wan its Wan2.1 pipeline's std_t = sigma_1 s, "
                   "which takes no level)")
    g.add_argument("--grpo-clip", type=float, default=1e-3, help="PPO clip range of the importance ratio "
                   "(Flow-GRPO: 1e-4 for SD3, 1e-3 for Wan)")
    g.add_argument("--grpo-beta", type=float, default=0.004, help="weight of the KL term to the reference (Flow-GRPO's "
                   "Wan: 0.004; 0 = none)")
    g.add_argument("--grpo-timestep-fraction", type=float, default=0.99, help="train on the first int(K x this) of "
                   "the K sampling steps (Flow-GRPO: 0.99, the last step left out)")
    g.add_argument("--grpo-micro-batch", type=int, default=0, help="videos per forward/backward of the GRPO update "
                   "(the same gradient, less activation memory; 0 = all of a --sample-batch's prompts' N videos)")
    g = p.add_argument_group("DenseDPO (--method dense, structural)")
    g.add_argument("--eta", type=float, default=0.7, help="guidance level: each candidate is the source video "
                   "corrupted to the state at t = eta * 1000 and denoised again; lower keeps more of the source's "
                   "motion, 1 is plain sampling (see README: DenseDPO)")
    g.add_argument("--segment-seconds", type=float, default=None, help="--method dense: seconds per labelled "
                   "segment (default: the model's; 1 s as DenseDPO, 0.25 s in the 1-second toy world)")
    g.add_argument("--label-fraction", type=float, default=1.0, help="--method dense, structural: keep each "
                   "labelled pair with this probability, drop the rest (DenseDPO's data-efficiency runs: 0.33 keeps "
                   "about a third of the labels at the same sampling and reward cost)")
    g.add_argument("--videos", default=None, help="a folder of real videos to corrupt and denoise (with --captions; "
                   "their captions replace --prompts); default: the policy's own fresh sample of each prompt")
    g.add_argument("--captions", default=None, help="csv or jsonl: a clip's file (video/path/file, or WebVid's "
                   "videoid) and its caption (caption/text/prompt, or WebVid's name) per row")
    g = p.add_argument_group("LoRA (lora.py): train adapters, the base frozen; the reference is a second adapter")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r; 0 = full fine-tuning (Flow-GRPO: 32, "
                   "Pref-GRPO: 64)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha: the update is (alpha / r) B A "
                   "(default: r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (policy only)")
    g.add_argument("--lora-targets", default=None, help="regex over module names, full match (default: every "
                   "block's attention and feed-forward linears)")
    g.add_argument("--merge-lora", action="store_true", help="checkpoints also hold the merged full weights "
                   "(model.safetensors, loadable as --dit without peft)")
    g = p.add_argument_group("rewards")
    g.add_argument("--reward", default=None, help=f"video reward: {', '.join(REWARDS)}, or several joined by "
                   "commas, their dimensions then named reward:dim (default: toy for the toy model, pixel for tiny, "
                   "videoscore otherwise)")
    g.add_argument("--reward-dim", default=None, help="what the pairs are built on: one dimension; 'global' = mean "
                   "of all; or a weighted mix, e.g. temporal_consistency=1,dynamic_degree=0.5, each dimension divided "
                   "by its within-prompt standard deviation (default: the reward's temporal consistency, Table 4b)")
    g.add_argument("--reward-path", default=None, help="local folder or Hub id of the reward's weights, comma-"
                   "separated for several rewards (default: the reward's own Hub id)")
    g.add_argument("--reward-batch", type=int, default=4, help="videos per reward forward")
    add_model_args(p.add_argument_group("model and size"))
    # the defaults are right for one 80 GB GPU at the paper's setting (see README, bench.py)
    g = p.add_argument_group("memory levers")
    g.add_argument("--no-grad-checkpointing", action="store_true", help="faster, more memory")
    g.add_argument("--sample-batch", type=int, default=1, help="prompts sampled together in one call")
    g.add_argument("--text-encoder-offload", default="free", choices=["none", "cpu", "free"],
                   help="after every training and eval prompt is encoded once (the prompt-embedding cache): free "
                   "the text encoder (T5-XXL: 9.5 GB in bf16), park it on the CPU, or keep it (none)")
    g.add_argument("--ref-offload", action="store_true", help="keep the reference on the CPU except during its "
                   "DPO forward")
    g.add_argument("--reward-offload", action="store_true", help="keep the reward model on the CPU except while "
                   "it scores (frees its memory for sampling and training)")
    g.add_argument("--vae-micro-batch", type=int, default=None, help="frames per VAE spatial-decoder call "
                   "(opensora; Open-Sora's 4): lower decodes in more, smaller chunks")
    g.add_argument("--split-pair", action="store_true", help="DPO forward/backward of winners and losers one after "
                   "the other: half the activation memory for one extra no-grad forward (same gradient)")
    g = p.add_argument_group("many GPUs (torchrun --nproc_per_node G train.py ...)")
    g.add_argument("--fsdp", action="store_true", help="shard policy and reference with FSDP2 (fully_shard) "
                   "instead of replicating them with DDP (models that do not fit on one GPU)")
    g = p.add_argument_group("output and resume")
    g.add_argument("--out", default="runs/vpo")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (and at the end)")
    g.add_argument("--sample-every", type=int, default=0, help="write eval mp4s every this many steps; 0 = never")
    g.add_argument("--eval-prompts", default=None, help="fixed prompts for --sample-every")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --out, or from the given checkpoint folder")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run: "
                   "its metrics, checkpoints, samples and offline pairs are deleted")
    g.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many NaN/inf steps in a row")
    args = p.parse_args(argv)
    args.reward = args.reward or DEFAULT_REWARDS.get(args.model, "videoscore")
    args.prompts = args.prompts or default_prompts(args.model, "train")
    args.eval_prompts = args.eval_prompts or default_prompts(args.model, "eval")
    return args


def check_args(args):
    check_model_args(args)  # names and sizes first: loading a reward or a model takes minutes
    reward_names(args.reward)
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
    check_values(args)


def check_values(args):
    """Numbers that parse but cannot be meant: each is refused in one line (README: Reliability)."""
    for name, why in (("lr", "0 never moves the weights"), ("max_grad_norm", "0 clips every gradient to nothing")):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0 ({why}), got {value}")
    if args.beta is not None and (not math.isfinite(args.beta) or args.beta <= 0):
        raise UserError(f"--beta must be a finite number > 0 (beta < 0 trains toward the loser, 0 not at all), "
                        f"got {args.beta}")
    for name in ("weight_decay", "min_gap"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name, low in (("save_every", 1), ("max_bad_steps", 1), ("reward_batch", 1), ("sample_every", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.method == "grpo":
        for name, ok in (("grpo_noise_level", lambda v: v > 0), ("grpo_clip", lambda v: v > 0),
                         ("grpo_beta", lambda v: v >= 0), ("grpo_timestep_fraction", lambda v: 0 < v <= 1)):
            value = getattr(args, name)
            if value is not None and (not math.isfinite(value) or not ok(value)):
                raise UserError(f"--{name.replace('_', '-')} out of range: {value} (see --help)")
        if args.grpo_micro_batch < 0:
            raise UserError(f"--grpo-micro-batch must be at least 1 (0: all videos at once), got {args.grpo_micro_batch}")
    if not math.isfinite(args.eta) or not 0 < args.eta <= 1:
        raise UserError(f"--eta must be in (0, 1] (the noise level of the corrupted copies), got {args.eta}")
    if not math.isfinite(args.label_fraction) or not 0 < args.label_fraction <= 1:
        raise UserError(f"--label-fraction must be in (0, 1] (the share of labelled pairs kept), "
                        f"got {args.label_fraction}")
    if args.label_fraction < 1 and args.method not in GUIDED:
        raise UserError("--label-fraction is for --method dense or structural (DenseDPO's data-efficiency runs)")
    if args.segment_seconds is not None and (not math.isfinite(args.segment_seconds) or args.segment_seconds <= 0):
        raise UserError(f"--segment-seconds must be a finite number > 0, got {args.segment_seconds}")
    if (args.videos is None) != (args.captions is None):
        raise UserError("--videos and --captions go together: a folder of clips and the file that captions them")
    if args.videos and args.method not in GUIDED:
        raise UserError(f"--videos are the sources of guided candidates: use them with --method dense or structural, "
                        f"not {args.method}")
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be at least 1 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_alpha is not None and (not math.isfinite(args.lora_alpha) or args.lora_alpha <= 0):
        raise UserError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if not math.isfinite(args.lora_dropout) or not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    lora_only = [f for f in ("lora_alpha", "lora_dropout", "lora_targets", "merge_lora")
                 if getattr(args, f) not in (None, False, 0.0)]
    if lora_only and not args.lora_rank:
        raise UserError(f"--{lora_only[0].replace('_', '-')} needs --lora-rank (LoRA is off)")
    if args.lora_rank and args.ref_offload:
        raise UserError("--ref-offload has nothing to offload with --lora-rank: the reference is an adapter")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")


def warn(message: str):
    if parallel.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Deterministic data and noise: everything random is a function of (seed, stream, prompt counter), so a resumed
# run draws exactly what an uninterrupted one would, and no two streams draw the same numbers (inputs.stream_seed).


@functools.lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """One pass over `count` prompts in its own random order (cached: a 10M-clip dataset is one randperm per pass)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(stream_seed("order", seed, epoch)))


def prompt_index(count: int, seed: int, counter: int) -> int:
    """Which of `count` prompts is prompt `counter` of the run: each pass over the file in its own random order."""
    epoch, pos = divmod(counter, count)
    return int(epoch_order(count, seed, epoch)[pos])


def prompt_at(prompts: list[str], seed: int, counter: int) -> str:
    return prompts[prompt_index(len(prompts), seed, counter)]


def candidate_seeds(seed: int, counter: int, n: int, stream: str = "candidate") -> list[int]:
    """The starting noise of prompt `counter`'s N candidates (Alg. 1 line 4); DenseDPO's source video ("source")
    and its corrupted copies ("guided") have their own streams."""
    return [stream_seed(stream, seed, counter, j) for j in range(n)]


def dpo_generator(seed: int, counter: int) -> torch.Generator:
    """The DPO noise and t of the pair made from prompt `counter` (Alg. 1 line 7)."""
    return torch.Generator().manual_seed(stream_seed("dpo", seed, counter))


def label_generator(seed: int, counter: int) -> torch.Generator:
    """Which of prompt `counter`'s labelled pairs --label-fraction keeps."""
    return torch.Generator().manual_seed(stream_seed("labels", seed, counter))


def refl_generator(seed: int, counter: int) -> torch.Generator:
    """ReFL's stopping step for the prompt batch starting at `counter`."""
    return torch.Generator().manual_seed(stream_seed("refl-stop", seed, counter))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint-<step>/ written to a temporary folder, then renamed (atomic on one filesystem).
# Full (unsharded) weights and optimizer state: a checkpoint resumes on any number of ranks, DDP or FSDP2.


def save_checkpoint(out: str, model, ref, opt, state: dict, args, adapters: dict | None = None) -> str:
    """Every rank calls this (gathering sharded weights is collective); rank 0 writes. state.json, written last,
    records every file's size, so a file cut short later (a full disk, a copy) is recognised, not half-loaded.
    With LoRA (`adapters`, the adapter config) the folder holds the two adapters instead of the network, the
    policy's in diffusers' layout (load_lora_weights), and with --merge-lora also the merged full weights."""
    if adapters:
        policy = reference = None
        states = {name: lora.adapter_state(model.dit, name) for name in (lora.POLICY, lora.REFERENCE)}
        merged = lora.merged_network(model.dit) if args.merge_lora else None
    else:
        policy, reference = parallel.savable(model.dit), parallel.savable(ref) if ref is not None else None
    opt_state = parallel.optimizer_state(model.dit, opt)
    final = os.path.join(out, f"checkpoint-{state['step']}")
    if parallel.is_main():
        tmp = os.path.join(out, f".tmp-checkpoint-{state['step']}")
        shutil.rmtree(tmp, ignore_errors=True)
        if adapters:
            lora.save_files(tmp, states, {**adapters, "base": args.dit}, model.name)
            if merged is not None:
                model.save_weights(tmp, net=merged)  # loadable as --dit, like a full fine-tuning checkpoint
        else:
            model.save_weights(tmp, net=policy)  # policy: model.safetensors + config.json, loadable as --dit
        if reference is not None:
            model.save_weights(tmp, net=reference, file="ref.safetensors")
        torch.save(opt_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "files": files}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    parallel.barrier()
    return final


def checkpoints(out: str) -> list[str]:
    """OUT/checkpoint-<step> folders, oldest first (not .tmp-checkpoint-*, not checkpoint-8.bak)."""
    found = [p for p in glob.glob(os.path.join(out, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+",
                                                                                     os.path.basename(p))]
    return sorted(found, key=step_of)


def step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("-", 1)[1])


def latest_checkpoint(out: str) -> str | None:
    found = checkpoints(out)
    return found[-1] if found else None


def read_state(path: str) -> dict:
    """A checkpoint's state.json: a JSON object with an integer step; one line if it is anything else."""
    file = os.path.join(path, "state.json")
    if not os.path.isfile(file):
        raise UserError(f"{path} is not a train.py checkpoint (no state.json)")
    state = read_json(file, "checkpoint state")
    if not isinstance(state.get("step"), int):
        raise UserError(f"checkpoint state {file!r} is damaged (no integer step)")
    return state


def check_checkpoint(path: str) -> dict:
    """The checkpoint's state if every file is whole; a UserError naming the damaged file otherwise."""
    state = read_state(path)
    files = state.pop("files", None)  # sizes recorded at save (checkpoints of earlier versions have none)
    names = files or [n for n in os.listdir(path) if n.endswith(".safetensors")] + ["optimizer.pt", "rng.pt"]
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{path} is damaged: {name} is missing")
        if files and os.path.getsize(file) != files[name]:
            raise UserError(f"{path} is damaged: {name} has {os.path.getsize(file)} bytes, {files[name]} were saved")
        if name.endswith(".safetensors"):
            check_safetensors(file, f"{path}:")
        elif name.endswith(".pt") and not zipfile.is_zipfile(file):  # torch.save writes a zip archive
            raise UserError(f"{path} is damaged: {name} is not a torch.save file (cut short?)")
    return state


def load_checkpoint(path: str, model, ref, adapters: dict | None = None) -> dict:
    """Weights into the plain (not yet wrapped or sharded) networks; the optimizer follows in load_optimizer.
    With LoRA, the two adapters; a checkpoint of the other kind, or of other adapters, is refused in one line."""
    state = check_checkpoint(path)
    saved = lora.read_config(path) if os.path.isfile(os.path.join(path, lora.CONFIG_FILE)) else None
    if saved and not adapters:
        raise UserError(f"{path} holds LoRA adapters (rank {saved['rank']}): resume with --lora-rank {saved['rank']}")
    if adapters and not saved:
        raise UserError(f"{path} holds full weights, not LoRA adapters: resume it without --lora-rank")
    if adapters:
        lora.check_same(saved, adapters, path)
        lora.load_adapter(os.path.join(path, lora.ADAPTER_FILE), model.dit, model.name, lora.POLICY)
        lora.load_adapter(os.path.join(path, lora.REFERENCE_FILE), model.dit, model.name, lora.REFERENCE)
        return state
    model.load_weights(os.path.join(path, "model.safetensors"))
    if ref is not None:
        model.load_weights(os.path.join(path, "ref.safetensors"), net=ref)
    return state


def load_optimizer(path: str, model, opt):
    parallel.load_optimizer_state(model.dit, opt, torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    torch.set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True)["torch"])


def finite_weights(path: str) -> bool:
    from safetensors.torch import load_file

    try:
        adapter = os.path.join(path, lora.ADAPTER_FILE)
        file = adapter if os.path.isfile(adapter) else os.path.join(path, "model.safetensors")
        return all(bool(torch.isfinite(t).all()) for t in load_file(file).values())
    except Exception:  # noqa: BLE001 - a damaged file is not a good checkpoint
        return False


def last_good_checkpoint(out: str, bad_since: int) -> str | None:
    """After a NaN stop: the newest checkpoint whose weights are finite and did not produce the first bad step
    (weights saved at step s make step s + 1's samples)."""
    return next((p for p in reversed(checkpoints(out)) if step_of(p) < bad_since - 1 and finite_weights(p)), None)


# ----------------------------------------------------------------------------------------------------------
# The run folder: one run at a time, never mixed with another, metrics rewritten atomically


HELD_LOCKS = []  # this process's OUT/.lock files; a killed run's stale lock is recognised by its dead pid


@atexit.register
def release_locks():
    while HELD_LOCKS:
        lock = HELD_LOCKS.pop()
        if os.path.exists(lock):
            os.remove(lock)


def live_holder(lock: str) -> int | None:
    """The process id in OUT/.lock if that process is alive and not this one; None for no lock or a stale one."""
    try:
        with open(lock) as f:
            pid = int(f.read().strip())
        if pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it exists, and is another user's
        return pid
    except (OSError, ValueError):  # no lock, an unreadable one, or a dead process: a killed run's stale lock
        return None
    return pid


def claim(out: str, resume: bool, overwrite: bool):
    """--out is writable, no other live run writes to it (OUT/.lock holds the writer's pid), and a fresh run does
    not mix with an old one there."""
    writable_dir(out, "--out")
    lock = os.path.join(out, ".lock")
    holder = live_holder(lock)
    if holder is not None:
        raise UserError(f"another run (pid {holder}) is writing to {out}; wait for it, or give another --out (if no "
                        f"run is, delete {lock})")
    with open(lock, "w") as f:
        f.write(str(os.getpid()))
    HELD_LOCKS.append(lock)
    metrics = os.path.join(out, "metrics.jsonl")
    old = checkpoints(out) + ([metrics] if os.path.isfile(metrics) and os.path.getsize(metrics) else [])
    if old and not resume and not overwrite:
        raise UserError(f"{out} already holds a run ({os.path.basename(old[-1])}); continue it with --resume, or "
                        "delete it with --overwrite")
    if overwrite:
        for path in checkpoints(out) + [os.path.join(out, "samples")]:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("metrics.jsonl", "offline_pairs.pt", "args.json"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def set_aside_newer(out: str, step: int):
    """Resuming from an older checkpoint: the newer checkpoints and eval samples belong to a timeline that is being
    replaced. They move to OUT/superseded-<time>/, never deleted, so a later --resume cannot jump onto them."""
    newer = [p for p in checkpoints(out) + glob.glob(os.path.join(out, "samples", "step-*"))
             if re.fullmatch(r"(checkpoint|step)-\d+", os.path.basename(p)) and step_of(p) > step]
    if newer and parallel.is_main():
        folder = os.path.join(out, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        for path in newer:
            target = os.path.join(folder, os.path.relpath(path, out))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
        warn(f"resuming from step {step}: moved {', '.join(os.path.relpath(p, out) for p in newer)} to {folder}")
    parallel.barrier()


# ----------------------------------------------------------------------------------------------------------
# Memory levers (README "Memory levers"): what stays on the accelerator besides the policy and its optimizer


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
# The job


class Run:
    """One training job. `model`, `reward` and `prompts` may be passed in already built (bench.py's random
    full-size models); with `args.out` None nothing is written (no metrics file, checkpoints or eval samples)."""

    def __init__(self, args: argparse.Namespace, model=None, reward=None, prompts: list[str] | None = None):
        check_args(args)
        args.device = parallel.setup(args.device)
        self.args = args
        if args.out is not None and parallel.is_main():  # before minutes of loading: a bad --out fails now
            claim(args.out, bool(args.resume), args.overwrite)
        # DenseDPO from real videos: (file, caption) per clip, the captions are the prompts
        self.clips = dataset.list_clips(args.videos, args.captions) if args.videos else None
        self.prompts = prompts or (None if self.clips else load_prompts(args.prompts, args.prompt_column))
        self.eval_prompts = load_prompts(args.eval_prompts)[:4] if args.sample_every else []
        self.reward = reward or build_reward(args.reward, device=args.device, path=args.reward_path,
                                             batch_size=args.reward_batch, offload=args.reward_offload)
        self.dim = args.reward_dim or self.reward.default_dim
        # a bad name or weight: one line now, not at the first score
        if isinstance(parse_dim(self.dim, self.reward.dims), dict) and args.method == "refl":
            raise UserError("--method refl maximises one score of single videos; a weighted --reward-dim is scaled by "
                            "the spread among one prompt's N candidates, which ReFL does not sample: name one "
                            "dimension or global")
        if args.method == "refl" and not hasattr(self.reward, "score_float"):
            raise UserError(f"--method refl needs a differentiable reward; {args.reward!r} is not")
        for part in vars(self.reward).values():  # the reward is a judge, never trained (ReFL's gradients stop at it)
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        self.model = model = model or model_from_args(args)
        if self.clips:  # probed now that the model's frames and fps are known
            self.clips, skipped = dataset.usable(self.clips, model.frames, model.fps)
            for line in skipped:
                warn(line)
            if skipped:
                warn(f"{len(skipped)} of {len(skipped) + len(self.clips)} clips skipped; training on {len(self.clips)}")
            self.prompts = [caption for _, caption in self.clips]
        self.memory_levers()
        self.beta = args.beta if args.beta is not None else model.beta
        # G_ref <- G_theta at the start (Alg. 1 line 1); ReFL has no reference, and holds no copy (Fig. 7 memory).
        # Stored as the policy is (fp32), so both take the same numeric path: equal weights give equal errors under
        # bf16 autocast too (a bf16-stored copy would see a rounded timestep and a bf16 residual stream).
        # With LoRA the reference is a second adapter on the same network (lora.py): no copy of the network.
        self.adapters = lora.add_adapters(model.dit, args.lora_rank, args.lora_alpha, args.lora_dropout,
                                          args.lora_targets, args.seed) if args.lora_rank else None
        self.ref = model.frozen_copy() if args.method != "refl" and not self.adapters else None
        self.segments = self.segments_of(model)
        self.state = {"model": args.model, "step": 0, "prompts_seen": 0, "ties": 0, "bad_steps": 0,
                      "skipped_nan": 0, "ref_updates": 0}
        resume = self.resume_from()
        # many ranks: DDP replicates the policy (rank 0's weights broadcast), or FSDP2 shards policy and reference
        self.net = parallel.wrap(model, args.fsdp)
        if args.fsdp and self.ref is not None:
            parallel.shard(self.ref, model.dtype)
        if self.ref is not None and args.ref_offload:
            self.ref.to("cpu")
        params = lora.trainable(model.dit) if self.adapters else model.dit.parameters()
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        if resume:
            load_optimizer(resume, model, self.opt)
            for group in self.opt.param_groups:  # flags given now win over the saved optimizer's
                group.update(lr=args.lr, weight_decay=args.weight_decay)
        self.start_metrics(resume)
        self.bar = None
        self.new_step()

    @property
    def step(self) -> int:
        return self.state["step"]

    def memory_levers(self):
        args, model = self.args, self.model
        if args.method == "refl" and not hasattr(model, "predict_x0"):
            raise UserError(f"--method refl is implemented for the Open-Sora family (opensora, toy, tiny), "
                            f"not {args.model!r}")
        if args.method == "grpo" and not hasattr(model, "sample_sde"):
            raise UserError(f"--method grpo needs a flow-matching model (opensora, toy, tiny, wan), not {args.model!r}: "
                            "its sampler has no SDE form here")
        if args.vae_micro_batch:
            if not hasattr(model.vae, "micro_batch_size"):
                raise UserError(f"--vae-micro-batch applies to Open-Sora's VAE, not to model {args.model!r}")
            model.vae.micro_batch_size = args.vae_micro_batch
        model.set_grad_checkpointing(not args.no_grad_checkpointing)
        cache_prompts(model, self.prompts + self.eval_prompts, args.text_encoder_offload)

    def segments_of(self, model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The ((frames), (latent frames)) ranges labelled one by one: DenseDPO's segments of --segment-seconds,
        mapped through the VAE's frame arithmetic (dpo.segments); one segment, the whole video, otherwise."""
        if self.args.method != "dense":
            return [((0, model.frames), (0, model.latent_shape[1]))]
        seconds = self.args.segment_seconds or model.segment_seconds
        return dpo.segments(model.latent_spans, max(1, round(seconds * model.fps)))

    # --- resume and the metrics file
    def resume_from(self) -> str | None:
        """Loads the checkpoint's weights into policy and reference (before wrapping); its folder, or None.
        A damaged latest checkpoint is named and the one before it is used; the newer ones are set aside."""
        args = self.args
        if not args.resume:
            return None
        path = args.resume
        if args.resume == "latest" and not checkpoints(args.out):  # killed before its first checkpoint
            warn(f"--resume: no checkpoint in {args.out} yet; starting from step 0")
            return None
        if args.resume == "latest":
            path = None
            for candidate in reversed(checkpoints(args.out)):
                try:
                    check_checkpoint(candidate)
                    path = candidate
                    break
                except UserError as e:
                    warn(f"{e}; trying the checkpoint before it")
            if path is None:
                raise UserError(f"--resume: no intact checkpoint-<step> folder in {args.out}")
        self.state = load_checkpoint(path, self.model, self.ref, self.adapters)
        if self.state.get("model") != args.model:
            raise UserError(f"{path} is a checkpoint of model {self.state.get('model')!r}, not {args.model!r}")
        set_aside_newer(args.out, self.step)
        return path

    def start_metrics(self, resume: str | None):
        """metrics.jsonl: cut back to the resumed step (rows logged after the checkpoint by the interrupted run
        are dropped), or started empty; rewritten through a temporary file and a rename, never emptied in place."""
        self.metrics_path = os.path.join(self.args.out, "metrics.jsonl") if self.args.out else None
        if self.metrics_path is None or not parallel.is_main():
            return
        if resume:
            rows = read_metrics(self.metrics_path) if os.path.isfile(self.metrics_path) else []
            write_atomically(self.metrics_path, [json.dumps(r) + "\n" for r in rows if r["step"] <= self.step])
        else:
            write_atomically(self.metrics_path, [])
            write_atomically(os.path.join(self.args.out, "args.json"), [json.dumps(vars(self.args), indent=1)])

    # --- one step
    def new_step(self):
        """What the step accumulates on this rank: metric lists, phase seconds, pairs, ties, a NaN flag."""
        self.log = {key: [] for key in LOG_KEYS + tuple(f"reward/{d}" for d in self.reward.dims)}
        self.times = dict.fromkeys(("sample", "decode", "reward", "train"), 0.0)
        self.pairs, self.ties, self.finite = 0, 0, True

    @contextlib.contextmanager
    def clock(self, phase: str):
        """Seconds spent in a phase of the step (metrics time_*; sample, decode, reward, the rest is train)."""
        tic = time.perf_counter()
        yield
        self.times[phase if phase in self.times else "train"] += time.perf_counter() - tic

    def batches(self):
        """This rank's share of the step's global batch, every WORLD-th prompt counter (1 rank: all of them), in
        groups of --sample-batch: (counters, last), last for the step's final group, whose backward reduces the
        gradients across ranks."""
        args = self.args
        if self.bar is None:
            self.bar = tqdm(total=args.steps, initial=self.step, desc=METHOD_NAMES[args.method], dynamic_ncols=True,
                            disable=not parallel.is_main() or args.out is None)  # bench.py: no bar
            self.model.dit.train()
        self.new_step()
        self.opt.zero_grad(set_to_none=True)
        mine = [self.state["prompts_seen"] + i for i in range(parallel.RANK, args.batch_size, parallel.WORLD)]
        self.state["prompts_seen"] += args.batch_size
        for first in range(0, len(mine), args.sample_batch):
            yield mine[first: first + args.sample_batch], first + args.sample_batch >= len(mine)

    def prompt(self, counter: int) -> str:
        return prompt_at(self.prompts, self.args.seed, counter)

    def candidate_seeds(self, counter: int, n: int | None = None, stream: str = "candidate") -> list[int]:
        return candidate_seeds(self.args.seed, counter, n or self.args.n, stream)

    def source(self, counters: list[int]) -> torch.Tensor:
        """DenseDPO's source videos, one per prompt: the prompt's own clip of --videos, encoded; without a dataset,
        the current policy's own fresh sample."""
        model = self.model
        if self.clips:
            files = [self.clips[prompt_index(len(self.clips), self.args.seed, c)][0] for c in counters]
            return model.encode(torch.stack([dataset.read_clip(f, model.frames, model.fps, model.height, model.width)
                                             for f in files]))
        prompts = [self.prompt(c) for c in counters]
        return model.sample(prompts, 1, [self.candidate_seeds(c, 1, "source")[0] for c in counters])

    def dpo_generator(self, counter: int) -> torch.Generator:
        return dpo_generator(self.args.seed, counter)

    def label_generator(self, counter: int) -> torch.Generator:
        return label_generator(self.args.seed, counter)

    def refl_generator(self, counter: int) -> torch.Generator:
        return refl_generator(self.args.seed, counter)

    def reference(self):
        """The reference network, on the accelerator for the duration (--ref-offload keeps it on the CPU); with
        LoRA, the network itself through the reference adapter."""
        if self.adapters:
            return lora.reference(self.model.dit)
        return borrowed(self.ref, self.model.device, self.args.ref_offload)

    def optimizer_step(self):
        """Alg. 1 line 10: clip and step, once every rank's gradients are in. A NaN/inf loss, gradient or sample
        anywhere skips the step on every rank and keeps the weights as they were."""
        tic = time.perf_counter()
        args, state, device = self.args, self.state, self.model.device
        finite = parallel.all_true(self.finite, device)
        self.pairs, ties = parallel.total(self.pairs, device), parallel.total(self.ties, device)
        state["ties"] += ties
        self.grad_norm = None
        if self.pairs and finite:
            norm = torch.nn.utils.clip_grad_norm_(self.model.dit.parameters(), args.max_grad_norm)
            self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
            finite = math.isfinite(self.grad_norm)  # identical on every rank: the gradients were reduced
        if self.pairs and finite:
            self.opt.step()
            local = [getattr(p, "_local_tensor", p) for p in self.model.dit.parameters()]  # FSDP2: this rank's shard
            finite = parallel.all_true(bool(torch.stack([torch.isfinite(p).all() for p in local]).all()),
                                       device)  # --lr 1e30 gives inf weights: one device sync, not one per tensor
        if self.pairs and finite:
            state["bad_steps"] = 0
        elif not finite:
            if state["bad_steps"] == 0:
                state["bad_since"] = state["step"] + 1  # the first step of this streak
            state["bad_steps"] += 1
            state["skipped_nan"] += 1
        self.opt.zero_grad(set_to_none=True)
        state["step"] += 1
        self.times["train"] += time.perf_counter() - tic

    def update_reference(self):
        """Alg. 1 line 14, the curriculum update: G_ref <- G_theta, on every rank at the same step."""
        tic = time.perf_counter()
        if self.adapters:
            lora.update_reference(self.model.dit)
        else:
            dpo.update_reference(self.ref, self.model.dit)
        self.state["ref_updates"] += 1
        self.times["train"] += time.perf_counter() - tic

    def end_step(self):
        """The step's metrics row (every rank's lists joined), the progress bar, the NaN stop, the checkpoint and
        the eval samples."""
        args, state = self.args, self.state
        log, times = parallel.merge_logs(parallel.gather((self.log, self.times)))
        mean = lambda v: sum(v) / len(v) if v else None
        row = {"step": state["step"], "pairs": self.pairs, "ties": state["ties"], "ref_updates": state["ref_updates"],
               "skipped_nan": state["skipped_nan"], "grad_norm": self.grad_norm, "lr": args.lr, "beta": self.beta,
               "method": args.method, "reward_dim": self.dim, **{key: mean(v) for key, v in log.items()},
               **{f"time_{k}": round(v, 3) for k, v in times.items()}}
        if self.metrics_path and parallel.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        self.bar.set_postfix_str(f"loss {fmt(row['loss'])} r {fmt(row['reward_mean'])} w {fmt(row['reward_w'])} "
                                 f"l {fmt(row['reward_l'])} acc {fmt(row['accuracy'])} ties {state['ties']}")
        if state["bad_steps"] >= args.max_bad_steps:
            last = last_good_checkpoint(args.out, state["bad_since"]) if args.out else None
            raise UserError(f"stopping: {state['bad_steps']} optimizer steps in a row had a NaN/inf loss, gradient "
                            f"or sample (lower --lr or --beta); last good checkpoint: {last or 'none'}")
        if args.out is None:
            return
        if args.sample_every and state["step"] % args.sample_every == 0:  # before the checkpoint: the step is done
            self.write_eval_samples()                                      # when both are on disk
        if state["bad_steps"] == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            save_checkpoint(args.out, self.model, self.ref, self.opt, state, args, self.adapters)

    def write_eval_samples(self):
        """Every rank samples (a sharded network needs all ranks in every forward); rank 0 writes."""
        folder = os.path.join(self.args.out, "samples", f"step-{self.step}")
        tmp = os.path.join(self.args.out, "samples", f".tmp-step-{self.step}")  # renamed when complete
        names = video_names(self.eval_prompts, 2)
        for k, (_, videos) in enumerate(sample_videos(self.model, self.eval_prompts, 2, self.args.seed)):
            if parallel.is_main():
                os.makedirs(tmp, exist_ok=True)
                for name, video in zip(names[k], videos):
                    write_video(os.path.join(tmp, name), video, self.model.fps)
        if parallel.is_main():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        return self.state
