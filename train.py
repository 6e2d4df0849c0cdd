"""OnlineVPO training: Algorithm 1 of the paper, one loop, and a table of what differs per method.

    python train.py --model opensora --reward videoscore --n 4 --k 200     # the paper's setting
    python train.py --steps 40 --batch-size 4 --k 20                        # the shipped toy model, CPU, minutes
    python train.py --method offline                                        # Table 4d: offline DPO (baselines.py)
    python train.py --method refl                                           # Table 4c: ReFL (baselines.py)
    python train.py --method dense                                          # DenseDPO: aligned pairs, per segment
    python train.py --method grpo                                           # Flow-GRPO (grpo.py)
    torchrun --nproc_per_node 8 train.py --model opensora ...               # many GPUs (parallel.py)

For each prompt: sample N videos from the current policy, score them with the video reward, take best vs worst
(winner and loser), apply the Diffusion-DPO loss against the reference model; every K optimizer steps the reference
becomes the policy. Everything around the loop (the job, its flags, checkpoints, ranks, memory levers) lives in
run.py, flags.py and checkpoint.py.
"""
import os

from inputs import command

import torch  # noqa: E402  (inputs first: Ctrl-C during the slow imports is one line too)
from typing import Callable, NamedTuple  # noqa: E402

import baselines  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import parallel  # noqa: E402
from checkpoint import release_locks  # noqa: E402
from flags import parse_args  # noqa: E402
from parallel import warn  # noqa: E402
from run import Run  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Alg. 1 lines 4-8, the paper's path: N videos per prompt, winner and loser, the Diffusion-DPO loss (Eq. 3)


def online_pairs(run: Run, counters: list[int]) -> list[dpo.Pair]:
    """Alg. 1 lines 4-6: N videos per prompt from the current policy (one batched call), scored by the reward;
    best vs worst. The latents are the sampler's own: no VAE re-encode."""
    prompts = [run.prompt(c) for c in counters]
    with run.clock("sample"):  # Alg. 1 line 4
        latents = run.model.sample(prompts, run.args.n, [s for c in counters for s in run.candidate_seeds(c)])
    return judged_pairs(run, counters, prompts, latents)


def aligned_pairs(run: Run, counters: list[int]) -> list[dpo.Pair]:
    """DenseDPO: N candidates that share their motion. Each prompt's source video (its --videos clip, or the current
    policy's own fresh sample) is corrupted N times with independent noise to level eta and denoised again by the
    current policy; the copies keep the source's layout and motion and differ in local detail, so a preference
    between them is about quality, not about how much moves."""
    prompts = [run.prompt(c) for c in counters]
    with run.clock("sample"):
        source = run.source(counters)
        seeds = [s for c in counters for s in run.candidate_seeds(c, stream="guided")]  # the stream's first name
        latents = run.model.sample(prompts, run.args.n, seeds, source=source, eta=run.args.eta)
    return judged_pairs(run, counters, prompts, latents)


def judged_pairs(run: Run, counters: list[int], prompts: list[str], latents: torch.Tensor) -> list[dpo.Pair]:
    """Alg. 1 lines 5-6: decode, score, winner and loser; per segment for DenseDPO (run.segments, one segment, the
    whole video, otherwise). Returns the pairs of the prompts that are not ties (counted in run.ties)."""
    args, n = run.args, run.args.n
    if not torch.isfinite(latents).all():  # a broken policy: NaN videos would all tie, silently
        run.finite = False
        return []
    with run.clock("decode"):
        videos = run.model.decode(latents)
    with run.clock("reward"):  # Alg. 1 line 5: each segment's frames judged on their own
        each = [p for p in prompts for _ in range(n)]
        per_segment = [run.reward.score(videos[:, lo:hi], each, run.model.fps) for (lo, hi), _ in run.segments]
        scores = torch.stack([run.preference(s, group=n) for s in per_segment], 1).view(len(prompts), n, -1)
    for d in run.reward.dims:  # every dimension's raw mean, whatever the pairs are built on
        run.log[f"reward/{d}"] += torch.stack([s[d] for s in per_segment]).mean(0).tolist()
    pairs = []
    for i, (counter, prompt) in enumerate(zip(counters, prompts)):
        run.log["reward_mean"].append(scores[i].mean().item())
        found = dpo.segment_pairs(scores[i], args.min_gap)  # Alg. 1 line 6; ties give no pair
        if not found:
            run.ties += 1
            continue
        for k, (a, b, labels) in enumerate(dpo.keep_labels(found, args.label_fraction, run.label_generator(counter))):
            w = torch.where(labels > 0, scores[i, a], scores[i, b])[labels != 0]  # each labelled segment's winner
            l = torch.where(labels > 0, scores[i, b], scores[i, a])[labels != 0]
            run.log["reward_w"].append(w.mean().item())
            run.log["reward_l"].append(l.mean().item())
            run.log["gap"].append((w - l).mean().item())
            run.log["labelled"].append(len(w) / len(labels))
            pairs.append(dpo.Pair(counter, prompt, latents[i * n + a], latents[i * n + b], labels, k))
    return pairs


