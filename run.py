"""A training job: everything around Algorithm 1 that train.py should not have to show.

`Run` holds one job: the flags, the model and its reference, the reward, AdamW, the step counter and what the
step logs. train.py's loop calls its methods by name, in this order each step:
    for counters, last in run.batches(): ...     # this rank's share of the step's prompts
    run.optimizer_step()                          # clip, AdamW; a NaN/inf step is skipped on every rank
    run.update_reference()                        # every K steps (Alg. 1 line 14)
    run.end_step()                                # metrics.jsonl, progress bar, checkpoint, eval mp4s
Also here: deterministic prompts and seeds, and the memory levers. The flags are flags.py's, checkpoints and the
run folder checkpoint.py's.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import time

import torch
from tqdm import tqdm

import dataset
import dpo
import lora
import parallel
from checkpoint import (check_checkpoint, checkpoints, claim, last_good_checkpoint, load_checkpoint, load_optimizer,
                        save_checkpoint, set_aside_newer)
from flags import METHOD_NAMES, check_args
from inputs import UserError, load_prompts, read_metrics, stream_seed, video_names, write_atomically
from parallel import warn
from reward import build_reward, parse_dim, pick
from sample import model_from_args, sample_videos
from videos import write_video

LOG_KEYS = ("loss", "accuracy", "margin", "kl", "reward_mean", "reward_w", "reward_l", "gap", "labelled",
            "ratio", "clipped")  # the last two: GRPO's importance ratio and the share of it clipped
MAX_BAD_STEPS = 3  # NaN/inf steps in a row before the run stops


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
    and its aligned copies (the stream named "guided") have their own streams."""
    return [stream_seed(stream, seed, counter, j) for j in range(n)]


def dpo_generator(seed: int, counter: int, index: int = 0) -> torch.Generator:
    """The DPO noise and t of the pair made from prompt `counter` (Alg. 1 line 7); DenseDPO's further pairs of one
    prompt (index 1, 2, ...) draw their own, so no two pairs share a noise and a t."""
    ids = (counter,) if index == 0 else (counter, index)
    return torch.Generator().manual_seed(stream_seed("dpo", seed, *ids))


def label_generator(seed: int, counter: int) -> torch.Generator:
    """Which of prompt `counter`'s labelled pairs --label-fraction keeps."""
    return torch.Generator().manual_seed(stream_seed("labels", seed, counter))


def refl_generator(seed: int, counter: int) -> torch.Generator:
    """ReFL's stopping step for the prompt batch starting at `counter`."""
    return torch.Generator().manual_seed(stream_seed("refl-stop", seed, counter))


# ----------------------------------------------------------------------------------------------------------
# Memory levers (README "Memory levers"): what stays on the accelerator besides the policy and its optimizer


