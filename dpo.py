"""The preference part of OnlineVPO and DenseDPO: pair selection (per video or per segment), the Diffusion-DPO loss
(per video or per segment), the curriculum reference update."""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def select_pair(scores: torch.Tensor, min_gap: float = 0.0) -> tuple[int, int] | None:
    """Alg. 1 line 6: winner = argmax, loser = argmin of the N rewards of one prompt.
    None when the rewards are tied (all equal, or best - worst <= min_gap): no preference, no pair."""
    scores = scores.float()
    w, l = int(scores.argmax()), int(scores.argmin())
    if w == l or float(scores[w] - scores[l]) <= min_gap:
        return None
    return w, l


class Pair(NamedTuple):
    """One preference pair for the DPO step: candidates a and b of one prompt (their clean latents) and, per
    segment, who won it: labels[s] = +1 a, -1 b, 0 a tie (masked out of the loss). A video-level pair (OnlineVPO,
    StructuralDPO) has one segment and a is its winner: labels = [1]."""
    counter: int  # the prompt's counter: the pair's DPO noise and t are drawn from it
    prompt: str
    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor
    index: int = 0  # which of its prompt's pairs (DenseDPO with N > 2 makes several): each draws its own noise and t


def video_pair(counter: int, prompt: str, winner: torch.Tensor, loser: torch.Tensor) -> Pair:
    return Pair(counter, prompt, winner, loser, torch.ones(1))


def diffusion_dpo_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Paper Eq. 3 in the Diffusion-DPO form (Wallace et al.), per-sample denoising errors in, fp32:
        loss = -log sigmoid(-beta/2 * ((e_pol_w - e_ref_w) - (e_pol_l - e_ref_l))), mean over pairs.
    The policy gains when it lowers its error on the winner, relative to the reference, more than on the loser.
    beta is used exactly as written: no other constant is folded into it. It is segment_dpo_loss with one segment
    that the winner won."""
    one = lambda e: e[:, None]
    return segment_dpo_loss(one(policy_err_w), one(policy_err_l), one(ref_err_w), one(ref_err_l),
                            torch.ones(len(policy_err_w), 1), beta)


# ----------------------------------------------------------------------------------------------------------
# DenseDPO (Wu et al. 2025): preferences per short segment of aligned candidates


def segments(spans: list[tuple[int, int]], frames_per_segment: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Cut a video into segments of about `frames_per_segment` frames, along its latent frames.
    `spans[j]` = the pixel frames latent frame j encodes (each VAE's own arithmetic: model.latent_spans).
    A latent frame belongs to the segment holding its middle frame, and a segment's pixel frames are those its
    latent frames encode, so the reward judges exactly the frames whose latents the loss sees. A tail shorter than
    half a segment joins the segment before it (too short to judge on its own). Returns, per segment,
    ((first frame, end frame), (first latent frame, end latent frame))."""
    groups: dict[int, list[int]] = {}
    for j, (lo, hi) in enumerate(spans):
        groups.setdefault((lo + hi - 1) // 2 // frames_per_segment, []).append(j)
    cut = [g for _, g in sorted(groups.items())]
    if len(cut) > 1 and spans[cut[-1][-1]][1] - spans[cut[-1][0]][0] < frames_per_segment / 2:
        tail = cut.pop()
        cut[-1] += tail
    return [((spans[g[0]][0], spans[g[-1]][1]), (g[0], g[-1] + 1)) for g in cut]


def segment_pairs(scores: torch.Tensor, min_gap: float = 0.0) -> list[tuple[int, int, torch.Tensor]]:
    """Per segment, the winner is the best candidate for that segment and the loser the worst (scores (N, S));
    a segment whose best - worst <= min_gap is a tie, masked. Segments judged on the same two candidates share one
    pair: returns (a, b, labels) per pair of candidates, labels (S,) +1 where a won, -1 where b won, 0 elsewhere;
    a is the winner of the pair's first labelled segment. With one segment this is select_pair."""
    scores = scores.float()
    pairs: dict[frozenset, tuple[int, int, torch.Tensor]] = {}
    for s in range(scores.shape[1]):
        pair = select_pair(scores[:, s], min_gap)
        if pair is None:
            continue
        w, l = pair
        a, b, labels = pairs.setdefault(frozenset(pair), (w, l, torch.zeros(scores.shape[1])))
        labels[s] = 1.0 if w == a else -1.0
    return list(pairs.values())


def keep_labels(pairs: list, fraction: float, generator: torch.Generator) -> list:
    """DenseDPO's data-efficiency setting (dense with a third of the labels): each labelled pair is kept with
    probability `fraction`, the rest dropped as if never labelled. fraction = 1 keeps all and draws nothing."""
    if fraction >= 1:
        return pairs
    keep = torch.rand(len(pairs), generator=generator) < fraction
    return [p for p, k in zip(pairs, keep) if k]


def segment_dpo_loss(policy_err_a: torch.Tensor, policy_err_b: torch.Tensor, ref_err_a: torch.Tensor,
                     ref_err_b: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DenseDPO's segment form of Eq. 3: errors (P, S), each the mean over one segment's latent frames; one logit
    per labelled segment with winner and loser set by that segment's label (+1: a won, -1: b won, 0: tie, masked);
    the loss is the mean over the labelled segments. With one segment and a the winner it is Eq. 3 exactly (the
    label multiplies by +-1, which rounds nothing): diffusion_dpo_loss."""
    a_diff = policy_err_a.float() - ref_err_a.float()
    b_diff = policy_err_b.float() - ref_err_b.float()
    logits = labels.to(a_diff) * (-0.5 * beta * (a_diff - b_diff))
    labelled = labels != 0
    logits, a_diff, b_diff = logits[labelled], a_diff[labelled], b_diff[labelled]
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "loss": loss.item(),
        # implicit reward prefers the winner; an exact tie (policy == reference) counts as a coin flip
        "accuracy": ((logits > 0).float() + 0.5 * (logits == 0).float()).mean().item(),
        "margin": logits.mean().item(),
        "kl": 0.5 * (a_diff + b_diff).mean().item(),  # how far the policy moved from the reference
    }
    return loss, metrics


@torch.no_grad()
def update_reference(ref: nn.Module, policy: nn.Module):
    """Curriculum update (Alg. 1, every K steps): G_ref <- G_theta, an exact copy of weights and buffers.
    The reference may be stored in a lower precision; it then holds the policy rounded to that dtype."""
    ref.load_state_dict(policy.state_dict())
