"""The command line of train.py: every flag with its help, and the checks of their values, each a one-line refusal
before anything loads (README: Reliability)."""
import argparse
import math

import parallel
import lora
from inputs import ANY, UserError, check_domains, default_prompts, refuse_empty
from reward import REWARDS, parse_dim, reward_dims, reward_names
from sample import add_model_args, check_model_args

METHOD_NAMES = {"online": "OnlineVPO", "offline": "offline DPO", "refl": "ReFL", "dense": "DenseDPO",
                "structural": "StructuralDPO", "grpo": "GRPO"}
ALIGNED = ("dense", "structural")  # DenseDPO's aligned candidates: corrupted copies of one video, denoised again
# the paper's reward for real models; the toy world's judge for the toy model; no weights at all for the test model
DEFAULT_REWARDS = {"toy": "toy", "tiny": "pixel"}


def parser(description: str = "") -> argparse.ArgumentParser:
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
    g.add_argument("--grpo-steps-per-round", type=int, default=2, help="optimizer steps per sampling round: the "
                   "round's first step samples the rollouts of all of them, so the later ones train off-policy and the "
                   "clip acts (Flow-GRPO's configs: 2; 1 = every update on-policy, REINFORCE with a KL)")
    g.add_argument("--grpo-kl-reference", default="base", choices=["base", "moving"], help="the KL term's reference: "
                   "the base model, fixed (Flow-GRPO; with LoRA the adapter disabled), or the policy every --k steps "
                   "(DPO's curriculum)")
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
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r; 0 = full fine-tuning (Flow-GRPO's "
                   "configs: 32)")
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
    g.add_argument("--text-encoder-offload", default="free", choices=["cpu", "free"],
                   help="after every training and eval prompt is encoded once (the prompt-embedding cache): free "
                   "the text encoder (T5-XXL: 9.5 GB in bf16), or park it on the CPU")
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
    g.add_argument("--eval-prompts", default=None, help="fixed prompts for --sample-every (the first 4)")
    g.add_argument("--eval-videos", type=int, default=2, help="videos per eval prompt, fixed seeds")
    g.add_argument("--eval-reward", default=None, help=f"a held-out reward ({', '.join(REWARDS)}; judge: the toy "
                   "world's shape judge) that scores the eval samples every --sample-every steps beside the trained "
                   "reward, logged in metrics.jsonl as heldout/<dim>; a warning when the two part (reward hacking)")
    g.add_argument("--eval-reward-dim", default=None, help="the held-out reward's dimension the warning watches "
                   "(default: its own default; 'global' = the mean of all)")
    g.add_argument("--hack-patience", type=int, default=3, help="evaluations in a row at which the trained reward "
                   "rose and the held-out one fell before the warning")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --out, or from the given checkpoint folder")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run: "
                   "its metrics, checkpoints, samples and offline pairs are deleted")
    return p


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The flags, the empty and the other method's refused; a method flag not given takes its parser default."""
    p = parser(description)
    defaults = {flag: p.get_default(flag) for flag in METHOD_FLAGS}
    p.set_defaults(**dict.fromkeys(METHOD_FLAGS))  # None: not given, so a flag of another method can be told apart
    args = p.parse_args(argv)
    refuse_empty(args, p)
    refuse_foreign(args)
    for flag, default in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    args.reward = DEFAULT_REWARDS.get(args.model, "videoscore") if args.reward is None else args.reward
    args.prompts = default_prompts(args.model, "train") if args.prompts is None else args.prompts
    args.eval_prompts = default_prompts(args.model, "eval") if args.eval_prompts is None else args.eval_prompts
    return args


