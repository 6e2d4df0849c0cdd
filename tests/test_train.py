"""train.py end to end on the tiny model: metrics, checkpoints, resume, the K schedule, bad input."""
import json
import os

import pytest
from conftest import refusal
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "2", "--batch-size", "2", "--lr", "1e-3"]


def run(out, *extra):
    train.main(FAST + ["--out", str(out), "--prompts", os.path.join(ROOT, "prompts/train.txt"), *extra])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f]


def weights(out, step, file="model.safetensors"):
    return load_file(os.path.join(out, f"checkpoint-{step}", file))


def same(a, b):
    return all((a[k] == b[k]).all() for k in a)


def test_two_step_run_writes_metrics_and_checkpoint(tmp_path):
    run(tmp_path, "--steps", "2")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    for key in ("reward_mean", "reward_w", "reward_l", "accuracy", "kl", "ties", "pairs"):
        assert key in rows[1]
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == sorted(
        ["model.safetensors", "config.json", "ref.safetensors", "optimizer.pt", "rng.pt", "state.json", "args.json"])


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    run(tmp_path / "a", "--steps", "4", "--k", "3")
    run(tmp_path / "b", "--steps", "2", "--k", "3")
    run(tmp_path / "b", "--steps", "4", "--k", "3", "--resume")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert same(weights(tmp_path / "a", 4), weights(tmp_path / "b", 4))
    assert same(weights(tmp_path / "a", 4, "ref.safetensors"), weights(tmp_path / "b", 4, "ref.safetensors"))


@pytest.mark.parametrize("k", [2, 0])
def test_reference_changes_exactly_every_k_steps(tmp_path, k):
    run(tmp_path, "--steps", "4", "--k", str(k), "--save-every", "1")
    refs = [weights(tmp_path, s, "ref.safetensors") for s in range(1, 5)]
    policies = [weights(tmp_path, s) for s in range(1, 5)]
    if k == 2:
        assert not same(refs[0], policies[0])  # step 1: still the initial policy
        assert same(refs[1], policies[1])  # step 2: updated, equals the policy
        assert same(refs[2], refs[1]) and not same(refs[2], policies[2])
        assert same(refs[3], policies[3])
    else:
        assert all(same(r, refs[0]) for r in refs) and not same(refs[3], policies[3])
    assert [r["ref_updates"] for r in metrics(tmp_path)] == ([0, 1, 1, 2] if k == 2 else [0, 0, 0, 0])


def refused(capsys, *args) -> str:
    return refusal(train.main, FAST + list(args), capsys)


def test_empty_prompt_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    line = refused(capsys, "--out", str(tmp_path), "--prompts", str(tmp_path / "empty.txt"))
    assert line == f"error: prompt file '{tmp_path / 'empty.txt'}' holds no prompts"


def test_resuming_a_checkpoint_of_another_model(tmp_path, small_opensora):
    run(tmp_path, "--steps", "1")
    with pytest.raises(SystemExit) as e:  # refused after the model is built (transformers' loading bars first)
        train.main(FAST + ["--model", "opensora", "--dit", small_opensora["dit"], "--vae", small_opensora["vae"],
                           "--text-encoder", small_opensora["t5"], "--size", "32x32", "--frames", "17",
                           "--out", str(tmp_path), "--resume"])
    assert "holds weights of model 'tiny', not 'opensora'" in str(e.value.code)


