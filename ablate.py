"""The paper's comparisons, replayed in the toy world (toy.py) on a CPU: online vs offline DPO (Table 4d),
ReFL (Table 4c), the reference-update period K and the candidate count N (Table 5), DenseDPO's vanilla vs
structural vs dense vs dense with a third of the labels, and a weighted mix of two reward dimensions, over
several seeds.

    python ablate.py                                  # all runs below, 2 seeds: about 2 h of 2 shared CPU cores
    python ablate.py --runs online-K5 offline --seeds 2   # sweeps in parallel processes share --out

Every run starts from the shipped toy weights and trains with the toy reward's temporal consistency (the
paper's best dimension, Table 4b), or the online-mix runs with its weighted mix with dynamic degree. Each final policy then samples every toy prompt with fixed seeds, and the
table reports the toy reward of those videos and the shape judge's verdicts (toy.judge) as mean +- std over
seeds, next to the untrained model's; beside them each run's training curve from its metrics.jsonl (the trained
reward of its own samples over its first and last 5 steps) and its seconds per step.
"""
import argparse
import hashlib
import json
import os
import statistics
import sys

import torch

import checkpoint
import toy
import train
from inputs import UserError
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
    totals, judged = {}, {"judged_shape": [], "judged_color": []}
    for prompt, videos in sample_videos(model, prompts, videos_per_prompt, seed):
        for dim, s in reward.score(videos, [prompt] * len(videos), model.fps).items():
            totals.setdefault(dim, []).extend(s.tolist())
        rates = toy.judge_rates(videos, [prompt] * len(videos))
        judged["judged_shape"].append(rates["shape"])
        judged["judged_color"].append(rates["color"])
    return {dim: sum(v) / len(v) for dim, v in {**totals, **judged}.items()}


def run_one(name: str, seed: int, args, model, reward, prompts: list[str]) -> dict:
    """Train one run (skipped if its last checkpoint exists) and evaluate its final policy (cached in eval.json),
    so an interrupted sweep, or sweeps over different seeds in parallel, pick up what is done."""
    out = os.path.join(args.out, f"{name}-seed{seed}")
    flags = RUNS[name] + ["--model", "toy", "--reward", "toy", "--prompts", args.prompts, "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
                          "--sample-steps", str(args.sample_steps), "--save-every", str(args.steps), "--out", out]
    flags += ["--offline-pairs", str(args.offline_pairs)] if "offline" in RUNS[name] else []
    policy = os.path.join(out, f"checkpoint-{args.steps}", "model.safetensors")
    if not os.path.isfile(policy):  # continue an interrupted run, or start one
        train.train(train.parse_args(flags + (["--resume"] if checkpoint.latest_checkpoint(out) else ["--overwrite"])))
    return {**cached_eval(os.path.join(out, "eval.json"), model, reward, prompts, policy), **training_stats(out)}


def training_stats(out: str, window: int = 5) -> dict:
    """From the run's metrics.jsonl: the trained reward of the policy's own samples (reward_mean, the mean over the
    step's candidates) over the first and the last `window` steps, and the seconds per step (sampling, decoding,
    reward and training; the first step, which warms up, left out)."""
    steps = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            steps[row["step"]] = row  # a resumed run logs a step again: the last one counts
    rows = [steps[k] for k in sorted(steps)]
    mean = lambda v: sum(v) / len(v)
    return {"trained_first": mean([r["reward_mean"] for r in rows[:window]]),
            "trained_last": mean([r["reward_mean"] for r in rows[-window:]]),
            "s_per_step": mean([sum(v for k, v in r.items() if k.startswith("time_")) for r in rows[1:] or rows])}


def check_weights(out: str, weights: str = os.path.join(toy.TOY_DIR, "model.safetensors")) -> None:
    """Every run in --out starts from the same toy weights, so the folder records their sha256 on first use
    (toy_weights.sha256), and a folder of runs from other weights (an older toy world) stops with one line
    instead of mixing their cached results into the table."""
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(out, "toy_weights.sha256")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read().strip() != digest:
                raise UserError(f"{out} holds runs from other toy weights than {weights}; remove it or pass another --out")
    elif os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out} holds runs that do not record their toy weights (toy_weights.sha256, from an older "
                        "ablate.py); remove it or pass another --out")
    else:
        os.makedirs(out, exist_ok=True)
        with open(stamp + ".tmp", "w") as f:  # parallel sweeps may start together: write whole, then rename
            f.write(digest + "\n")
        os.replace(stamp + ".tmp", stamp)


def cached_eval(path: str, model, reward, prompts: list[str], policy: str | None) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if policy:
        model.load_weights(policy)
    result = evaluate_policy(model, reward, prompts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def summarise(results: dict, dims: list[str]) -> str:
    """A markdown table: a row per run, mean +- std over seeds of each reward dimension ('-' where a run has none:
    the untrained model has no training curve)."""
    lines = ["| run | seeds | " + " | ".join(dims) + " |", "|---" * (len(dims) + 2) + "|"]
    for name, per_seed in results.items():
        cells = []
        for dim in dims:
            v = [r[dim] for r in per_seed if dim in r]
            digits = 1 if dim == "s_per_step" else 3
            cells.append(f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v) if len(v) > 1 else 0:.{digits}f}"
                         if v else "-")
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), help=f"which runs: {', '.join(RUNS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--offline-pairs", type=int, default=60, help="offline prompts (every toy prompt once)")
    p.add_argument("--prompts", default="prompts/toy.txt")
    p.add_argument("--out", default="runs/ablation")
    args = p.parse_args(argv)
    try:
        unknown = [r for r in args.runs if r not in RUNS]
        if unknown:
            raise UserError(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
        check_weights(args.out)
        reward = build_reward("toy")
        model = build_model("toy")
        model.sample_steps = args.sample_steps
        prompts = toy.all_prompts()
        results = {"untrained": [cached_eval(os.path.join(args.out, "untrained.json"), model, reward, prompts, None)]}
        for name in args.runs:
            for seed in args.seeds:
                results.setdefault(name, []).append(run_one(name, seed, args, model, reward, prompts))
                print(f"{name} seed {seed}: {json.dumps({k: round(v, 4) for k, v in results[name][-1].items()})}")
    except UserError as e:
        sys.exit(f"error: {e}")
    for per_seed in results.values():  # the mean of the five, as --reward-dim global
        for r in per_seed:
            r["global"] = sum(r[d] for d in reward.dims) / len(reward.dims)
    table = summarise(results, reward.dims + ["global", "judged_shape", "judged_color", "trained_first",
                                              "trained_last", "s_per_step"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