def cache_prompts(model, prompts: list[str], offload: str):
    """The prompt-embedding cache: every prompt the run will use is encoded once, then the text encoder is freed
    (T5-XXL: 4.8 B parameters) or parked on the CPU, where it still encodes an unseen prompt (slowly)."""
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

    def __init__(self, args: argparse.Namespace, method, model=None, reward=None, prompts: list[str] | None = None):
        check_args(args)
        torch.manual_seed(stream_seed("torch", args.seed))  # torch starts from a random seed; rng.pt saves this state
        self.method = method  # train.METHODS[args.method]: what differs between the methods
        args.device = parallel.setup(args.device)
        self.args = args
        if args.out is not None and parallel.is_main():  # before minutes of loading: a bad --out fails now
            claim(args.out, bool(args.resume), args.overwrite)
        # DenseDPO from real videos: (file, caption) per clip, the captions are the prompts
        self.clips = dataset.list_clips(args.videos, args.captions) if args.videos else None
        self.prompts = prompts or (None if self.clips else load_prompts(args.prompts))
        self.eval_prompts = load_prompts(args.eval_prompts)[:4] if args.sample_every else []
        self.reward = reward or build_reward(args.reward, device=args.device, path=args.reward_path,
                                             batch_size=args.reward_batch, offload=args.reward_offload)
        self.dim = args.reward_dim or self.reward.default_dim
        # --eval-reward: a held-out judge of the eval samples, on the rank that logs (see held_out)
        self.eval_reward = (build_reward(args.eval_reward, device=args.device)
                            if args.eval_reward and parallel.is_main() else None)
        self.eval_dim = args.eval_reward_dim or getattr(self.eval_reward, "default_dim", None)
        self.evals = []  # (trained, held-out) at each evaluation so far: the hacking warning's history
        self.warned_streak = None  # where the streak that was warned about began (watch_hacking)
        parse_dim(self.dim, self.reward.dims)  # a bad name or weight: one line now, not at the first score
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
        if method.check:  # a model or reward this method cannot use: one line, before anything is written
            method.check(self)
        self.memory_levers()
        self.beta = args.beta if args.beta is not None else model.beta
        # G_ref <- G_theta at the start (Alg. 1 line 1); ReFL has no reference, and holds no copy (Fig. 7 memory).
        # Stored as the policy is (fp32), so both take the same numeric path: equal weights give equal errors under
        # bf16 autocast too (a bf16-stored copy would see a rounded timestep and a bf16 residual stream).
        # With LoRA the reference is a second adapter on the same network (lora.py): no copy of the network.
        self.adapters = lora.add_adapters(model.dit, args.lora_rank, args.lora_alpha, args.lora_dropout,
                                          args.lora_targets, args.seed) if args.lora_rank else None
        if self.adapters and model.dtype != torch.float32 and not args.fsdp:  # FSDP2 shards one dtype per block
            lora.store_base(model.dit, model.dtype)
        self.ref = model.frozen_copy() if method.reference != "none" and not self.adapters else None
        self.segments = self.segments_of(model)
        self.state = {"model": args.model, "step": 0, "prompts_seen": 0, "ties": 0, "bad_steps": 0,
                      "skipped_nan": 0, "ref_updates": 0}
        self.superseded = None  # where resume_from set a newer timeline aside
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
            for group in self.opt.param_groups:  # flags given now win over the saved optimizer's; betas come back
                # from the file as a list: a tuple again, so the resumed run's optimizer.pt is byte for byte the same
                group.update(lr=args.lr, weight_decay=args.weight_decay, betas=tuple(group["betas"]))
        self.start_metrics(resume)
        self.bar = None
        self.new_step()

    @property
    def step(self) -> int:
        return self.state["step"]

    def memory_levers(self):
        args, model = self.args, self.model
        if args.vae_micro_batch:
            if not hasattr(model.vae, "micro_batch_size"):
                raise UserError(f"--vae-micro-batch applies to Open-Sora's VAE, not to model {args.model!r}")
            model.vae.micro_batch_size = args.vae_micro_batch
        model.set_grad_checkpointing(not args.no_grad_checkpointing)
        cache_prompts(model, self.prompts + self.eval_prompts, args.text_encoder_offload)

    def segments_of(self, model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The ((frames), (latent frames)) ranges labelled one by one: DenseDPO's segments of --segment-seconds,
        mapped through the VAE's frame arithmetic (dpo.segments); one segment, the whole video, otherwise."""
        if not self.method.per_segment:
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
        self.superseded = set_aside_newer(args.out, self.step)
        return path

    def start_metrics(self, resume: str | None):
        """metrics.jsonl: cut back to the resumed step, or started empty. Rows of a timeline set aside (resumed from an
        older checkpoint) move to its superseded-<time>/metrics.jsonl; rows logged after the latest checkpoint by a
        killed run are dropped (the resumed run logs those steps again); rewritten through a temporary file and a rename, never emptied in place."""
        self.metrics_path = os.path.join(self.args.out, "metrics.jsonl") if self.args.out else None
        if self.metrics_path is None or not parallel.is_main():
            return
        if resume:
            rows = read_metrics(self.metrics_path) if os.path.isfile(self.metrics_path) else []
            newer = [json.dumps(r) + "\n" for r in rows if r["step"] > self.step]
            if newer and self.superseded:  # the timeline set aside keeps its rows beside its checkpoints
                write_atomically(os.path.join(self.superseded, "metrics.jsonl"), newer)
            write_atomically(self.metrics_path, [json.dumps(r) + "\n" for r in rows if r["step"] <= self.step])
            self.evals = [(r["eval_trained"], r["eval_heldout"]) for r in rows
                          if r["step"] <= self.step and r.get("eval_heldout") is not None]
        else:
            write_atomically(self.metrics_path, [])
            write_atomically(os.path.join(self.args.out, "args.json"), [json.dumps(vars(self.args), indent=1)])

    # --- one step
    def new_step(self):
        """What the step accumulates on this rank: metric lists, phase seconds, pairs, ties, a NaN flag."""
        self.log = {key: [] for key in LOG_KEYS + tuple(f"reward/{d}" for d in self.reward.dims)}
        self.times = dict.fromkeys(("sample", "decode", "reward", "train"), 0.0)
        self.examples, self.ties, self.finite = 0, 0, True  # examples: pairs, or GRPO's videos, or ReFL's prompts

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

    def preference(self, scores: dict[str, torch.Tensor], group: int | None = None) -> torch.Tensor:
        """The score a preference is built on (--reward-dim: one dimension, global, or a weighted mix over each
        group of N candidates of a prompt), so that the methods need not know the reward (reward.pick)."""
        return pick(scores, self.dim, group)

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

    def dpo_generator(self, counter: int, index: int = 0) -> torch.Generator:
        return dpo_generator(self.args.seed, counter, index)

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
        self.examples, ties = parallel.total(self.examples, device), parallel.total(self.ties, device)
        state["ties"] += ties
        self.grad_norm = None
        if self.examples and finite:
            norm = torch.nn.utils.clip_grad_norm_(self.model.dit.parameters(), args.max_grad_norm)
            self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
            finite = math.isfinite(self.grad_norm)  # identical on every rank: the gradients were reduced
        if self.examples and finite:
            self.opt.step()
            local = [getattr(p, "_local_tensor", p) for p in self.model.dit.parameters()]  # FSDP2: this rank's shard
            finite = parallel.all_true(bool(torch.stack([torch.isfinite(p).all() for p in local]).all()),
                                       device)  # --lr 1e30 gives inf weights: one device sync, not one per tensor
        if self.examples and finite:
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
        row = {"step": state["step"], "pairs": self.examples, "ties": state["ties"], "ref_updates": state["ref_updates"],
               "skipped_nan": state["skipped_nan"], "grad_norm": self.grad_norm, "lr": args.lr, "beta": self.beta,
               "method": args.method, "reward_dim": self.dim, **{key: mean(v) for key, v in log.items()},
               **{f"time_{k}": round(v, 3) for k, v in times.items()}}
        if args.out is not None and args.sample_every and state["step"] % args.sample_every == 0:
            row.update(self.write_eval_samples())  # before the row and the checkpoint: the step is done when all
        if self.metrics_path and parallel.is_main():  # three are on disk
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        self.bar.set_postfix_str(f"loss {fmt(row['loss'])} r {fmt(row['reward_mean'])} w {fmt(row['reward_w'])} "
                                 f"l {fmt(row['reward_l'])} acc {fmt(row['accuracy'])} ties {state['ties']}")
        if state["bad_steps"] >= MAX_BAD_STEPS:
            last = last_good_checkpoint(args.out, state["bad_since"]) if args.out else None
            raise UserError(f"stopping: {state['bad_steps']} optimizer steps in a row had a NaN/inf loss, gradient "
                            f"or sample (lower --lr or --beta); last good checkpoint: {last or 'none'}")
        if args.out is None:
            return
        if state["bad_steps"] == 0 and (state["step"] % args.save_every == 0 or state["step"] == args.steps):
            save_checkpoint(args.out, self.model, self.ref, self.opt, state, args, self.adapters)

    def write_eval_samples(self) -> dict:
        """Every rank samples (a sharded network needs all ranks in every forward); rank 0 writes, and with
        --eval-reward scores them (held_out). Returns the metrics row's eval fields."""
        n = self.args.eval_videos
        folder = os.path.join(self.args.out, "samples", f"step-{self.step}")
        tmp = os.path.join(self.args.out, "samples", f".tmp-step-{self.step}")  # renamed when complete
        names = video_names(self.eval_prompts, n)
        prompts, videos = [], []
        for k, (prompt, batch) in enumerate(sample_videos(self.model, self.eval_prompts, n, self.args.seed)):
            if parallel.is_main():
                os.makedirs(tmp, exist_ok=True)
                for name, video in zip(names[k], batch):
                    write_video(os.path.join(tmp, name), video, self.model.fps)
                prompts += [prompt] * n
                videos.append(batch)
        if not parallel.is_main():
            return {}
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return self.held_out(torch.cat(videos), prompts) if self.eval_reward else {}

    def held_out(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        """--eval-reward: the trained reward and a held-out one on the same eval samples (fixed seeds, so what
        changes between evaluations is the policy). A policy that climbs the trained reward while the held-out one
        falls is exploiting what the trained reward cannot see (reward hacking): a warning names it."""
        fps, n = self.model.fps, self.args.eval_videos
        trained = float(pick(self.reward.score(videos, prompts, fps), self.dim, group=n).mean())
        scores = self.eval_reward.score(videos, prompts, fps)
        held = float(pick(scores, self.eval_dim).mean())
        self.evals.append((trained, held))
        self.watch_hacking()
        return {"eval_trained": trained, "eval_heldout": held,
                **{f"heldout/{d}": float(v.float().mean()) for d, v in scores.items()}}

    def watch_hacking(self):
        """One warning when, at each of the last --hack-patience evaluations, the trained reward rose while the
        held-out one did not, and the held-out ended below where that streak began (a coarse judge, 0 or 1 per video,
        often stays level between two evaluations); once per streak."""
        p, e = self.args.hack_patience, self.evals
        parted = lambda i: e[i][0] > e[i - 1][0] and e[i][1] <= e[i - 1][1]  # noqa: E731
        streak = 0
        while streak < len(e) - 1 and parted(len(e) - 1 - streak):
            streak += 1
        start = len(e) - 1 - streak
        if streak >= p and e[-1][1] < e[start][1] and self.warned_streak != start:
            self.warned_streak = start
            (t0, h0), (t1, h1) = e[start], e[-1]
            warn(f"possible reward hacking at step {self.step}: over the last {streak} evaluations the trained reward "
                 f"({self.dim}) rose {t0:.3f} -> {t1:.3f} while the held-out {self.args.eval_reward} "
                 f"({self.eval_dim}) fell {h0:.3f} -> {h1:.3f}; look at the samples in {self.args.out}/samples")

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        return self.state