def dpo_step(run: Run, pairs: list[dpo.Pair], sync: bool = True):
    """Alg. 1 lines 7-8: the Diffusion-DPO loss of the pairs (Eq. 3) and its backward; per segment of latent frames
    for DenseDPO (dpo.segment_dpo_loss; one segment, the video-level loss, otherwise). Winner and loser share one
    noise and one t, drawn from the pair's prompt counter (and its index among the prompt's pairs). `sync`: reduce gradients across ranks in this backward
    (the step's last one). The gradients sum to the mean over the step's global batch, a labelled segment weighing
    1/S of a video, so ties lower the step's weight instead of re-weighting the other pairs (DDP/FSDP2 average
    over ranks, hence the factor WORLD)."""
    model, args, segments = run.model, run.args, [lat for _, lat in run.segments]
    pairs, weight = parallel.stand_in(pairs, run.prompts[0], model.latent_shape, len(segments))
    if not pairs:
        return
    P = len(pairs)
    gens = [run.dpo_generator(p.counter, p.index) for p in pairs]
    prompts = [p.prompt for p in pairs]
    labels = torch.stack([p.labels for p in pairs])
    with run.clock("DPO forward"):
        x0 = torch.stack([p.a for p in pairs] + [p.b for p in pairs]).to(model.device)  # winners, then losers
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device).repeat(2, 1, 1, 1, 1)
        t = torch.cat([model.training_timesteps(1, g) for g in gens]).repeat(2)
        y, mask = model.encode_prompts(prompts + prompts)
        with torch.no_grad(), run.reference() as ref:
            ref_err = model.errors(ref, x0, noise, t, y, mask, segments)
    scale = weight * int((labels != 0).sum()) / len(segments) * parallel.WORLD / args.batch_size
    # a NaN loss still runs backward: the ranks stay in step, and its NaN gradient skips the step on every rank
    loss, m = policy_backward(run, x0, noise, t, y, mask, ref_err, labels, scale, sync)
    if weight == 0:
        return
    labelled = int((labels != 0).sum())  # the metrics are means over labelled segments, however pairs are batched
    for key in ("loss", "accuracy", "margin", "kl"):
        run.log[key] += [m[key]] * labelled
    run.examples += P
    run.finite = run.finite and bool(torch.isfinite(loss))


def policy_backward(run: Run, x0, noise, t, y, mask, ref_err, labels, scale: float, sync: bool):
    """The policy's errors on the pairs, the segment DPO loss and its backward. --split-pair, a memory lever with
    the same gradient: dL/de from a no-grad pass, then sum_i dL/de_i * de_i/dtheta, winners then losers (half the
    activations for one more forward)."""
    model, segments, P = run.model, [lat for _, lat in run.segments], len(labels)
    if not run.args.split_pair:
        with parallel.gradient_sync(run.net, sync):
            with run.clock("DPO forward"):
                policy_err = model.errors(run.net, x0, noise, t, y, mask, segments)
                loss, m = dpo.segment_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], labels,
                                               run.beta)
            with run.clock("DPO backward"):
                (loss * scale).backward()
        return loss, m
    with run.clock("DPO forward"), torch.no_grad():
        policy_err = model.errors(run.net, x0, noise, t, y, mask, segments)
    policy_err.requires_grad_(True)
    loss, m = dpo.segment_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], labels, run.beta)
    (coef,) = torch.autograd.grad(loss * scale, policy_err)
    for half, last in ((slice(0, P), False), (slice(P, 2 * P), True)):
        with run.clock("DPO backward"), parallel.gradient_sync(run.net, sync and last):
            e = model.errors(run.net, x0[half], noise[half], t[half], y[half], mask[half], segments)
            (e * coef[half]).sum().backward()
    return loss, m


