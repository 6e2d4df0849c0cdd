"""torchrun with two CPU processes (gloo): DDP and FSDP2 keep every rank's policy and reference identical, compute
the gradients one process would, and resume from a checkpoint exactly."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --min-gap makes about half the prompts ties: a rank whose prompt tied must still join the step's collectives
# (-n, not --n: torchrun's parser would read --n as an ambiguous abbreviation of its own options)
RUN = ["--model", "tiny", "--reward", "pixel", "--steps", "4", "--batch-size", "4", "-n", "4", "--k", "3",
       "--min-gap", "0.004", "--save-every", "2"]

# train.py as torchrun runs it, plus a dump of every rank's own (gathered) policy and reference at each checkpoint:
# only rank 0 writes checkpoints, and the point is to compare the ranks
DRIVER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
import parallel, run, train

save = run.save_checkpoint

def save_and_dump(out, model, ref, opt, state, args, *rest):
    path = save(out, model, ref, opt, state, args, *rest)
    full = lambda net: {{k: v.detach().cpu().clone()
                        for k, v in get_model_state_dict(net, options=StateDictOptions(full_state_dict=True)).items()}}
    dump = {{"policy": full(model.dit), "ref": full(ref)}}
    torch.save(dump, os.path.join(out, f"rank{{parallel.RANK}}-step{{state['step']}}.pt"))
    return path

run.save_checkpoint = save_and_dump
train.main()
"""


def torchrun(tmp_path, *args, patch: str = ""):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO).replace("train.main()", patch + "train.main()"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver), *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_ranks(folder, step: int):
    a, b = (torch.load(os.path.join(folder, f"rank{r}-step{step}.pt")) for r in (0, 1))
    for net in ("policy", "ref"):
        assert a[net].keys() == b[net].keys()
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


def same_weights(a, b, atol: float = 0.0):
    for file in ("model.safetensors", "ref.safetensors"):
        wa, wb = load_file(os.path.join(a, file)), load_file(os.path.join(b, file))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=f"{file} {key}")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torchrun(tmp, *RUN, "--out", str(tmp / "run"))
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("one") / "run"
    train.train(train.parse_args([*RUN, "--out", str(out)]))
    return out


@pytest.mark.slow
def test_ddp_ranks_hold_identical_policy_and_reference(ddp_run):
    for step in (2, 4):
        same_ranks(ddp_run / "run", step)
    state = json.loads((ddp_run / "run" / "checkpoint-4" / "state.json").read_text())
    assert state["ref_updates"] == 1 and state["prompts_seen"] == 16  # 4 steps x a global batch of 4 prompts


