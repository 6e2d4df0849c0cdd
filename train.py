"""OnlineVPO training: Algorithm 1 of the paper, one loop.

    python train.py --model opensora --reward videoscore --n 4 --k 200     # the paper's setting
    python train.py --steps 40 --batch-size 4 --k 20                        # the shipped toy model, CPU, minutes
    python train.py --method offline                                        # Table 4d: offline DPO (baselines.py)
    python train.py --method refl                                           # Table 4c: ReFL (baselines.py)
    torchrun --nproc_per_node 8 train.py --model opensora ...               # many GPUs (parallel.py)

For each prompt: sample N videos from the current policy, score them with the video reward, take best vs worst,
apply the Diffusion-DPO loss against the reference model; every K optimizer steps the reference becomes the
policy. Everything around the loop (flags, checkpoints, metrics, ranks, memory levers) lives in run.py.
"""
import os

from inputs import command

import torch  # noqa: E402  (inputs first: Ctrl-C during the slow imports is one line too)

import baselines  # noqa: E402
import dpo  # noqa: E402
import parallel  # noqa: E402
from reward import pick  # noqa: E402
from run import Run, parse_args, release_locks  # noqa: E402


def online_pairs(run: Run, counters: list[int]) -> list[tuple]:
    """Alg. 1 lines 4-6: N videos per prompt from the current policy (one batched call), scored by the reward;
    best vs worst. Returns (counter, prompt, winner latents, loser latents) per prompt that is not a tie. The
    latents are the sampler's own: no VAE re-encode."""
    args, model, n = run.args, run.model, run.args.n
    prompts = [run.prompt(c) for c in counters]
    with run.clock("sample"):  # Alg. 1 line 4
        latents = model.sample(prompts, n, [s for c in counters for s in run.candidate_seeds(c)])
    if not torch.isfinite(latents).all():  # a broken policy: NaN videos would all tie, silently
        run.finite = False
        return []
    with run.clock("decode"):
        videos = model.decode(latents)
    with run.clock("reward"):  # Alg. 1 line 5
        scores = pick(run.reward.score(videos, [p for p in prompts for _ in range(n)]), run.dim).view(-1, n)
    pairs = []
    for i, (counter, prompt) in enumerate(zip(counters, prompts)):
        run.log["reward_mean"].append(scores[i].mean().item())
        pair = dpo.select_pair(scores[i], args.min_gap)  # Alg. 1 line 6; ties give no pair
        if pair is None:
            run.ties += 1
            continue
        w, l = pair
        run.log["reward_w"].append(scores[i, w].item())
        run.log["reward_l"].append(scores[i, l].item())
        run.log["gap"].append((scores[i, w] - scores[i, l]).item())
        pairs.append((counter, prompt, latents[i * n + w], latents[i * n + l]))
    return pairs


def dpo_step(run: Run, pairs: list[tuple], sync: bool = True):
    """Alg. 1 lines 7-8: the Diffusion-DPO loss of (counter, prompt, winner, loser) pairs and its backward.
    Winner and loser share one noise and one t, drawn from the pair's prompt counter. `sync`: reduce gradients
    across ranks in this backward (the step's last one). The gradients sum to the mean over the step's global
    batch, so ties lower the step's weight instead of re-weighting the other pairs (DDP/FSDP2 average over ranks,
    hence the factor WORLD)."""
    model, args = run.model, run.args
    pairs, weight = parallel.stand_in(pairs, run.prompts[0], model.latent_shape)
    if not pairs:
        return
    P = len(pairs)
    gens = [run.dpo_generator(c) for c, *_ in pairs]
    prompts = [p for _, p, _, _ in pairs]
    with run.clock("DPO forward"):
        x0 = torch.stack([w for *_, w, _ in pairs] + [l for *_, l in pairs]).to(model.device)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device).repeat(2, 1, 1, 1, 1)
        t = torch.cat([model.training_timesteps(1, g) for g in gens]).repeat(2)
        y, mask = model.encode_prompts(prompts + prompts)
        with torch.no_grad(), run.reference() as ref:
            ref_err = model.errors(ref, x0, noise, t, y, mask)
    scale = weight * P * parallel.WORLD / args.batch_size
    # a NaN loss still runs backward: the ranks stay in step, and its NaN gradient skips the step on every rank
    if not args.split_pair:
        with parallel.gradient_sync(run.net, sync):
            with run.clock("DPO forward"):
                policy_err = model.errors(run.net, x0, noise, t, y, mask)
                loss, m = dpo.diffusion_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], run.beta)
            with run.clock("DPO backward"):
                (loss * scale).backward()
    else:  # --split-pair: dL/de from a no-grad pass, then sum_i dL/de_i * de_i/dtheta, winners then losers
        with run.clock("DPO forward"), torch.no_grad():
            policy_err = model.errors(run.net, x0, noise, t, y, mask)
        policy_err.requires_grad_(True)
        loss, m = dpo.diffusion_dpo_loss(policy_err[:P], policy_err[P:], ref_err[:P], ref_err[P:], run.beta)
        (coef,) = torch.autograd.grad(loss * scale, policy_err)
        for half, last in ((slice(0, P), False), (slice(P, 2 * P), True)):
            with run.clock("DPO backward"), parallel.gradient_sync(run.net, sync and last):
                e = model.errors(run.net, x0[half], noise[half], t[half], y[half], mask[half])
                (e * coef[half]).sum().backward()
    if weight == 0:
        return
    for key in ("loss", "accuracy", "margin", "kl"):
        run.log[key] += [m[key]] * P
    run.pairs += P
    run.finite = run.finite and bool(torch.isfinite(loss))


def train(args) -> dict:
    run = Run(args)  # model, reward, AdamW, --resume; G_ref <- G_theta (Alg. 1 line 1)
    if args.method == "refl":
        return baselines.refl(run)  # Table 4c: reward gradients instead of preferences, its own loop
    # Table 4d: offline DPO is this loop on pairs sampled once from the initial policy, with a fixed reference
    pool = baselines.offline_pool(run, online_pairs) if args.method == "offline" else None
    K = 0 if pool else args.k
    while run.step < args.steps:  # Alg. 1 line 2
        for counters, last in run.batches():  # this rank's share of the step's --batch-size prompts (line 3)
            pairs = baselines.pool_pairs(run, pool, counters) if pool else online_pairs(run, counters)  # lines 4-6
            dpo_step(run, pairs, sync=last)  # lines 7-8
        run.optimizer_step()  # line 10
        if K and run.step % K == 0:  # lines 13-14: the curriculum update G_ref <- G_theta
            run.update_reference()
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
