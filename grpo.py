"""GRPO in Flow-GRPO's formulation (Liu et al. 2025, yifan123/flow_grpo), on the same models, rewards and budget as
OnlineVPO: an entry of train.py's method table.

    python train.py --method grpo --n 4 --k 5                   # the toy model
    python train.py --model opensora --method grpo --reward videoscore --n 4 --k 200 --grpo-beta 0.004
    python train.py --model wan --method grpo --reward videoscore --n 4 --k 200 --lora-rank 32

Per prompt, N videos from the current policy sampled as an SDE (each step a Gaussian whose log-density is kept),
scored by the reward; advantages normalised within the prompt's group; a PPO-clipped objective on the ratio of the
policy's to the sampler's log-density of each step taken, plus beta times the KL to the reference (which, as for
DPO, becomes the policy every K steps). Open-Sora's convention: x_t = (1 - s) x0 + s noise with s = t / 1000,
the network predicts v = x0 - noise (Flow-GRPO's SD3 and Wan predict noise - x0: Wan's model flips the sign before
it reaches this file). Wan follows Flow-GRPO's Wan2.1 pipeline: its scheduler's sigmas and std_t = sigmas[1] * s.

Torch only: the models supply their schedule and velocity (model.sde_schedule), the job the reward's preference
(run.preference).
"""
import math

import torch

import parallel
from inputs import UserError


def step_std(sigmas: list[float], i: int, noise_level: float | None) -> float:
    """std_t = noise_level * sqrt(s / (1 - s)) (Flow-GRPO's SDE); at s = 1 the denominator uses sigmas[1], as
    Flow-GRPO clips it. Open-Sora's timestep shift, computed in float32, maps t = 1000 to 999.9997 or 1000.0001 by
    resolution: that is s = 1 too (an exact test would divide by 3e-7, or take the root of a negative number).
    noise_level None: Flow-GRPO's Wan2.1 pipeline instead, std_t = sigmas[1] * s, with no noise level."""
    s = sigmas[i]
    if noise_level is None:
        return sigmas[1] * s
    return noise_level * math.sqrt(s / (1 - (sigmas[1] if s > 1 - 1e-5 else s)))


def sde_step(z: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int, noise_level: float | None,
             noise: torch.Tensor | None = None, prev: torch.Tensor | None = None):
    """One SDE step from sigmas[i] to sigmas[i + 1] (sde_step_with_logprob, sde_type 'sde'): the ODE's Euler step
    turned into the SDE with the same marginals, its noise std_t = step_std (noise_level * sqrt(s / (1 - s)), or
    Wan2.1's sigmas[1] * s),
        mean = z (1 + std_t^2 / (2 s) dt) + u (1 + std_t^2 (1 - s) / (2 s)) dt,   u = -v,  dt = s' - s < 0,
        prev = mean + std_t sqrt(-dt) noise.
    Returns (prev, log-density of prev (B,): the full Gaussian's, meaned over all non-batch dims, mean).
    Given `prev` (a stored step), its log-density under this z and v instead: differentiable in v."""
    s, s_next = sigmas[i], sigmas[i + 1]
    dt = s_next - s
    std = step_std(sigmas, i, noise_level)
    u = -v.float()
    mean = z.float() * (1 + std ** 2 / (2 * s) * dt) + u * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    scale = std * math.sqrt(-dt)
    if prev is None:
        prev = mean + scale * noise.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * scale ** 2) - math.log(scale) - math.log(math.sqrt(2 * math.pi))
    return prev, log_prob.mean(dim=tuple(range(1, log_prob.dim()))), mean


