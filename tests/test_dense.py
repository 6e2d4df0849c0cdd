"""DenseDPO: segments mapped through each VAE's frame arithmetic, the segment form of the Diffusion-DPO loss, labels
per segment, and guided candidates that keep their source's motion."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import dpo
import opensora as osr
import toy
import train
from conftest import SMALL_VAE
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# Segments -> latent frames, every backend


def test_toy_and_tiny_segments_are_one_latent_frame_per_frame():
    for name in ("toy", "tiny"):
        model = build_model(name)
        assert model.latent_spans == [(f, f + 1) for f in range(8)]
        # the default 0.25 s at 8 fps: four segments of two frames, the same frames in pixels and latents
        frames = round(model.segment_seconds * model.fps)
        assert dpo.segments(model.latent_spans, frames) == [((0, 2), (0, 2)), ((2, 4), (2, 4)), ((4, 6), (4, 6)),
                                                            ((6, 8), (6, 8))]


def test_opensora_segments_follow_its_17_frame_chunks():
    vae = osr.OpenSoraVAE(**SMALL_VAE)
    spans = vae.frame_spans(51)
    assert spans == [(s + lo, s + hi) for s in (0, 17, 34) for lo, hi in [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]]
    for frames in (1, 4, 17, 18, 30, 51, 102):  # one span per latent frame, covering every frame once, in order
        spans = vae.frame_spans(frames)
        assert len(spans) == vae.latent_frames(frames)
        assert spans[0][0] == 0 and spans[-1][1] == frames and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # 1 s at 24 fps: latent frames 0-7 hold frames 0-25; the 4-frame tail (47-50) joins the second segment
    assert dpo.segments(vae.frame_spans(51), 24) == [((0, 26), (0, 8)), ((26, 51), (8, 15))]


def test_opensora_chunks_are_encoded_independently():
    """What the mapping relies on: a change in one 17-frame chunk leaves the other chunk's latent frames alone."""
    torch.manual_seed(0)
    vae = osr.OpenSoraVAE(**SMALL_VAE).eval()
    x = torch.rand(1, 3, 21, 16, 16) * 2 - 1
    y = x.clone()
    y[:, :, 18] += 0.5  # frame 18: the second chunk, latent frame 5 = span (17, 21)
    with torch.no_grad():
        changed = (vae.encode(y) - vae.encode(x)).abs().amax((0, 1, 3, 4)) > 1e-6
    assert changed.tolist() == [False] * 5 + [True]
    assert vae.frame_spans(21)[5] == (17, 21)


def test_cogvideox_and_wan_segments_keep_the_first_frame_alone(diffusers_folders):
    cog = build_model("cogvideox", dit=diffusers_folders["cogvideox"], size="32x32", frames=49)
    wan = build_model("wan", dit=diffusers_folders["wan"], size="32x32", frames=81)
    for model in (cog, wan):
        assert model.latent_spans[:3] == [(0, 1), (1, 5), (5, 9)]
        assert len(model.latent_spans) == model.latent_shape[1] and model.latent_spans[-1][1] == model.frames
    # CogVideoX, 49 frames at 8 fps, 1 s segments: six; Wan, 81 frames at 16 fps: five
    assert dpo.segments(cog.latent_spans, 8) == [((0, 9), (0, 3)), ((9, 17), (3, 5)), ((17, 25), (5, 7)),
                                                 ((25, 33), (7, 9)), ((33, 41), (9, 11)), ((41, 49), (11, 13))]
    assert dpo.segments(wan.latent_spans, 16) == [((0, 17), (0, 5)), ((17, 33), (5, 9)), ((33, 49), (9, 13)),
                                                  ((49, 65), (13, 17)), ((65, 81), (17, 21))]


@pytest.mark.parametrize("name", ["wan", pytest.param("ltx", marks=pytest.mark.slow)])
def test_the_encoder_is_causal_exactly_along_the_spans(diffusers_folders, name):
    """Wan's and LTX-Video's VAEs are strictly causal: changing frame f first changes the latent frame whose span
    holds f, so DenseDPO's segments are the VAE's own (the tiny LTX VAE compresses time 4x)."""
    model = build_model(name, dit=diffusers_folders[name], size="32x32", frames=13)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.vae.encode(x).latent_dist.mean
        for f in range(13):
            y = x.clone()
            y[:, :, f] += 0.5
            changed = (model.vae.encode(y).latent_dist.mean - z).abs().amax((0, 1, 3, 4)) > 1e-6
            first = int(changed.nonzero()[0])
            lo, hi = model.latent_spans[first]
            assert lo <= f < hi


