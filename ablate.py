"""The paper's comparisons, replayed in the toy world (toy.py) on a CPU: online vs offline DPO (Table 4d),
ReFL (Table 4c), the reference-update period K and the candidate count N (Table 5), DenseDPO's vanilla vs
structural vs dense vs dense with a third of the labels, weighted mixes of reward dimensions and GRPO, over
several seeds. The protocol, its predictions and what came out: docs/baselines.md.

    python ablate.py --runs online-K5 offline --seeds 0 1 2 3 4 --versus online-K5
    python ablate.py --runs online-K5 dense --seeds 0 1 2 3 4 --reward-dim temporal_consistency --out runs/dense

Every run starts from the shipped toy weights with the quick start's budget (40 steps of 2 prompts, lr 1e-5) and
trains on one dimension of the toy reward (--reward-dim; the quick start's visual quality by default), or the
online-mix runs on their weighted mix. Each final policy then samples every toy prompt twice with fixed seeds, and
the table reports the toy reward of those videos and the shape judge's verdicts (toy.ShapeJudge) as the mean over
seeds and its 95% interval, next to the untrained model's; beside them each run's training curve from its
metrics.jsonl (the trained reward of its own samples over its first and last 5 steps) and its seconds per step.
--versus adds each run's difference from one run, with its 95% interval (Welch). Runs are cached in folders keyed
by their settings: parallel sweeps share --out, and an interrupted one goes on where it stopped.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import statistics
import sys

from inputs import (ANY, UserError, check_domains, command, file_sha256, load_prompts, read_json, read_metrics, read_text,
                    refuse_empty, writable_dir, writable_file, write_atomically)

import torch  # noqa: E402  (inputs first: Ctrl-C during this slow import is one line too)

import checkpoint
import toy
import train
from model import build_model
from reward import build_reward
from sample import sample_videos

# name -> train.py flags. K is counted in optimizer steps of a --steps-long run.
RUNS = {
    "online-K5": ["--method", "online", "--k", "5", "--n", "4"],
    "online-K10": ["--method", "online", "--k", "10", "--n", "4"],  # a few updates per run, like K=200 in the paper
    "online-Knever": ["--method", "online", "--k", "0", "--n", "4"],
    "offline": ["--method", "offline", "--n", "4"],
    "online-K5-N2": ["--method", "online", "--k", "5", "--n", "2"],
    "online-K5-N8": ["--method", "online", "--k", "5", "--n", "8"],
    "refl": ["--method", "refl"],  # Table 4c: the reward's gradient instead of preferences
    # DenseDPO: the same budget of prompts and candidates as online-K5, the candidates corrupted copies of the
    # policy's own sample (--eta 0.7), labelled once per video (structural) or per 2-frame segment (dense)
    "structural": ["--method", "structural", "--k", "5", "--n", "4"],
    "dense": ["--method", "dense", "--k", "5", "--n", "4"],
    # DenseDPO's data-efficiency claim: dense with a third of its labelled pairs (about as many as online-K5 has)
    "dense-third": ["--method", "dense", "--k", "5", "--n", "4", "--label-fraction", "0.333"],
    # a weighted mix (reward.mix): temporal consistency plus dynamic degree, each scaled by its within-prompt spread
    "online-mix": ["--method", "online", "--k", "5", "--n", "4", "--reward-dim",
                   "temporal_consistency=1,dynamic_degree=1"],
    "online-mix-half": ["--method", "online", "--k", "5", "--n", "4", "--reward-dim",
                        "temporal_consistency=1,dynamic_degree=0.5"],
    # GRPO (grpo.py) at online-K5's budget: the same prompts, N = 4 sampled videos and reward calls per prompt; trained
    # on the first 3 of the 10 sampling steps (Flow-GRPO's timestep_fraction 0.3) to keep a CPU run in minutes
    "grpo": ["--method", "grpo", "--n", "4", "--grpo-timestep-fraction", "0.3"],
    # the same at Flow-GRPO's own timestep_fraction 0.99: 9 of the 10 sampling steps trained, about 3x the update
    "grpo-full": ["--method", "grpo", "--n", "4", "--grpo-timestep-fraction", "0.99"],
}


@torch.no_grad()
def evaluate_policy(model, reward, prompts: list[str], videos_per_prompt: int = 2, seed: int = 12345) -> dict:
    """Mean toy reward per dimension over every prompt, fixed seeds (the same for every policy), and the shape
    judge's verdicts (toy.judge): the share of videos showing the prompted shape as one object, and its colour."""
    totals = {}
    for prompt, videos in sample_videos(model, prompts, videos_per_prompt, seed):
        for dim, s in reward.score(videos, [prompt] * len(videos), model.fps).items():
            totals.setdefault(dim, []).extend(s.tolist())
        for dim, rate in toy.judge_rates(videos, [prompt] * len(videos)).items():
            totals.setdefault(f"judged_{dim}", []).append(rate)
    return {**{dim: sum(v) / len(v) for dim, v in totals.items()}, "judge_version": toy.JUDGE_VERSION}


