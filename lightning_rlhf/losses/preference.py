"""Losses on preferences: the reward model's ranking loss over K ranked responses (InstructGPT, Ouyang et al.
2022, eq. 1) and the DPO family (Rafailov et al. 2023), each DPO variant an entry of ``DPO_LOSSES``.

Shapes: ``b`` batch, ``k`` responses per prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlhf.losses.tokens import masked_mean, masked_sum


def ranking_loss(rewards: Tensor, ranks: Tensor, margin: float = 0.0, center_coef: float = 0.0) -> Tensor:
    """InstructGPT reward-model loss over K ranked responses per prompt (Ouyang et al. 2022, eq. 1).

    ``loss = mean_prompts[ -1/|P| * sum_{(w, l) in P} log σ(r_w - r_l - margin) ] + center_coef * mean(r²)``
    where ``P`` holds the ordered pairs of a prompt with ``rank_w < rank_l`` (rank 0 is best). Equal ranks are
    ties and make no pair; a negative rank marks an absent response (padding for a smaller K). With K = 2 this
    is the pairwise ``-log σ(r_chosen - r_rejected)``; with all K ranked distinctly ``|P| = C(K, 2)``.

    Args:
        rewards: ``(b, k)`` scalar rewards, each response scored once.
        ranks: ``(b, k)`` integer ranks.
        margin: required reward gap between the better and the worse response.
        center_coef: weight of the reward-centering term (Eisenstein et al. 2023) over present responses.

    Returns:
        Scalar loss. Prompts without any ordered pair are left out of the mean.
    """
    present = ranks >= 0
    # better[b, i, j]: response i is ranked strictly above response j, both present.
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    pair_losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :] - margin)  # (b, k, k)
    pairs_per_prompt = better.sum(dim=(1, 2))
    per_prompt = masked_sum(pair_losses, better, dim=(1, 2)) / pairs_per_prompt.clamp(min=1)
    loss = masked_mean(per_prompt, pairs_per_prompt > 0)
    if center_coef:
        loss = loss + center_coef * masked_mean(rewards**2, present)
    return loss


def _dpo_sigmoid(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); label_smoothing > 0 is conservative DPO (cDPO).
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _dpo_hinge(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # SLiC-style hinge (Zhao et al. 2023) on the DPO log-ratio.
    return torch.relu(1 - beta * logits)


def _dpo_ipo(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17), beta playing the role of tau; pass per-token averaged log-probs.
    return (logits - 1 / (2 * beta)) ** 2


def _dpo_robust(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # Robust DPO (Chowdhury et al. 2024, eq. 6): unbiased under label-flip rate epsilon = label_smoothing.
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses, per example.

    With ``d = (π_c - ref_c) - (π_r - ref_r)`` (sequence log-probs):
    ``sigmoid`` -log σ(βd); ``hinge`` relu(1 - βd); ``ipo`` (d - 1/(2β))²;
    ``robust`` [-(1-ε) log σ(βd) + ε log σ(-βd)] / (1 - 2ε).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(b,)``.
        beta: strength of the implicit KL constraint to the reference.
        loss_type: one of ``DPO_LOSSES``.
        label_smoothing: assumed rate ε of flipped labels (``sigmoid``: cDPO, ``robust``: rDPO).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(b,)``; the implicit rewards are
        ``beta * (policy_logps - ref_logps)``, detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {sorted(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
