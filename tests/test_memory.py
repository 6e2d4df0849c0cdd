"""The memory levers change where weights live, never what the model computes."""
import os

import pytest
import torch

import dpo
import run
import train
from model import UserError, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4", "--sample-steps", "3", "--n", "2",
        "--batch-size", "2", "--steps", "2", "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


@pytest.fixture
def small(small_opensora):
    return build_model("opensora", dit=small_opensora["dit"], vae=small_opensora["vae"],
                       text_encoder=small_opensora["t5"], size="32x32", frames=20).to("cpu")


def test_cached_prompt_embeddings_give_the_network_output_of_fresh_t5_features(small):
    """The cache keeps a prompt's tokens only; the padded positions T5 computed are masked out of cross-attention."""
    prompts = ["a red ball", "a dog runs"]
    y, mask = small.encode_prompts(prompts)
    ids, m = small.tokenizer([f"{p} aesthetic score: 6.5." for p in prompts], small.max_length)
    fresh = small.text_encoder(input_ids=ids, attention_mask=m).last_hidden_state[:, None]
    assert torch.equal(mask.cpu(), m) and not torch.equal(y, fresh)  # T5 wrote something into the padding
    z, t = torch.randn(2, *small.latent_shape), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        a = small.dit(z, t, y, mask=mask, **small.model_kwargs(2))
        b = small.dit(z, t, fresh, mask=m, **small.model_kwargs(2))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_freed_text_encoder_still_serves_cached_prompts_and_names_an_unseen_one(small):
    before = small.encode_prompts(["a red ball"])[0]
    run.cache_prompts(small, ["a red ball", "a dog runs"], "free")
    assert small.text_encoder is None
    assert torch.equal(small.encode_prompts(["a red ball"])[0], before)
    with pytest.raises(UserError, match="'a cat' was not encoded before the text encoder was freed"):
        small.encode_prompts(["a cat"])


def test_text_encoder_parked_on_cpu_encodes_unseen_prompts(small):
    run.cache_prompts(small, ["a red ball"], "cpu")
    assert small.encode_prompts(["a cat"])[0].shape == (1, 1, 12, 16)


def test_vae_micro_batch_changes_memory_not_pixels(small):
    z = small.sample(["a red ball"], 1, [0], steps=2)
    small.vae.micro_batch_size = 4
    a = small.decode(z)
    small.vae.micro_batch_size = 1
    diff = (small.decode(z).int() - a.int()).abs()  # other conv batch sizes: float rounding, one level at most
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_reference_offload_gives_the_same_run(tmp_path):
    import json

    rows = []
    for extra in ([], ["--ref-offload", "--text-encoder-offload", "cpu"]):
        out = tmp_path / str(len(rows))
        train.main(FAST + extra + ["--out", str(out)])
        with open(out / "metrics.jsonl") as f:
            rows.append([{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f])
    assert rows[0] == rows[1]


def test_vae_micro_batch_needs_a_chunked_vae(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--vae-micro-batch", "2", "--out", str(tmp_path)])
    assert str(e.value.code) == "error: --vae-micro-batch applies to Open-Sora's VAE, not to model 'tiny'"


def test_split_pair_gives_the_joint_gradient(tmp_path):
    """--split-pair: winners then losers, each with its own backward, weighted by dL/de from a no-grad pass."""
    grads = []
    for split in ([], ["--split-pair"]):
        args = train.parse_args(FAST + split + ["--batch-size", "3", "--out", str(tmp_path / str(len(grads)))])
        job = run.Run(args, train.entry(args))
        torch.manual_seed(0)
        with torch.no_grad():  # a reference that differs from the policy, so the loss is not at its symmetric point
            for p in job.ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        g = torch.Generator().manual_seed(0)
        pairs = [dpo.video_pair(c, p, torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g))
                 for c, p in enumerate(job.prompts[:3])]
        train.dpo_step(job, pairs)
        assert job.examples == 3 and job.finite
        grads.append(torch.cat([p.grad.flatten() for p in job.model.dit.parameters() if p.grad is not None]))
    top = grads[0].abs().max()
    assert top > 0  # batch 3 vs batch 6 forwards: float rounding only
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5 * top)
