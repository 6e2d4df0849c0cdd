"""The preference part of OnlineVPO: pair selection, the Diffusion-DPO loss, the curriculum reference update."""
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


def diffusion_dpo_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Paper Eq. 3 in the Diffusion-DPO form (Wallace et al.), per-sample denoising errors in, fp32:
        loss = -log sigmoid(-beta/2 * ((e_pol_w - e_ref_w) - (e_pol_l - e_ref_l))), mean over pairs.
    The policy gains when it lowers its error on the winner, relative to the reference, more than on the loser.
    beta is used exactly as written: no other constant is folded into it."""
    w_diff = policy_err_w.float() - ref_err_w.float()
    l_diff = policy_err_l.float() - ref_err_l.float()
    logits = -0.5 * beta * (w_diff - l_diff)
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "loss": loss.item(),
        # implicit reward prefers the winner; an exact tie (policy == reference) counts as a coin flip
        "accuracy": ((logits > 0).float() + 0.5 * (logits == 0).float()).mean().item(),
        "margin": logits.mean().item(),
        "kl": 0.5 * (w_diff + l_diff).mean().item(),  # how far the policy moved from the reference
    }
    return loss, metrics


@torch.no_grad()
def update_reference(ref: nn.Module, policy: nn.Module):
    """Curriculum update (Alg. 1, every K steps): G_ref <- G_theta, an exact copy of weights and buffers.
    The reference may be stored in a lower precision; it then holds the policy rounded to that dtype."""
    ref.load_state_dict(policy.state_dict())