def run_flags(name: str, seed: int, args) -> list[str]:
    """train.py's flags of one run of the sweep (its --out aside)."""
    flags = RUNS[name] + ["--model", "toy", "--reward", "toy", "--prompts", args.prompts, "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
                          "--sample-steps", str(args.sample_steps), "--save-every", str(args.steps)]
    flags += [] if "--reward-dim" in RUNS[name] else ["--reward-dim", args.reward_dim]  # the mixes name their own
    return flags + (["--offline-pairs", str(args.offline_pairs)] if "offline" in RUNS[name] else [])


def cache_key(*parts) -> str:
    """A folder name's suffix that changes with anything that changes a run: its flags, the prompts' text and the
    toy weights it starts from. A cache hit is the same run, never one made with other settings."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


def run_one(name: str, seed: int, args, model, reward, prompts: list[str], weights: str, keys: list[str]) -> dict:
    """Train one run (skipped if its last checkpoint exists) and evaluate its final policy (cached in eval.json),
    so an interrupted sweep, or sweeps over different seeds in parallel, pick up what is done. The run's folder,
    <name>-seed<seed>-<key>, is keyed by every setting (cache_key) and records them in settings.json."""
    flags = run_flags(name, seed, args)
    out = os.path.join(args.out, f"{name}-seed{seed}-{cache_key(flags, read_text(args.prompts, 'prompt file'), weights)}")
    policy = os.path.join(out, f"checkpoint-{args.steps}", "model.safetensors")
    if not os.path.isfile(policy):  # continue an interrupted run, or start one
        os.makedirs(out, exist_ok=True)
        write_atomically(os.path.join(out, "settings.json"), [json.dumps({"flags": flags, "toy_weights": weights})])
        train.train(train.parse_args(flags + ["--out", out] + (["--resume"] if checkpoint.latest_checkpoint(out)
                                                                else ["--overwrite"])))
    return {**cached_eval(os.path.join(out, "eval.json"), model, reward, prompts, policy, keys), **training_stats(out)}


def training_stats(out: str, window: int = 5) -> dict:
    """From the run's metrics.jsonl (inputs.read_metrics): the trained reward of the policy's own samples
    (reward_mean, the mean over the step's candidates; none for offline DPO) over the first and the last `window`
    steps, and the seconds per step (sampling, decoding, reward and training; the first step, which warms up, left out)."""
    path = os.path.join(out, "metrics.jsonl")
    steps = {row["step"]: row for row in read_metrics(path)}  # a resumed run logs a step again: the last one counts
    rows = [steps[k] for k in sorted(steps)]
    if not rows:
        raise UserError(f"{path} holds no step: remove {out} and run ablate.py again")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    stats = {"s_per_step": mean([sum(v for k, v in r.items() if k.startswith("time_")) for r in rows[1:] or rows])}
    sampled = [r["reward_mean"] for r in rows if isinstance(r.get("reward_mean"), (int, float))]
    if sampled:  # offline DPO samples nothing while it trains: no curve of its own samples
        stats.update(trained_first=mean(sampled[:window]), trained_last=mean(sampled[-window:]))
    return stats


def cached_eval(path: str, model, reward, prompts: list[str], policy: str | None, keys: list[str]) -> dict:
    """The evaluation of a policy, cached in `path`: a cache that does not hold a number for each of `keys`
    (damaged, cut short), or that another version of the shape judge made (toy.JUDGE_VERSION), is named and
    computed again."""
    if os.path.isfile(path):
        try:
            cached = read_json(path, "cached evaluation")
            cached = cached if isinstance(cached, dict) else {}
            whole = all(isinstance(cached.get(k), (int, float)) and not isinstance(cached.get(k), bool) for k in keys)
            if whole and cached.get("judge_version") == toy.JUDGE_VERSION:
                return cached
            why = ("made by another version of the shape judge" if whole else
                   "damaged (a value missing or not a number)")
            print(f"warning: cached evaluation {path} is {why}; evaluating again", file=sys.stderr)
        except UserError as e:
            print(f"warning: {e}; evaluating again", file=sys.stderr)
    if policy:
        model.load_weights(policy)
    result = evaluate_policy(model, reward, prompts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, [json.dumps(result, indent=1)])
    return result


@functools.lru_cache(maxsize=None)  # a table asks for the same few quantiles in every cell
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (p > 0.5): the pdf integrated by Simpson's rule, the bound found by bisection; no
    scipy for one number. t_quantile(0.975, 4) = 2.776."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        return 0.5 + h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * pdf(i * h) for i in range(n + 1))

    lo, hi = 0.0, 100.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(v: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of `v` over seeds (Student's t; 0 for one seed)."""
    return t_quantile(0.975, len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% interval (Welch: unequal spreads, Welch-Satterthwaite
    degrees of freedom)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else 1e9
    return statistics.mean(a) - statistics.mean(b), t_quantile(0.975, df) * math.sqrt(va + vb)


def summarise(results: dict, dims: list[str]) -> str:
    """A markdown table: a row per run, mean over seeds +- the half-width of its 95% interval for each dimension
    ('-' where a run has none: the untrained model has no training curve)."""
    lines = ["| run | seeds | " + " | ".join(dims) + " |", "|---" * (len(dims) + 2) + "|"]
    for name, per_seed in results.items():
        cells = []
        for dim in dims:
            v = [r[dim] for r in per_seed if dim in r]
            digits = 1 if dim == "s_per_step" else 3
            cells.append(f"{statistics.mean(v):.{digits}f} ± {interval(v):.{digits}f}" if v else "-")
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus(results: dict, base: str, dims: list[str]) -> str:
    """A markdown table: each run's difference from `base` per dimension, with its 95% interval (Welch); a
    difference whose interval excludes 0 is marked *."""
    lines = [f"| run - {base} | " + " | ".join(dims) + " |", "|---" * (len(dims) + 1) + "|"]
    for name, per_seed in results.items():
        if name == base or len(per_seed) < 2 or len(results[base]) < 2:
            continue
        cells = []
        for dim in dims:
            d, h = difference([r[dim] for r in per_seed], [r[dim] for r in results[base]])
            cells.append(f"{d:+.3f} ± {h:.3f}{' *' if abs(d) > h else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), help=f"which runs: {', '.join(RUNS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--offline-pairs", type=int, default=80, help="offline prompts, sampled once (as many as an "
                   "online run's steps x batch size)")
    p.add_argument("--reward-dim", default="visual_quality", help="the toy reward's dimension the runs train on "
                   "(default: the quick start's; the online-mix runs name their own)")
    p.add_argument("--versus", default=None, help="a run of --runs: a second table, each run's difference from it "
                   "with a 95%% interval")
    p.add_argument("--prompts", default="prompts/toy.txt")
    p.add_argument("--out", default="runs/ablation")
    return p


DOMAINS = [  # inputs.check_domains: each flag's values, before anything trains
    ("runs", lambda v, a: v in RUNS, "{v!r} is no run here; choose from " + ", ".join(RUNS)),
    ("steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("batch_size", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("lr", lambda v, a: math.isfinite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("sample_steps", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("offline_pairs", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("reward_dim", lambda v, a: v in toy.ToyReward.dims or v == "global",
     "{v!r} is not a toy reward dimension; choose from " + ", ".join(toy.ToyReward.dims) + ", global"),
    ("versus", lambda v, a: v in a.runs, "{v!r} is not one of --runs"),
    *[(flag, ANY, "") for flag in ("seeds", "prompts", "out")],
]


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    load_prompts(args.prompts)  # a missing or binary prompt file: one line now
    writable_dir(args.out, "--out")  # before hours of training, not after them
    for path in ("results.json", "table.md"):
        writable_file(os.path.join(args.out, path), "--out")
    weights = file_sha256(os.path.join(toy.TOY_DIR, "model.safetensors"))  # every run starts from these
    reward = build_reward("toy")
    model = build_model("toy")
    model.sample_steps = args.sample_steps
    prompts = toy.all_prompts()
    keys = reward.dims + [f"judged_{d}" for d in toy.ShapeJudge.dims]  # what an evaluation holds
    untrained = os.path.join(args.out, f"untrained-{cache_key(args.sample_steps, weights)}.json")
    results = {"untrained": [cached_eval(untrained, model, reward, prompts, None, keys)]}
    for name in args.runs:
        for seed in args.seeds:
            results.setdefault(name, []).append(run_one(name, seed, args, model, reward, prompts, weights, keys))
            print(f"{name} seed {seed}: {json.dumps({k: round(v, 4) for k, v in results[name][-1].items()})}")
    for per_seed in results.values():  # the mean of the five, as --reward-dim global
        for r in per_seed:
            r["global"] = sum(r[d] for d in reward.dims) / len(reward.dims)
    table = summarise(results, reward.dims + ["global"] + [f"judged_{d}" for d in toy.ShapeJudge.dims] + ["trained_first",
                                              "trained_last", "s_per_step"])
    write_atomically(os.path.join(args.out, "results.json"), [json.dumps({"args": vars(args), "results": results},
                                                                          indent=1)])
    if args.versus:
        table += "\n\n" + versus(results, args.versus, reward.dims + [f"judged_{d}" for d in toy.ShapeJudge.dims])
    write_atomically(os.path.join(args.out, "table.md"), [table + "\n"])
    print(table)


if __name__ == "__main__":
    main()