# Flags that only some methods read -> those methods (a function of the flags). Given with another method, such a
# flag is refused in one line rather than silently ignored; not given, it takes its parser default.
DPO = ("online", "offline", "dense", "structural")  # the methods that build preference pairs
CURRICULUM = ("online", "dense", "structural")  # Alg. 1 line 14 every K steps (offline's reference is fixed)
METHOD_FLAGS = {
    "n": lambda a: a.method != "refl",  # ReFL scores one video per prompt
    "k": lambda a: a.method in CURRICULUM or a.method == "grpo" and a.grpo_kl_reference == "moving",
    "beta": lambda a: a.method in DPO,
    "min_gap": lambda a: a.method in DPO,
    "split_pair": lambda a: a.method in DPO,
    "ref_offload": lambda a: a.method != "refl",  # ReFL holds no reference
    "offline_pairs": lambda a: a.method == "offline",
    "refl_latent_frames": lambda a: a.method == "refl",
    **dict.fromkeys(["grpo_noise_level", "grpo_clip", "grpo_beta", "grpo_timestep_fraction", "grpo_steps_per_round",
                     "grpo_kl_reference", "grpo_micro_batch"], lambda a: a.method == "grpo"),
    "eta": lambda a: a.method in ALIGNED,
    "label_fraction": lambda a: a.method in ALIGNED,
    "videos": lambda a: a.method in ALIGNED,
    "captions": lambda a: a.method in ALIGNED,
    "segment_seconds": lambda a: a.method == "dense",  # structural labels the whole video
}


def refuse_foreign(args):
    """A method flag given with a method that does not read it: one line naming the methods that do."""
    for flag, applies in METHOD_FLAGS.items():
        if getattr(args, flag) not in (None, False) and not applies(args):
            readers = [m for m in METHOD_NAMES
                       if applies(argparse.Namespace(**{**vars(args), "method": m, "grpo_kl_reference": "moving"}))]
            why = " (grpo with --grpo-kl-reference moving)" if flag == "k" else ""
            raise UserError(f"--{flag.replace('_', '-')} is read by --method {', '.join(readers)}{why}, not by "
                            f"--method {args.method}, which would ignore it: leave it out")