# ----------------------------------------------------------------------------------------------------------
# The loss


def errors(p, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p, s, generator=g) for _ in range(4)]


def test_one_segment_loss_is_eq_3_bit_for_bit():
    """The video-level loss as it was written before the segment form: the same numbers, to the last bit."""
    pa, pb, ra, rb = errors(5, 1)
    w_diff, l_diff = pa[:, 0] - ra[:, 0], pb[:, 0] - rb[:, 0]
    eq3 = -F.logsigmoid(-0.5 * 500.0 * (w_diff - l_diff)).mean()
    seg, _ = dpo.segment_dpo_loss(pa, pb, ra, rb, torch.ones(5, 1), beta=500.0)
    video, _ = dpo.diffusion_dpo_loss(pa[:, 0], pb[:, 0], ra[:, 0], rb[:, 0], beta=500.0)
    assert torch.equal(seg, eq3) and torch.equal(video, eq3)


def test_policy_equal_to_reference_gives_log_2():
    pa, pb, _, _ = errors(3, 4)
    labels = torch.tensor([[1.0, -1.0, 0.0, 1.0], [0.0, 0.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss, m = dpo.segment_dpo_loss(pa, pb, pa.clone(), pb.clone(), labels, beta=500.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and m["accuracy"] == 0.5


def test_segments_that_disagree_pull_each_winner_down_in_its_own_segment():
    """A better in segment 1, B better in segment 2: the loss's gradient lowers A's error in segment 1 and B's in
    segment 2, and raises each loser's error there."""
    pa, pb, ra, rb = errors(1, 2)
    pa.requires_grad_(True), pb.requires_grad_(True)
    loss, _ = dpo.segment_dpo_loss(pa, pb, ra, rb, torch.tensor([[1.0, -1.0]]), beta=50.0)
    ga, gb = torch.autograd.grad(loss, (pa, pb))
    assert ga[0, 0] > 0 and gb[0, 1] > 0  # gradient descent lowers the winners' errors
    assert ga[0, 1] < 0 and gb[0, 0] < 0  # and raises the losers'


def test_tied_segments_are_masked():
    pa, pb, ra, rb = errors(2, 3)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    pa.requires_grad_(True), pb.requires_grad_(True)
    loss, _ = dpo.segment_dpo_loss(pa, pb, ra, rb, labels, beta=100.0)
    ga, gb = torch.autograd.grad(loss, (pa, pb))
    tied = labels == 0
    assert (ga[tied] == 0).all() and (gb[tied] == 0).all() and (ga[~tied] != 0).all()
    kept = ~tied  # the loss is the mean over the three labelled segments, whatever the tied ones hold
    one = lambda i: dpo.segment_dpo_loss(pa[kept][i:i + 1, None], pb[kept][i:i + 1, None], ra[kept][i:i + 1, None],
                                         rb[kept][i:i + 1, None], labels[kept][i:i + 1, None], 100.0)[0]
    assert loss.item() == pytest.approx(sum(one(i).item() for i in range(3)) / 3, rel=1e-6)


def test_labels_per_segment_best_vs_worst_with_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5],   # candidate 0
                           [0.5, 0.5, 0.9, 0.5],   # candidate 1
                           [0.1, 0.9, 0.1, 0.5]])  # candidate 2; segment 3 is a tie
    found = dpo.segment_pairs(scores)
    assert [(a, b, labels.tolist()) for a, b, labels in found] == [(0, 2, [1.0, -1.0, 0.0, 0.0]),
                                                                   (1, 2, [0.0, 0.0, 1.0, 0.0])]
    assert dpo.segment_pairs(scores, min_gap=0.8) == []  # every gap is 0.8 at most: all tied
    assert dpo.segment_pairs(scores[:, :1]) == [(0, 2, torch.tensor([1.0]))] and dpo.select_pair(scores[:, 0]) == (0, 2)


def test_label_fraction_keeps_that_share_of_the_pairs_and_all_at_1():
    pairs = [(i, i + 1, torch.ones(4)) for i in range(3000)]
    assert dpo.keep_labels(pairs, 1.0, None) is pairs  # the default draws nothing: runs stay bit-identical
    kept = dpo.keep_labels(pairs, 1 / 3, torch.Generator().manual_seed(0))
    assert abs(len(kept) / len(pairs) - 1 / 3) < 0.03 and set(map(id, kept)) <= set(map(id, pairs))
    again = dpo.keep_labels(pairs, 1 / 3, torch.Generator().manual_seed(0))
    assert [p[0] for p in again] == [p[0] for p in kept]  # the same counter keeps the same pairs (resume)


def test_segment_errors_are_each_segments_mean_and_one_segment_is_the_whole():
    model = build_model("tiny")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, *model.latent_shape, generator=g), torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([300.0, 700.0])
    y, mask = model.encode_prompts(["a", "b"])
    with torch.no_grad():
        whole = model.errors(model.dit, x0, noise, t, y, mask)
        one = model.errors(model.dit, x0, noise, t, y, mask, [(0, 8)])
        four = model.errors(model.dit, x0, noise, t, y, mask, [(0, 2), (2, 4), (4, 6), (6, 8)])
    assert torch.equal(one[:, 0], whole)
    assert four.shape == (2, 4) and torch.allclose(four.mean(1), whole, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Guided candidates


def track(videos: torch.Tensor) -> torch.Tensor:
    """The toy object's centroid per frame (B, T, 2): pixels far from the background colour."""
    on = ((videos.float() - torch.tensor(toy.BACKGROUND).float()).norm(dim=-1) > 60).float()
    ys, xs = torch.meshgrid(torch.arange(videos.shape[2]).float(), torch.arange(videos.shape[3]).float(),
                            indexing="ij")
    area = on.sum((2, 3)) + 1e-6
    return torch.stack([(on * xs).sum((2, 3)) / area, (on * ys).sum((2, 3)) / area], -1)


@pytest.mark.slow
def test_guided_candidates_keep_the_source_motion_and_differ():
    model = build_model("toy")
    prompts = toy.all_prompts()[::6]  # 10 prompts, every colour, shape and direction
    source = model.sample(prompts, 1, list(range(100, 110)))
    seeds = list(range(40))
    guided = model.decode(model.sample(prompts, 4, seeds, source=source, eta=0.7)).view(10, 4, 8, 32, 32, 3)
    independent = model.decode(model.sample(prompts, 4, seeds)).view(10, 4, 8, 32, 32, 3)
    src = track(model.decode(source))[:, None]
    off = lambda v: (track(v.flatten(0, 1)).view(10, 4, 8, 2) - src).norm(dim=-1).mean().item()
    assert off(guided) < 1.0 and off(guided) < 0.4 * off(independent)  # measured: 0.67 px vs 2.68 px
    differ = (guided[:, 0].float() - guided[:, 1].float()).abs().mean().item()
    assert differ > 3.0  # pixel levels out of 255 (measured 8.0; the source itself would give 0)


def test_eta_1_is_plain_sampling():
    model = build_model("toy")
    source = model.sample(["a red circle moving left"], 1, [7])
    plain = model.sample(["a red circle moving left"], 2, [1, 2])
    assert torch.equal(model.sample(["a red circle moving left"], 2, [1, 2], source=source, eta=1.0), plain)


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_diffusers_guided_sampling_starts_from_the_scheduler_step_at_eta(diffusers_folders, name):
    model = build_model(name, dit=diffusers_folders[name], size="32x32", frames=9)
    source = model.sample(["a cat"], 1, [7], steps=4)
    copies = model.sample(["a cat"], 2, [1, 2], steps=4, source=source, eta=0.6)
    assert copies.shape == (2, *model.latent_shape) and not torch.equal(copies[0], copies[1])
    # below the last sampling step there is nothing to denoise: the copies are the source
    unchanged = model.sample(["a cat"], 2, [1, 2], steps=4, source=source, eta=1e-6)
    assert torch.equal(unchanged, source.repeat(2, 1, 1, 1, 1))


def test_eta_is_the_flow_forms_level_on_every_backend(diffusers_folders):
    """--eta means x_t = (1 - eta) x + eta noise everywhere: exactly on the Open-Sora family; on CogVideoX (DDIM) and
    Wan (a multistep flow solver) at the first sampling step corrupting no more, i.e. whose signal-to-noise ratio
    is at least (1 - eta) / eta, the step before it corrupting more. The coefficients are the scheduler's own:
    its add_noise at that step gives a x + b noise. (CogVideoX at eta 0.7 once started at 0.137 x + 0.991 noise.)"""
    import copy

    assert build_model("toy").aligned_level(0.7) == pytest.approx((0.3, 0.7))
    for name in ("cogvideox", "wan"):
        model = build_model(name, dit=diffusers_folders[name], size="32x32", frames=9)
        scheduler = copy.deepcopy(model.scheduler)
        scheduler.set_timesteps(50, device="cpu")
        a_all, b_all = model.levels(scheduler)
        for eta in (0.3, 0.5, 0.7, 0.9):
            i = model.start_index(scheduler, eta)
            a, b = model.aligned_level(eta, 50)
            assert (a, b) == (float(a_all[i]), float(b_all[i])) and 0 < i < 50, (name, eta)
            assert b / (a + b) <= eta + 1e-9 < b_all[i - 1] / (a_all[i - 1] + b_all[i - 1]), (name, eta)
            assert eta - b / (a + b) < 0.05, (name, eta)  # 50 steps: within one step of eta (CogVideoX 0.3: 0.258)
            t = scheduler.timesteps[i: i + 1]
            one, zero = torch.ones(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(i)
            assert float(scheduler.add_noise(one, zero, t).flatten()[0]) == pytest.approx(a, abs=1e-5)
            assert float(scheduler.add_noise(zero, one, t).flatten()[0]) == pytest.approx(b, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Through train.py

FAST = ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--sample-steps", "3", "--n", "3",
        "--batch-size", "2", "--lr", "1e-3", "--prompts", os.path.join(ROOT, "prompts/train.txt")]


def rows(out):
    import json

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f]


@pytest.mark.parametrize("method", ["dense", "structural"])
def test_dense_and_structural_runs_start_at_log_2_and_resume_exactly(tmp_path, method):
    from safetensors.torch import load_file

    train.main(FAST + ["--method", method, "--steps", "3", "--k", "2", "--out", str(tmp_path / "a")])
    train.main(FAST + ["--method", method, "--steps", "1", "--k", "2", "--out", str(tmp_path / "b")])
    train.main(FAST + ["--method", method, "--steps", "3", "--k", "2", "--out", str(tmp_path / "b"), "--resume"])
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert a == b and a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and a[0]["method"] == method
    if method == "structural":
        assert all(r["labelled"] == 1.0 for r in a)  # one label per video
    wa, wb = (load_file(os.path.join(tmp_path, x, "checkpoint-3", "model.safetensors")) for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_logged_metrics_are_means_over_labelled_segments_whatever_the_sample_batch(tmp_path):
    """The same dense run with --sample-batch 1 (a DPO call per prompt) and 2 (one call for both): the same pairs,
    noises and t, so the same losses; the logged loss, accuracy, margin and kl are means over the labelled
    segments, not over calls (per call, as before, they differed by about 1%: 1.3138 against 1.3024)."""
    got = {}
    for b in ("1", "2"):
        train.main(FAST + ["--method", "dense", "--steps", "2", "--k", "0", "--n", "4", "--frames", "8",
                           "--sample-batch", b, "--out", str(tmp_path / b)])
        got[b] = rows(tmp_path / b)
    for r1, r2 in zip(got["1"], got["2"]):
        for key in ("loss", "accuracy", "margin", "kl", "labelled"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key  # batched sums round: 1e-5


def test_each_pair_of_a_prompt_draws_its_own_noise_and_t():
    """DenseDPO with N > 2 makes several pairs of one prompt: each has its own DPO noise and t (from the prompt's
    counter and the pair's index); the first pair's stream is OnlineVPO's."""
    import run

    draws = [torch.randn(8, generator=run.dpo_generator(0, 5, i)) for i in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[0], torch.randn(8, generator=run.dpo_generator(0, 5)))
