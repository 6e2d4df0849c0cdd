"""The paper's comparisons: two entries of train.py's method table, run by the same loop as OnlineVPO.

- Offline DPO (Table 4d): Algorithm 1 with a pair pool filled ONCE from the initial policy and a fixed
  reference (`offline_pool` before the first step, `pool_pairs` instead of fresh samples).
- ReFL (Table 4c): reward feedback learning, the reward's gradient instead of preferences, no reference.

Torch only: what the methods need of the job, the reward and the model comes in through `run` (run.Run).
"""
import hashlib
import math
import os
import time

import torch
from tqdm import tqdm

import dpo
import parallel
from inputs import UserError, writing
from parallel import warn


def offline_pool(run, sample_pairs) -> list:
    """Table 4d, Diffusion-DPO style: --offline-pairs prompts sampled ONCE with the initial policy and scored
    by the same reward (`sample_pairs`: train.online_pairs), best vs worst kept (ties as None); cached to
    OUT/offline_pairs.pt with every setting that made it (pool_key), so a resumed run trains on the same pairs and
    a pool of other settings is never reused. With several ranks each samples every
    WORLD-th prompt (the same count everywhere) and the pairs are gathered onto every rank."""
    args = run.args
    path = os.path.join(args.out, "offline_pairs.pt")
    key = pool_key(run)
    try:
        return read_pool(path, key, tuple(run.model.latent_shape))
    except UserError as e:
        why = str(e)
    if run.step:  # the pairs must come from the initial policy, which a resumed run no longer has
        raise UserError(f"--method offline: {why}; resume with the flags the run started with, or start over with "
                        "--overwrite")
    if os.path.isfile(path) and parallel.is_main():  # the pool not used is kept beside, not replaced
        aside = f"{path}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        warn(f"{why}: moved to {aside}; the pairs are collected again")
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
        with writing(tmp):
            torch.save({"key": key, "pairs": pairs, "sha256": pool_digest(pairs)}, tmp)
        os.replace(tmp, path)
    return pairs


def pool_key(run) -> dict:
    """Everything that decides which pairs the initial policy gives: the pool is reused only under the same key."""
    a = run.args
    return {"model": a.model, "dit": a.dit, "size": a.size, "frames": a.frames, "sample_steps": a.sample_steps,
            "cfg": a.cfg, "prompts": hashlib.sha256("\n".join(run.prompts).encode()).hexdigest(),
            "offline_pairs": a.offline_pairs, "seed": a.seed, "n": a.n,
            "reward": a.reward, "reward_path": a.reward_path, "reward_dim": run.dim, "min_gap": a.min_gap,
            "lora_rank": a.lora_rank}


def read_pool(path: str, key: dict, latent_shape: tuple) -> list:
    """OUT/offline_pairs.pt: the pairs if the file is a whole pool made under `key` (each entry None, a tie, or a
    prompt and two latents of the model's shape, their checksum the saved one); a UserError naming why not."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    try:
        pool = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - cut short, zeroed, not a torch.save file
        raise UserError(f"{path} is damaged ({type(e).__name__}: not a whole torch.save file)") from None
    pairs = pool.get("pairs") if isinstance(pool, dict) else None
    whole = isinstance(pairs, list) and all(
        p is None or isinstance(p, (tuple, list)) and len(p) == 3 and isinstance(p[0], str)
        and all(isinstance(t, torch.Tensor) and tuple(t.shape) == latent_shape and bool(torch.isfinite(t).all())
                for t in p[1:]) for p in pairs)
    if not whole or pool.get("sha256") != pool_digest(pairs):
        raise UserError(f"{path} is damaged: not a pool of pairs of this model's latents, or not the pairs that "
                        "were saved")
    if pool.get("key") != key:
        other = [k for k in key if not isinstance(pool.get("key"), dict) or pool["key"].get(k) != key[k]]
        raise UserError(f"{path} was collected with other settings ({', '.join(other)})")
    return pairs


def pool_digest(pairs: list) -> str:
    """The pool's checksum over its prompts and latents' bytes (torch.load checks none: a flipped byte in a tensor
    would load as another number)."""
    digest = hashlib.sha256()
    for pair in pairs:
        if pair is None:
            digest.update(b"tie")
            continue
        digest.update(pair[0].encode())
        for t in pair[1:]:
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