# ----------------------------------------------------------------------------------------------------------
# The method table: each method's backward for a share of a step's prompts, and its reference


def online(run: Run, counters: list[int], sync: bool):
    dpo_step(run, online_pairs(run, counters), sync)  # Alg. 1 lines 4-8


def aligned(run: Run, counters: list[int], sync: bool):
    dpo_step(run, aligned_pairs(run, counters), sync)  # DenseDPO and StructuralDPO: aligned candidates


def offline(run: Run, counters: list[int], sync: bool):
    dpo_step(run, baselines.pool_pairs(run, run.pool, counters), sync)  # Table 4d: the pool sampled once


def aligned_start(run: Run):
    """DenseDPO's eta is the flow form's x_t = (1 - eta) x + eta noise on every backend; a scheduler that cannot
    start between its steps starts at the first one corrupting no more (diffusers_models.start_index): say so."""
    a, b = run.model.aligned_level(run.args.eta)
    level = b / (a + b)  # the flow form's eta with the same signal-to-noise ratio
    if abs(level - run.args.eta) > 0.01:
        warn(f"--eta {run.args.eta}: {run.model.name}'s {run.model.sample_steps}-step sampler starts the aligned "
             f"copies at {a:.3f} x + {b:.3f} noise, the signal-to-noise ratio of eta {level:.3f}")


def offline_start(run: Run):
    run.pool = baselines.offline_pool(run, online_pairs)  # from the initial policy, before the first step


class Method(NamedTuple):
    """What differs between the methods; everything else is Algorithm 1's loop (train) and the job (run.Run)."""
    backward: Callable  # (run, counters, sync): a share of one step's prompts -> gradients (Alg. 1 lines 4-8)
    reference: str | Callable  # "curriculum": G_ref <- G_theta every K steps (line 14); "fixed": never; "none": no
    # reference; or a function of the flags naming one of them (GRPO's --grpo-kl-reference)
    per_segment: bool = False  # a preference per segment of about a second (DenseDPO), not per video
    check: Callable | None = None  # (run): refuses a model or reward the method cannot use, before anything is written
    start: Callable | None = None  # (run): before the first step


def entry(args) -> Method:
    """The method's table entry, its reference rule resolved for these flags."""
    method = METHODS[args.method]
    return method._replace(reference=method.reference(args)) if callable(method.reference) else method


METHODS = {  # --method (flags.METHOD_NAMES)
    "online": Method(online, "curriculum"),
    "offline": Method(offline, "fixed", start=offline_start),
    "dense": Method(aligned, "curriculum", per_segment=True, start=aligned_start),
    "structural": Method(aligned, "curriculum", start=aligned_start),  # DenseDPO's ablation: one label per video
    "refl": Method(baselines.refl_backward, "none", check=baselines.refl_check),
    "grpo": Method(grpo.grpo_backward, grpo.kl_reference, check=grpo.check, start=grpo.start),
}


def train(args) -> dict:
    method = entry(args)
    run = Run(args, method)  # model, reward, AdamW, --resume; G_ref <- G_theta (Alg. 1 line 1)
    if method.start:
        method.start(run)
    while run.step < args.steps:  # Alg. 1 line 2
        for counters, last in run.batches():  # this rank's share of the step's --batch-size prompts (line 3)
            method.backward(run, counters, sync=last)  # lines 4-8
        run.optimizer_step()  # line 10
        if method.reference == "curriculum" and args.k and run.step % args.k == 0:
            run.update_reference()  # lines 13-14: the curriculum update G_ref <- G_theta
        run.end_step()  # metrics.jsonl, checkpoint, eval samples
    return run.close()


@command(interrupted="interrupted; resume with --resume (continues from the latest checkpoint)")
def main(argv=None):
    args = parse_args(argv, __doc__)
    try:
        state = train(args)
    finally:
        parallel.shutdown()
        release_locks()
    if parallel.is_main():
        print(f"done: {state['step']} steps, {state['ties']} ties skipped, {state['ref_updates']} reference updates; "
              f"metrics in {os.path.join(args.out, 'metrics.jsonl')}")


if __name__ == "__main__":
    main()