# Each flag's domain, checked before anything loads: a value outside it is refused in one line (README: Reliability).
# (flag, in its domain, the refusal after "--flag "; {v} is the value given). A flag left at None is not checked.
finite = math.isfinite
DOMAINS = [
    ("n", lambda v, a: v >= 2, "must be at least 2: a preference pair needs two candidates"),
    ("batch_size", lambda v, a: v >= 1, "must be at least 1"),
    ("sample_batch", lambda v, a: v >= 1, "must be at least 1"),
    ("steps", lambda v, a: v >= 1, "must be at least 1"),
    ("k", lambda v, a: v >= 0, "must be >= 0 (0 = never update the reference)"),
    ("offline_pairs", lambda v, a: v >= 1, "must be at least 1"),
    ("refl_latent_frames", lambda v, a: v >= 1, "must be at least 1"),
    ("vae_micro_batch", lambda v, a: v >= 1, "must be at least 1"),
    ("batch_size", lambda v, a: v % parallel.WORLD == 0, "{v} must be a multiple of the {world} processes: every "
     "rank takes an equal share of each step's prompts"),
    ("lr", lambda v, a: finite(v) and v > 0, "must be a finite number > 0 (0 never moves the weights), got {v}"),
    ("max_grad_norm", lambda v, a: finite(v) and v > 0,
     "must be a finite number > 0 (0 clips every gradient to nothing), got {v}"),
    ("beta", lambda v, a: finite(v) and v > 0,
     "must be a finite number > 0 (beta < 0 trains toward the loser, 0 not at all), got {v}"),
    ("weight_decay", lambda v, a: finite(v) and v >= 0, "must be a finite number >= 0, got {v}"),
    ("min_gap", lambda v, a: finite(v) and v >= 0, "must be a finite number >= 0, got {v}"),
    ("save_every", lambda v, a: v >= 1, "must be at least 1"),
    ("reward_batch", lambda v, a: v >= 1, "must be at least 1"),
    ("sample_every", lambda v, a: v >= 0, "must be at least 0"),
    ("eval_videos", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("hack_patience", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("grpo_noise_level", lambda v, a: finite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("grpo_clip", lambda v, a: finite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("grpo_beta", lambda v, a: finite(v) and v >= 0, "must be a finite number >= 0 (0: no KL term), got {v}"),
    ("grpo_timestep_fraction", lambda v, a: finite(v) and 0 < v <= 1, "must be in (0, 1], got {v}"),
    ("grpo_steps_per_round", lambda v, a: v >= 1, "must be at least 1, got {v}"),
    ("save_every", lambda v, a: a.method != "grpo" or v % a.grpo_steps_per_round == 0,
     "{v} must be a multiple of --grpo-steps-per-round: a checkpoint inside a sampling round could not resume it "
     "exactly (its rollouts are not saved)"),
    ("grpo_micro_batch", lambda v, a: v >= 0,
     "must be at least 1 (0: all videos at once), got {v}"),
    ("eta", lambda v, a: finite(v) and 0 < v <= 1,
     "must be in (0, 1] (the noise level of the corrupted copies), got {v}"),
    ("label_fraction", lambda v, a: finite(v) and 0 < v <= 1,
     "must be in (0, 1] (the share of labelled pairs kept), got {v}"),
    ("segment_seconds", lambda v, a: finite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("lora_rank", lambda v, a: v >= 0, "must be at least 1 (0 = full fine-tuning), got {v}"),
    ("lora_alpha", lambda v, a: finite(v) and v > 0, "must be a finite number > 0, got {v}"),
    ("lora_dropout", lambda v, a: finite(v) and 0 <= v < 1, "must be in [0, 1), got {v}"),
    ("lora_targets", lambda v, a: lora.valid_pattern(v), "{v!r} is not a valid regular expression (Python re)"),
    ("reward_dim", ANY, ""),  # the reward's own dimensions: parse_dim in check_args, before any weights load
    ("eval_reward_dim", ANY, ""),  # the held-out reward's dimensions: parse_dim in check_args
    *[(flag, ANY, "") for flag in ("prompts", "eval_prompts", "videos", "captions", "reward", "reward_path", "seed",
                                   "out", "resume", "eval_reward")],  # a path is checked by its reader, a reward by reward_names
]
# Flags that do not combine, checked after the domains: (the flags given together, the refusal)
CONFLICTS = [
    (lambda a: a.fsdp and a.model == "wan2.2-14b",
     "--fsdp does not shard wan2.2-14b's two experts: ranks whose DPO timesteps fall on different sides of the "
     "boundary would gather different experts' blocks; use DDP (torchrun without --fsdp) with --lora-rank and "
     "--dtype bf16"),
    (lambda a: a.fsdp and parallel.WORLD == 1,
     "--fsdp shards the model across processes: start the run with torchrun --nproc_per_node G"),
    (lambda a: a.fsdp and a.ref_offload, "--ref-offload and --fsdp do not combine: FSDP2 already shards the reference"),
    (lambda a: (a.videos is None) != (a.captions is None),
     "--videos and --captions go together: a folder of clips and the file that captions them"),
    (lambda a: not a.lora_rank and lora_only(a),
     "--{lora_only} needs --lora-rank (LoRA is off)"),
    (lambda a: a.lora_rank and a.ref_offload,
     "--ref-offload has nothing to offload with --lora-rank: the reference is an adapter"),
    (lambda a: a.eval_reward and not a.sample_every,
     "--eval-reward scores the eval samples: give --sample-every (how many steps between evaluations)"),
    (lambda a: a.eval_reward_dim and not a.eval_reward, "--eval-reward-dim needs --eval-reward"),
    (lambda a: a.resume and a.overwrite,
     "--resume continues the run in --out and --overwrite deletes it: give one of them"),
]


def lora_only(args) -> str | None:
    """The first LoRA flag given (they mean nothing without --lora-rank)."""
    given = [f for f in ("lora_alpha", "lora_dropout", "lora_targets", "merge_lora")
             if getattr(args, f) not in (None, False, 0.0)]
    return given[0].replace("_", "-") if given else None


def check_args(args):
    check_model_args(args)  # names and sizes first: loading a reward or a model takes minutes
    reward_names(args.reward)
    if args.reward_dim is not None:
        parse_dim(args.reward_dim, reward_dims(args.reward))  # the reward's own dimensions, before it loads
    if args.eval_reward is not None:
        reward_names(args.eval_reward)
        if args.eval_reward_dim is not None:
            if isinstance(parse_dim(args.eval_reward_dim, reward_dims(args.eval_reward)), dict):
                raise UserError("--eval-reward-dim names one dimension or global, not a weighted mix")
    check_domains(args, DOMAINS, world=parallel.WORLD)
    for conflict, refusal in CONFLICTS:
        if conflict(args):
            raise UserError(refusal.format(method=args.method, lora_only=lora_only(args)))