def sde_rollout(velocity, z: torch.Tensor, generators: list[torch.Generator], sigmas: list[float], timesteps: list,
                noise_level: float | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The sampler as an SDE from the noise z: at each timestep the guided velocity(z, t) in Open-Sora's sign, then
    sde_step from sigmas[i] to sigmas[i + 1] with candidate j's noise drawn from generators[j]. Returns the
    trajectory [z_0, ..., z_K] and the log-densities (K, B) of the steps taken. The models own the schedule and the
    velocity (model.sde_schedule); this loop is the same for all of them."""
    trajectory, log_probs = [z], []
    for i, t in enumerate(timesteps):
        noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(z)
        z, log_prob, _ = sde_step(z, velocity(z, t), sigmas, i, noise_level, noise=noise)
        trajectory.append(z)
        log_probs.append(log_prob)
    return trajectory, torch.stack(log_probs)


@torch.no_grad()
def sample_sde(model, prompts: list[str], n: int, generators: list[torch.Generator], noise_level: float | None,
               net: torch.nn.Module | None = None, steps: int | None = None):
    """GRPO's rollout: the model's sampler as an SDE (Flow-GRPO), every step a Gaussian with a known log-density.
    Candidate j draws its starting noise and every step's noise from generators[j]. Returns the trajectory
    [z at t_0, ..., z at t_K = clean] (K + 1 tensors, candidates of a prompt adjacent), the per-step log-densities
    (K, B) of the steps taken, the K + 1 noise levels (the last 0) and the K timesteps the network sees."""
    net = net or model.dit
    velocity, sigmas, timesteps = model.sde_schedule(prompts, n, net, steps)
    z = torch.stack([torch.randn(model.latent_shape, generator=g) for g in generators]).to(model.device)
    was_training = net.training
    net.eval()
    trajectory, log_probs = sde_rollout(velocity, z, generators, sigmas, timesteps, noise_level)
    net.train(was_training)
    return trajectory, log_probs, sigmas, timesteps


def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, sigmas: list[float], i: int,
            noise_level: float | None) -> torch.Tensor:
    """KL(policy step || reference step) per sample: two Gaussians with one std, |mean - mean_ref|^2 / (2 var),
    meaned over dims (Flow-GRPO's Wan trainer; its SD3 trainer leaves out the step's |dt| in the variance)."""
    std = step_std(sigmas, i, noise_level) * math.sqrt(sigmas[i] - sigmas[i + 1])
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * std ** 2)


def group_advantages(r: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """(prompts, N) rewards -> (r - group mean) / (group std + 1e-4), population std, clipped to +-clip. A group
    whose rewards are all equal gets advantages of exactly 0: no signal (the caller skips it, as a DPO tie)."""
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).clamp(-clip, clip)


def clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """PPO's clipped objective per sample: max(-A ratio, -A clip(ratio, 1 - e, 1 + e)), ratio = p / p_old."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


def train_steps(K: int, fraction: float) -> list[int]:
    """The sampling steps trained on: the first int(K * fraction) (Flow-GRPO's timestep_fraction; 0.99 of 10
    steps leaves the last, nearly clean step out), at least one."""
    return list(range(max(1, int(K * fraction))))


def noise_level(run) -> float | None:
    """--grpo-noise-level, or the model's default: 0.7 (Flow-GRPO) for Open-Sora's family, None for Wan (Flow-GRPO's
    Wan2.1 pipeline, std_t = sigmas[1] * s)."""
    return run.args.grpo_noise_level if run.args.grpo_noise_level is not None else run.model.grpo_noise_level


def rollout(run, counters: list[int]) -> dict:
    """N SDE samples per prompt from the current policy, decoded and scored; returns what the updates need:
    prompts, trajectory, the sampler's log-densities (the old policy of the ratio), sigmas, the network's timesteps,
    the scores and the advantages (prompts, N)."""
    model, n = run.model, run.args.n
    prompts = [run.prompt(c) for c in counters]
    gens = [torch.Generator().manual_seed(s) for c in counters for s in run.candidate_seeds(c, stream="grpo")]
    with run.clock("sample"):
        traj, old_log_probs, sigmas, timesteps = sample_sde(model, prompts, n, gens, noise_level(run))
    with run.clock("decode"):
        videos = model.decode(traj[-1])
    with run.clock("reward"):
        scores = run.reward.score(videos, [p for p in prompts for _ in range(n)], model.fps)
        r = run.preference(scores, group=n).view(len(prompts), n)
    return dict(prompts=prompts, traj=traj, old_log_probs=old_log_probs, sigmas=sigmas, timesteps=timesteps,
                scores=scores, r=r, adv=group_advantages(r))


def start(run):
    """Rollouts sampled at a round's first step wait here for the round's later steps (keyed by the counter of
    their group's first prompt)."""
    run.rollouts = {}


def next_rollout(run, counters: list[int]) -> dict:
    """Flow-GRPO's sampling round: its first optimizer step samples the rollouts of all --grpo-steps-per-round
    steps at once (the same group of this rank's prompts in each later step has counters + j * --batch-size), so
    the later steps train on samples of an older policy: their ratio departs from 1 and the clip acts. A run
    resumed inside a round samples the rest of that round with the policy it resumed."""
    R, B = run.args.grpo_steps_per_round, run.args.batch_size
    if counters[0] not in run.rollouts:
        for j in range(R - run.step % R):
            later = [c + j * B for c in counters]
            run.rollouts[later[0]] = rollout(run, later)
    return run.rollouts.pop(counters[0])


def grpo_backward(run, counters: list[int], sync: bool = True):
    """The rollouts of these prompts (sampled now, or at the round's first step), then for each trained sampling
    step one forward of the policy (and of the reference for the KL) on the stored states and one backward, in micro-batches of --grpo-micro-batch videos (the same gradient, less
    activation memory). Groups with zero variance carry no signal: skipped and counted as ties. Under torchrun a
    rank makes the same network calls whatever tied (DDP's and FSDP2's collectives wait for every rank): its tied
    groups stay in the batch with weight 0, as DPO's stand-in pairs do (parallel.stand_in)."""
    args, model, n = run.args, run.model, run.args.n
    data = next_rollout(run, counters)
    prompts, traj, old_lp, sigmas, timesteps, adv = (data[k] for k in ("prompts", "traj", "old_log_probs", "sigmas",
                                                                       "timesteps", "adv"))
    for d, v in data["scores"].items():
        run.log[f"reward/{d}"] += v.tolist()
    run.log["reward_mean"] += data["r"].mean(1).tolist()
    level = noise_level(run)
    keep = adv.abs().sum(1) > 0
    run.ties += int((~keep).sum())
    finite = bool(torch.isfinite(traj[-1]).all())
    run.finite = run.finite and finite  # under torchrun a NaN runs on: its NaN gradient skips the step everywhere
    if parallel.WORLD == 1 and (not keep.any() or not finite):
        return
    rows = keep.repeat_interleave(n) if parallel.WORLD == 1 else torch.ones(len(keep) * n, dtype=torch.bool)
    weight = keep.repeat_interleave(n)[rows].float().to(model.device)
    each = [p for p, k in zip([p for p in prompts for _ in range(n)], rows.tolist()) if k]
    adv = adv.flatten()[rows].to(model.device)
    steps = train_steps(len(sigmas) - 1, args.grpo_timestep_fraction)
    size = args.grpo_micro_batch or len(each)
    chunks = [slice(lo, lo + size) for lo in range(0, len(each), size)]
    scale = parallel.WORLD / (args.batch_size * n * len(steps))  # the sum over samples and steps -> their mean
    on = rows.to(traj[0].device)  # the trajectory lives where it was sampled
    for j, i in enumerate(steps):
        z_all, prev_all, old_all = traj[i][on], traj[i + 1][on], old_lp[i].to(on.device)[on]
        for c, part in enumerate(chunks):
            last = sync and j == len(steps) - 1 and c == len(chunks) - 1
            z, prev, w = z_all[part].to(model.device), prev_all[part].to(model.device), weight[part]
            with parallel.gradient_sync(run.net, last), run.clock("train"):
                v = model.grpo_velocity(run.net, z, timesteps[i], each[part], 1)
                _, log_prob, mean = sde_step(z, v, sigmas, i, level, prev=prev)
                per_sample, ratio = clipped_loss(log_prob, old_all[part].to(log_prob), adv[part], args.grpo_clip)
                kl = torch.zeros_like(per_sample)
                if args.grpo_beta > 0:
                    with torch.no_grad(), run.reference() as ref:
                        v_ref = model.grpo_velocity(ref, z, timesteps[i], each[part], 1)
                        _, _, mean_ref = sde_step(z, v_ref, sigmas, i, level, prev=prev)
                    kl = step_kl(mean, mean_ref, sigmas, i, level)
                loss = (per_sample + args.grpo_beta * kl) * w
                (loss.sum() * scale).backward()
            counted = w > 0  # what the metrics average: the groups trained on
            run.log["loss"] += loss[counted].tolist()
            run.log["kl"] += kl[counted].tolist()
            run.log["ratio"] += ratio[counted].tolist()
            run.log["clipped"] += ((ratio[counted] - 1).abs() > args.grpo_clip).float().tolist()
            run.finite = run.finite and bool(torch.isfinite(loss).all())
    run.examples += int(weight.sum())


def kl_reference(args) -> str:
    """The KL term's reference: the base model, fixed (Flow-GRPO's; with LoRA the reference adapter stays at zero,
    i.e. the adapter disabled), or the policy of every K steps as DPO's curriculum (--grpo-kl-reference moving)."""
    return "curriculum" if args.grpo_kl_reference == "moving" else "fixed"


def check(run):
    """GRPO needs a sampler with an SDE form (a flow: model.sde_schedule)."""
    if not run.model.has_sde:
        raise UserError("--method grpo needs a flow-matching model (opensora, toy, tiny, wan, wan2.2-5b, wan2.2-14b, "
                        f"ltx), not {run.args.model!r}: its sampler has no SDE form here")
