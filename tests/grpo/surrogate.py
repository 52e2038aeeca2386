"""The GRPO objective's gradient at ratio 1, written from the method's definition (not from grpo.losses).

On-policy every ratio is 1 and inside its clip range, so the PPO-clip objective's gradient is the
plain policy gradient of one trajectory-weighted mean (method-facts.md: one advantage per trajectory,
shared by its text tokens and every trained image step; text weight w = K for RT2I, 1 for SRR):

    grad L = grad mean_b  -A_b * ( sum_k logp_bk  +  w * mean_t logp_bt ) / (K + w)

with logp_bk the trained steps' mean-over-elements log-probs and mean_t over the plan's tokens
(sequence-level ratio: exp of the mean token log-ratio). No text (no plan): w = 0.
"""
import torch


def policy_gradient_surrogate(*, image_logp, text_logp, text_mask, adv, mode: str) -> torch.Tensor:
    """image_logp (K, B); text_logp, text_mask (B, T) or None; adv (B,). Its gradient, not its value, is
    the objective's."""
    K = image_logp.shape[0]
    per_traj = image_logp.sum(0)
    w = 0.0
    if text_logp is not None:
        w = float(K) if mode == "rt2i" else 1.0
        mask = text_mask.float()
        per_traj = per_traj + w * (text_logp * mask).sum(1) / mask.sum(1)
    return (-adv * per_traj / (K + w)).mean()


def flat_grads(grads, params) -> torch.Tensor:
    """torch.autograd.grad(..., allow_unused=True) results as one vector (an unused parameter: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
