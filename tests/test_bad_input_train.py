"""train.py's refusals and its damaged-run-folder cases: one `error:` line, no traceback, nothing lost."""
import json
import os
import subprocess
import sys

import pytest
from conftest import refusal

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--size", "16x16", "--frames", "4", "--sample-steps", "2", "--n", "2", "--batch-size", "2",
        "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def refused(capsys, *args) -> str:
    """train.py's main, in this process, as `python train.py FAST ARGS` runs it: the one line the user sees."""
    if "-" in args:  # "--n", "-": the flag left out (ReFL takes no --n)
        i = list(args).index("-")
        args = args[:i - 1] + args[i + 1:]
        at = FAST.index("--n")
        return refusal(train.main, FAST[:at] + FAST[at + 2:] + list(args), capsys)
    return refusal(train.main, FAST + list(args), capsys)


@pytest.mark.parametrize("args, message", [
    (["--prompts", "/nonexistent.txt"], "prompt file '/nonexistent.txt' not found"),
    (["--n", "1"], "--n must be at least 2"),
    (["--model", "sora9"], "--model 'sora9' is no model here"),
    (["--reward", "oracle"], "unknown reward 'oracle'"),
    (["--reward-dim", "beauty"], "unknown reward dimension 'beauty'"),
    (["--reward", "pixel,oracle"], "unknown reward 'oracle'"),
    (["--reward", "pixel,pixel"], "--reward 'pixel,pixel' names a reward twice"),
    (["--reward-dim", "colorfulness=much"], "--reward-dim 'colorfulness=much': the weight must be a number"),
    (["--reward-dim", "colorfulness=0"], "--reward-dim 'colorfulness=0': the weight must be a finite non-zero"),
    (["--reward", "pixel,toy", "--reward-dim", "temporal_consistency"],
     "unknown reward dimension 'temporal_consistency'; it is ambiguous: pixel:temporal_consistency, "
     "toy:temporal_consistency"),
    (["--reward", "pixel,toy", "--reward-path", "a,b,c"], "--reward-path gives 3 paths for 2 rewards"),
    (["--method", "refl", "--n", "-", "--reward-dim", "colorfulness=1,temporal_consistency=1"],
     "--method refl maximises one score of single videos"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--beta", "-1"], "--beta must be a finite number > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--method", "dense", "--eta", "0"], "--eta must be in (0, 1]"),
    (["--method", "grpo", "--grpo-clip", "0"], "--grpo-clip must be a finite number > 0, got 0.0"),
    (["--method", "grpo", "--grpo-timestep-fraction", "1.5"], "--grpo-timestep-fraction must be in (0, 1], got 1.5"),
    (["--method", "dense", "--eta", "1.5"], "--eta must be in (0, 1]"),
    (["--method", "dense", "--segment-seconds", "0"], "--segment-seconds must be a finite number > 0"),
    (["--method", "dense", "--label-fraction", "0"], "--label-fraction must be in (0, 1]"),
    (["--label-fraction", "0.5"], "--label-fraction is read by --method dense, structural, not by --method online"),
    (["--method", "offline", "--k", "5"], "--k is read by --method online, dense, structural, grpo (grpo with "
     "--grpo-kl-reference moving), not by --method offline, which would ignore it"),
    (["--method", "grpo", "--k", "5"], "--k is read by"),
    (["--grpo-clip", "0.1"], "--grpo-clip is read by --method grpo, not by --method online"),
    (["--method", "dense", "--offline-pairs", "9"], "--offline-pairs is read by --method offline, not by --method dense"),
    (["--method", "grpo", "--beta", "1"], "--beta is read by --method online, offline, dense, structural, not by"),
    (["--method", "structural", "--segment-seconds", "1"], "--segment-seconds is read by --method dense, not by"),
    (["--method", "online", "--eta", "0.5"], "--eta is read by --method dense, structural, not by --method online"),
    (["--method", "refl", "--n", "-", "--split-pair"], "--split-pair is read by --method online, offline, dense"),
    (["--prompts", ""], "--prompts is empty"),
    (["--reward", " "], "--reward is empty"),
    (["--out", ""], "--out is empty"),
    (["--lora-rank", "2", "--lora-targets", "(attn"], "--lora-targets '(attn' is not a valid regular expression"),
    (["--lora-rank", "100000"], "--lora-rank 100000 is larger than the narrowest adapted layer"),
    (["--resolution", "360p"], "--resolution is Open-Sora's size name"),
    (["--device", "cpu:1"], "--device 'cpu:1': not a device torch sees here"),
    (["--device", "meta"], "--device 'meta': not a device torch sees here"),
    (["--cfg", "-1"], "--cfg must be a finite number >= 0"),
    (["--cfg", "inf"], "--cfg must be a finite number >= 0"),
    (["--frames", "-3"], "--frames must be at least 1"),
    (["--sample-steps", "-1"], "--sample-steps must be at least 1"),
    (["--device", "nope"], "--device 'nope': not a device torch sees here"),
    (["--out", "/proc/onlinevpo/run"], "--out '/proc/onlinevpo/run' cannot be written"),
])
def test_bad_values_are_one_line(tmp_path, capsys, args, message):
    assert refused(capsys, "--out", str(tmp_path / "run"), "--steps", "1", *args).startswith(f"error: {message}")
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []  # refused before any writing


def test_bad_files_are_one_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in refused(capsys, "--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "latin1.txt"))
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "--out", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"
    os.makedirs(tmp_path / "dit")
    assert "has no config.json" in refused(capsys, "--out", str(tmp_path / "b"), "--dit", str(tmp_path / "dit"))


def run(out, *extra):
    train.main(FAST + ["--out", str(out), *extra])


def rows(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_a_fresh_run_refuses_an_old_run_folder_and_overwrite_replaces_it(tmp_path):
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "2")
    assert "already holds a run (metrics.jsonl); continue it with --resume, or delete it with --overwrite" in \
        str(e.value.code)
    run(tmp_path, "--steps", "1", "--overwrite")
    assert rows(tmp_path) == [1] and sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == \
        ["checkpoint-1"]


def test_resume_drops_a_cut_last_metrics_line_and_passes_a_damaged_checkpoint(tmp_path, capsys):
    run(tmp_path, "--steps", "3", "--save-every", "1")
    with open(tmp_path / "checkpoint-3" / "optimizer.pt", "r+b") as f:  # a file cut short
        f.truncate(100)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    (tmp_path / "checkpoint-8.bak").mkdir()  # a folder a person made: not a checkpoint
    run(tmp_path, "--steps", "4", "--save-every", "1", "--resume")
    err = capsys.readouterr().err
    assert "checkpoint-3 is damaged: optimizer.pt has 100 bytes" in err and "trying the checkpoint before it" in err
    assert "moved checkpoint-3 to" in err  # set aside, never deleted
    assert rows(tmp_path) == [1, 2, 3, 4]
    assert any(p.startswith("superseded-") for p in os.listdir(tmp_path))


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    run(tmp_path, "--steps", "3", "--save-every", "1")
    run(tmp_path, "--steps", "3", "--save-every", "1", "--resume", str(tmp_path / "checkpoint-1"))
    assert "moved checkpoint-2, checkpoint-3 to" in capsys.readouterr().err
    run(tmp_path, "--steps", "3", "--resume")  # nothing newer to jump onto: it is done
    assert rows(tmp_path) == [1, 2, 3]


def test_damaged_state_json_is_named(tmp_path):
    run(tmp_path, "--steps", "1")
    (tmp_path / "checkpoint-1" / "state.json").write_text('{"step": ')
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "2", "--resume", str(tmp_path / "checkpoint-1"))
    assert "state.json' is damaged (not JSON: cut short?)" in str(e.value.code)


def test_a_second_live_run_on_the_same_folder_is_refused_and_a_stale_lock_is_not(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(other.pid))
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "1")
        assert f"another run (pid {other.pid}) is writing to {tmp_path}" in str(e.value.code)
    finally:
        other.kill()
        other.wait()
    run(tmp_path, "--steps", "1")  # the same pid, now dead: a killed run's stale lock
    assert rows(tmp_path) == [1] and not (tmp_path / ".lock").exists()


def test_eval_samples_of_a_replaced_timeline_are_set_aside_too(tmp_path, capsys):
    run(tmp_path, "--steps", "2", "--save-every", "1", "--sample-every", "1")
    run(tmp_path, "--steps", "2", "--save-every", "1", "--sample-every", "1", "--resume", str(tmp_path / "checkpoint-1"))
    assert "moved checkpoint-2, samples/step-2 to" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "samples")) == ["step-1", "step-2"]  # step 2 sampled again
    assert len(os.listdir(next(tmp_path.glob("superseded-*")) / "samples" / "step-2")) == 8  # the old ones kept


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"st')  # what a kill at step 2 leaves
    run(tmp_path, "--steps", "2", "--resume")
    assert "no checkpoint in" in capsys.readouterr().err and rows(tmp_path) == [1, 2]