@pytest.mark.slow
def test_ddp_gradients_equal_one_process(ddp_run, one_process):
    """The two ranks' prompts together are the one process's batch: same losses, same gradient norms."""
    two, one = metrics(ddp_run / "run"), metrics(one_process)
    assert [(r["pairs"], r["ties"]) for r in two] == [(r["pairs"], r["ties"]) for r in one]
    assert two[-1]["ties"] > 0 and all(r["pairs"] > 0 for r in two)
    for a, b in zip(two, one):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5)
    same_weights(ddp_run / "run" / "checkpoint-4", one_process / "checkpoint-4", atol=2e-5)


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted(ddp_run, tmp_path):
    shutil.copytree(ddp_run / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    torchrun(tmp_path, *RUN, "--out", str(tmp_path / "run"), "--resume")
    same_weights(tmp_path / "run" / "checkpoint-4", ddp_run / "run" / "checkpoint-4")
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert [r["grad_norm"] for r in metrics(tmp_path / "run")] == [r["grad_norm"] for r in metrics(ddp_run / "run")]


@pytest.mark.slow
def test_fsdp_resumes_a_ddp_checkpoint_and_itself(ddp_run, tmp_path):
    """FSDP2 shards policy and reference; its checkpoints are the same full files: it resumes DDP's checkpoint-2,
    its ranks stay identical, it follows DDP's run, and its own checkpoint resumes exactly."""
    shutil.copytree(ddp_run / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    # a checkpoint every step; --split-pair: two backward passes per pair, the gradients reduced in the second
    fsdp = [*RUN[:-1], "1", "--fsdp", "--split-pair", "--out", str(tmp_path / "run")]
    torchrun(tmp_path, *fsdp, "--resume")
    same_ranks(tmp_path / "run", 4)
    for a, b in zip(metrics(tmp_path / "run"), metrics(ddp_run / "run")):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    same_weights(tmp_path / "run" / "checkpoint-4", ddp_run / "run" / "checkpoint-4", atol=2e-5)

    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoint-4")
    torchrun(tmp_path, *fsdp[:-1], str(tmp_path / "again"), "--resume")
    same_weights(tmp_path / "again" / "checkpoint-4", tmp_path / "run" / "checkpoint-4")


@pytest.mark.slow
def test_batch_must_split_evenly_across_ranks(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           *RUN[:6], "--batch-size", "3", "--out", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "error: --batch-size 3 must be a multiple of the 2 processes" in out.stderr
    assert not re.search(r"\[rank\d\]:.*Traceback", out.stderr)  # torchrun reports the exit; no worker traceback


def test_fsdp_needs_torchrun(tmp_path):
    import train

    with pytest.raises(SystemExit) as e:
        train.main([*RUN, "--fsdp", "--out", str(tmp_path)])
    assert str(e.value.code) == ("error: --fsdp shards the model across processes: start the run with torchrun "
                                 "--nproc_per_node G")


@pytest.mark.slow
def test_lora_under_ddp_and_fsdp_follows_one_process_and_resumes(tmp_path):
    """--lora-rank on two ranks: DDP and FSDP2 (resuming DDP's checkpoint-2) compute the one process's gradient
    norms and adapters; the reference adapter is updated on every rank at the same step."""
    import train

    lora_run = [*RUN, "--lora-rank", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = lambda *a: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                     "2", os.path.join(REPO, "train.py"), *lora_run, *a], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=600)
    assert two("--out", str(tmp_path / "ddp")).returncode == 0
    train.train(train.parse_args([*lora_run, "--merge-lora", "--out", str(tmp_path / "one")]))
    shutil.copytree(tmp_path / "ddp", tmp_path / "fsdp")
    shutil.rmtree(tmp_path / "fsdp" / "checkpoint-4")
    r = two("--fsdp", "--merge-lora", "--out", str(tmp_path / "fsdp"), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    norms = [[row["grad_norm"] for row in metrics(tmp_path / x)] for x in ("one", "ddp", "fsdp")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[2] == pytest.approx(norms[0], rel=1e-4)
    assert metrics(tmp_path / "one")[-1]["ref_updates"] == 1
    for file in ("pytorch_lora_weights.safetensors", "reference_lora.safetensors"):
        one = load_file(tmp_path / "one" / "checkpoint-4" / file)
        for x in ("ddp", "fsdp"):
            other = load_file(tmp_path / x / "checkpoint-4" / file)
            assert one.keys() == other.keys()
            for key in one:
                torch.testing.assert_close(other[key], one[key], atol=2e-5, rtol=0, msg=f"{x} {file} {key}")
    # --merge-lora on the sharded network: the merged full weights gathered from two FSDP2 shards equal one process's
    one, other = (load_file(tmp_path / x / "checkpoint-4" / "model.safetensors") for x in ("one", "fsdp"))
    assert one.keys() == other.keys() and not any(".lora_" in k or "base_layer" in k for k in one)
    for key in one:
        torch.testing.assert_close(other[key], one[key], atol=2e-5, rtol=0, msg=f"merged {key}")


GRPO = ["--model", "tiny", "--reward", "pixel", "--method", "grpo", "--steps", "2", "--batch-size", "4", "-n", "4",
        "--sample-steps", "3", "--grpo-micro-batch", "3", "--save-every", "2"]
# rank 1's groups all tie: it must still make every network call of the update, with weight 0
TIE_ON_RANK_1 = """
import grpo
_advantages = grpo.group_advantages
grpo.group_advantages = lambda r, clip=5.0: _advantages(r, clip) * (parallel.RANK != 1)
"""


@pytest.mark.slow
def test_grpo_under_ddp_follows_one_process_and_a_rank_that_ties_keeps_step(tmp_path):
    """--method grpo under torchrun: the ranks' groups together are the one process's batch (same losses and
    gradient norms, micro-batches of 3 videos included), and a rank whose groups all tie joins the collectives
    with zero weight instead of leaving the other waiting."""
    import train

    torchrun(tmp_path, *GRPO, "--out", str(tmp_path / "ddp"))
    train.train(train.parse_args([*GRPO, "--out", str(tmp_path / "one")]))
    two, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    for a, b in zip(two, one):
        assert a["pairs"] == b["pairs"] == 16 and a["ties"] == b["ties"] == 0
        for key in ("grad_norm", "kl", "reward_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-8), key
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)  # -A ratio with ratio ~1 means ~0: rounding alone
    same_ranks(tmp_path / "ddp", 2)
    same_weights(tmp_path / "ddp" / "checkpoint-2", tmp_path / "one" / "checkpoint-2", atol=2e-5)

    torchrun(tmp_path, *GRPO, "--out", str(tmp_path / "tied"), patch=TIE_ON_RANK_1)
    tied = metrics(tmp_path / "tied")
    assert [(r["pairs"], r["ties"]) for r in tied] == [(8, 2), (8, 4)]  # rank 0's 2 prompts x 4; ties run on
    same_ranks(tmp_path / "tied", 2)
