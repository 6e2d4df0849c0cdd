"""The reference takes the policy's numeric path: equal weights give equal errors, under bf16 autocast too."""
import json
import math
import os

import pytest
import torch

import run
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["tiny", "toy", "cogvideox", "wan"])
def test_policy_and_its_reference_give_identical_errors_under_bf16_autocast(name, diffusers_folders, tmp_path):
    flags = ["--model", name, "--reward", "pixel", "--dtype", "bf16", "--size", "32x32", "--frames", "5",
             "--out", str(tmp_path), "--prompts", os.path.join(ROOT, "prompts/train.txt")]
    args = train.parse_args(flags + (["--dit", diffusers_folders[name]] if name in diffusers_folders else []))
    job = run.Run(args, train.entry(args))
    model = job.model
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *model.latent_shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.cat([model.training_timesteps(1, g) for _ in range(3)])  # fractional t: 323.26, not 324
    y, mask = model.encode_prompts(job.prompts[:3])
    with torch.no_grad():
        policy = model.errors(job.net, x0, noise, t, y, mask)
        ref = model.errors(job.ref, x0, noise, t, y, mask)
    assert torch.equal(policy, ref)


def test_first_step_loss_is_log_2_in_bf16(tmp_path):
    """The audit's command: policy == reference at step 1, so the DPO logit is 0 and the loss log 2 exactly."""
    train.main(["--model", "tiny", "--reward", "pixel", "--n", "2", "--k", "1", "--batch-size", "2",
                "--sample-steps", "4", "--steps", "1", "--dtype", "bf16", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-7) and row["margin"] == 0.0
