"""The paper's comparisons: two entries of train.py's method table, run by the same loop as OnlineVPO.

- Offline DPO (Table 4d): Algorithm 1 with a pair pool filled ONCE from the initial policy and a fixed
  reference (`offline_pool` before the first step, `pool_pairs` instead of fresh samples).
- ReFL (Table 4c): reward feedback learning, the reward's gradient instead of preferences, no reference.

Torch only: what the methods need of the job, the reward and the model comes in through `run` (run.Run).
"""
import math
import os

import torch
from tqdm import tqdm

import dpo
import parallel
from inputs import UserError
from parallel import warn


def offline_pool(run, sample_pairs) -> list:
    """Table 4d, Diffusion-DPO style: --offline-pairs prompts sampled ONCE with the initial policy and scored
    by the same reward (`sample_pairs`: train.online_pairs), best vs worst kept (ties as None); cached to
    OUT/offline_pairs.pt so a resumed run trains on the same pairs. With several ranks each samples every
    WORLD-th prompt (the same count everywhere) and the pairs are gathered onto every rank."""
    args = run.args
    path = os.path.join(args.out, "offline_pairs.pt")
    if os.path.isfile(path):
        try:
            cached = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a file cut short or overwritten: named below, never half-used
            cached = {"prompts_file": None, "pairs": []}
            warn(f"{path} is damaged (not a torch.save file)")
        if cached["prompts_file"] == args.prompts and len(cached["pairs"]) == args.offline_pairs:
            return cached["pairs"]
    if run.step:  # the pairs must come from the initial policy, which a resumed run no longer has
        raise UserError(f"--method offline: {path} is missing, damaged or was made with other --prompts/"
                        "--offline-pairs; resume with the flags the run started with, or start over with --overwrite")
    mine = list(range(parallel.RANK, math.ceil(args.offline_pairs / parallel.WORLD) * parallel.WORLD,
                      parallel.WORLD))  # counters past the end are sampled too (equal work) and dropped
    pairs = []
    for first in tqdm(range(0, len(mine), args.sample_batch), desc="collecting offline pairs",
                      disable=not parallel.is_main()):
        counters = mine[first: first + args.sample_batch]
        found = {p.counter: (p.prompt, p.a.cpu(), p.b.cpu()) for p in sample_pairs(run, counters)}  # cached on disk
        pairs += [found.get(c) for c in counters]
    everyone = parallel.gather((not run.finite, list(zip(mine, pairs))))
    run.new_step()  # the collection's rewards and ties are not the first step's
    if any(broken for broken, _ in everyone):
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


def pool_pairs(run, pool: list, counters: list[int]) -> list[tuple]:
    """The pool's pairs for these prompt counters, cycling through it; a tied entry counts as a tie."""
    found = [(c, pool[c % len(pool)]) for c in counters]
    run.ties += sum(pair is None for _, pair in found)
    return [dpo.video_pair(c, *pair) for c, pair in found if pair is not None]


def refl_backward(run, counters: list[int], sync: bool = True):
    """Table 4c, ReFL (ImageReward's reward feedback learning, applied to video): denoise without gradients
    to a random step among the last quarter of the sampling steps, take ONE guided step with gradients,
    jump to the predicted x0, decode (only --refl-latent-frames latent frames) and maximise the reward.
    The reward's own weights are frozen: gradients reach the policy only."""
    args, model = run.args, run.model
    prompts = [run.prompt(c) for c in counters]
    seeds = [run.candidate_seeds(c, 1)[0] for c in counters]
    steps = model.sample_steps
    stop = int(torch.randint(steps - max(1, steps // 4), steps, (1,), generator=run.refl_generator(counters[0])))
    with run.clock("sample"):
        z, t = model.sample(prompts, 1, seeds, until=stop)
    with parallel.gradient_sync(run.net, sync):  # DDP: the forward and the backward inside
        with run.clock("decode"):
            x0 = model.predict_x0(run.net, z, t, prompts)
            videos = model.decode_float(x0, args.refl_latent_frames)
        with run.clock("reward"):
            scores = run.reward.score_float(videos, prompts, model.fps)
            r = run.preference(scores).float()
            loss = -r.mean()
            (loss * len(prompts) * parallel.WORLD / args.batch_size).backward()  # a NaN skips the step everywhere
    run.log["loss"] += [loss.item()] * len(prompts)
    run.log["reward_mean"] += r.tolist()
    for d, v in scores.items():
        run.log[f"reward/{d}"] += v.tolist()
    run.examples += len(prompts)
    run.finite = run.finite and bool(torch.isfinite(loss))


def refl_check(run):
    """ReFL needs a reward with a gradient, a model that predicts x0 in one call, and one score per video."""
    if not hasattr(run.reward, "score_float"):  # the reward interface's optional differentiable score
        raise UserError(f"--method refl needs a differentiable reward; {run.args.reward!r} is not")
    if "=" in run.dim or "," in run.dim:  # a weighted mix (reward.parse_dim)
        raise UserError("--method refl maximises one score of single videos; a weighted --reward-dim is scaled by "
                        "the spread among one prompt's N candidates, which ReFL does not sample: name one "
                        "dimension or global")
    if not run.model.predicts_x0:
        raise UserError(f"--method refl is implemented for the Open-Sora family (opensora, toy, tiny), "
                        f"not {run.args.model!r}")