def test_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    run(tmp_path, "--steps", "1")
    before = weights(tmp_path, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the progress bar and warnings come first; the run ends in one error line
        run(tmp_path, "--steps", "8", "--resume", "--lr", "1e30", "--max-grad-norm", "1e30")
    assert "in a row had a NaN/inf loss" in str(e.value.code)
    assert sorted(os.listdir(tmp_path)) == ["args.json", "checkpoint-1", "metrics.jsonl"]
    assert same(weights(tmp_path, 1), before)


def test_an_unknown_model_is_named_before_the_default_reward_loads(tmp_path):
    with pytest.raises(SystemExit) as e:  # --model sora9 would default to --reward videoscore, a 16 GB download
        train.main(["--model", "sora9", "--out", str(tmp_path)])
    assert str(e.value.code) == ("error: --model 'sora9' is no model here; choose one of toy, opensora, cogvideox, wan, "
                                 "wan2.2-5b, wan2.2-14b, ltx, tiny")


def test_the_test_model_trains_without_any_reward_weights(tmp_path):
    """--model tiny used to default to --reward videoscore: a 16 GB download on a machine without it."""
    train.main(["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "2",
                "--batch-size", "1", "--steps", "1", "--out", str(tmp_path)])
    assert metrics(tmp_path)[0]["reward_dim"] == "temporal_consistency"  # PixelReward's default dimension


def test_a_weighted_mix_of_two_rewards_trains_and_logs_every_dimension(tmp_path):
    """--reward a,b with a weighted --reward-dim: the pairs follow the mix, and each step's metrics hold the raw
    mean of every dimension of both rewards."""
    run(tmp_path, "--steps", "1", "--reward", "pixel,toy", "--reward-dim",
        "pixel:temporal_consistency=1,dynamic_degree=0.5")
    row = metrics(tmp_path)[0]
    assert row["reward_dim"] == "pixel:temporal_consistency=1,dynamic_degree=0.5" and row["pairs"] + row["ties"] == 2
    for d in ("pixel:temporal_consistency", "pixel:colorfulness", "toy:dynamic_degree", "toy:visual_quality"):
        assert 0 <= row[f"reward/{d}"] <= 1


def test_two_identical_runs_write_byte_identical_checkpoints(tmp_path):
    """Anyone comparing runs, or checking a download, by hash: two identical commands write files with the same
    sha256, full fine-tuning and LoRA alike. Each run is its own process, with its own string-hash seed (Python's
    sets) and its own hash-map seeds (safetensors' header), so nothing that varies between processes can hide."""
    import hashlib
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for kind, extra in (("full", []), ("lora", ["--lora-rank", "2", "--merge-lora"])):
        for i, seed in enumerate(("1", "2")):
            out = tmp_path / f"{kind}{i}"
            subprocess.run([sys.executable, os.path.join(root, "train.py"), *FAST, *extra, "--steps", "1",
                            "--out", str(out)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
            folder = out / "checkpoint-1"
            runs[kind, i] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))
                             if f != "args.json"}  # args.json names its own --out
    for kind in ("full", "lora"):
        assert runs[kind, 0] == runs[kind, 1], kind
    assert {"pytorch_lora_weights.safetensors", "reference_lora.safetensors", "model.safetensors", "optimizer.pt",
            "rng.pt", "state.json"} <= set(runs["lora", 0])  # the adapters, the merged weights and the rest


@pytest.mark.parametrize("method", ["online", "offline", "dense", "structural", "refl", "grpo"])
def test_resume_after_a_stop_writes_the_uninterrupted_runs_files_byte_for_byte(tmp_path, method):
    """Every method: a run stopped at a checkpoint and resumed writes the same files as the run that never
    stopped, by sha256 (GRPO's checkpoints fall between its sampling rounds of two steps)."""
    import hashlib

    every = "2" if method == "grpo" else "1"
    flags = FAST[:FAST.index("--n")] + FAST[FAST.index("--n") + 2:] + ["--method", method, "--save-every", every]
    flags += {"offline": ["--n", "3", "--offline-pairs", "2"], "refl": [], "grpo": ["--n", "3"]}.get(
        method, ["--n", "3", "--k", "2"])  # each method's own flags: another method's are refused
    train.main(flags + ["--steps", "4", "--out", str(tmp_path / "a")])
    train.main(flags + ["--steps", every, "--out", str(tmp_path / "b")])
    train.main(flags + ["--steps", "4", "--out", str(tmp_path / "b"), "--resume"])
    digest = lambda run: {f: hashlib.sha256((tmp_path / run / "checkpoint-4" / f).read_bytes()).hexdigest()
                          for f in sorted(os.listdir(tmp_path / run / "checkpoint-4"))
                          if f not in ("args.json", "state.json")}  # args.json records --resume, and state.json its size
    assert digest("a") == digest("b")
    state = lambda run: {k: v for k, v in json.load(open(tmp_path / run / "checkpoint-4" / "state.json")).items()
                         if k != "files"}
    assert state("a") == state("b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
