"""Losses on preferences: the reward model's ranking loss over K ranked responses (InstructGPT, Ouyang et al.
2022, eq. 1), the DPO family (Rafailov et al. 2023), each DPO variant an entry of ``DPO_LOSSES``, the
reference-free SimPO and ORPO among them, and KTO on unpaired feedback (Ethayarajh et al. 2024).

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


# Each entry maps (chosen, rejected, beta, label_smoothing, gamma) to per-example losses. ``chosen`` / ``rejected``
# are the log-ratios policy - reference for the reference-based types, the policy's own (per-token averaged)
# log-probs for the ``REFERENCE_FREE`` ones.


def _dpo_sigmoid(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); label_smoothing > 0 is conservative DPO (cDPO).
    logits = beta * (chosen - rejected)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _dpo_hinge(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # SLiC-style hinge (Zhao et al. 2023) on the DPO log-ratio.
    return torch.relu(1 - beta * (chosen - rejected))


def _dpo_ipo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17), beta playing the role of tau; pass per-token averaged log-probs.
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def _dpo_robust(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # Robust DPO (Chowdhury et al. 2024, eq. 6): unbiased under label-flip rate epsilon = label_smoothing.
    eps, logits = label_smoothing, beta * (chosen - rejected)
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def _simpo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # SimPO (Meng et al. 2024, eq. 6): the length-normalised log-prob is the reward, gamma a target margin; no
    # reference. label_smoothing as in cDPO.
    logits = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def log_odds(avg_logps: Tensor) -> Tensor:
    """``log(p / (1 - p))`` from ``log p < 0`` (per-token averaged): ``log p - log(-expm1(log p))``, exact near
    ``p = 1`` where ``log(1 - exp(log p))`` would round ``1 - p`` to 0."""
    avg_logps = avg_logps.clamp(max=-1e-7)  # p = 1 exactly would make the odds infinite
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def _orpo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    # ORPO (Hong et al. 2024, eq. 6-7): the chosen response's per-token NLL plus beta (their lambda) times the
    # odds-ratio loss -log σ(log odds_w - log odds_l); no reference.
    return -chosen - beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))


DPO_LOSSES: dict[str, Callable[[Tensor, Tensor, float, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
    "simpo": _simpo,
    "orpo": _orpo,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})
"""Loss types on the policy's log-probs alone: no reference model is needed."""
LENGTH_NORMALISED = frozenset({"ipo", "simpo", "orpo"})
"""Loss types stated on log-probs averaged over each response's tokens (the caller divides by the token count)."""


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses, per example.

    With ``d = (π_c - ref_c) - (π_r - ref_r)`` (sequence log-probs):
    ``sigmoid`` -log σ(βd); ``hinge`` relu(1 - βd); ``ipo`` (d - 1/(2β))²;
    ``robust`` [-(1-ε) log σ(βd) + ε log σ(-βd)] / (1 - 2ε).
    Reference-free (``REFERENCE_FREE``; the ref arguments are ignored and may be ``None``), on per-token averaged
    log-probs ``π``: ``simpo`` -log σ(β(π_c - π_r) - γ) (Meng et al. 2024); ``orpo`` -π_c - β log σ(lo_c - lo_r)
    with ``lo = π - log(1 - e^π)`` the log odds (Hong et al. 2024, β their λ).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(b,)``; averaged per
            response token for the ``LENGTH_NORMALISED`` types.
        beta: strength of the implicit KL constraint to the reference (SimPO: the reward scale; ORPO: λ).
        loss_type: one of ``DPO_LOSSES``.
        label_smoothing: assumed rate ε of flipped labels (``sigmoid``, ``simpo``: cDPO, ``robust``: rDPO).
        simpo_gamma: SimPO's target reward margin γ.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(b,)``; the implicit rewards are
        ``beta * (policy_logps - ref_logps)``, for the reference-free types ``beta * policy_logps``, detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {sorted(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5)")
    if loss_type in REFERENCE_FREE:
        chosen, rejected = policy_chosen_logps, policy_rejected_logps
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs (only {sorted(REFERENCE_FREE)} don't)")
    else:
        chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen, rejected, beta, label_smoothing, simpo_gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_reference_point(
    policy_logps: Tensor, ref_logps: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """KTO's reference point ``z_0 = max(0, mean(log π(y'|x) - log π_ref(y'|x)))`` (Ethayarajh et al. 2024, §4.1):
    an estimate of ``KL(π ‖ π_ref)`` from completions ``y'`` of *other* prompts paired with each prompt ``x``, so it
    says how far the policy has moved overall rather than on the batch's own completions. Detached: no gradient
    passes through it, as in the paper.

    Args:
        policy_logps, ref_logps: ``(m,)`` summed log-probs of the mismatched completions.
        reduce: averages the batch's mean over processes (e.g. a strategy's all-reduce) before the clamp.
    """
    mean = (policy_logps - ref_logps).detach().mean()
    return (reduce(mean) if reduce else mean).clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Kahneman–Tversky optimisation on unpaired feedback (Ethayarajh et al. 2024, eq. 8), per completion.

    With ``r = log π(y|x) - log π_ref(y|x)`` and ``z_0`` the reference point (``kto_reference_point``):
    ``loss = λ_D (1 - σ(β(r - z_0)))`` for a desirable completion, ``λ_U (1 - σ(β(z_0 - r)))`` for an undesirable
    one, i.e. ``λ_y - v(x, y)``. The paper advises ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]`` for ``n_D`` desirable and
    ``n_U`` undesirable examples.

    Args:
        policy_logps, ref_logps: ``(n,)`` summed log-probs of each completion.
        desirable: ``(n,)`` bool (or 0/1): the completion is desirable.
        reference_point: ``z_0``, a scalar.
        beta: the value function's steepness, as DPO's β.
        desirable_weight, undesirable_weight: ``λ_D`` and ``λ_U``.

    Returns:
        ``(losses, rewards)``, each ``(n,)``; the implicit rewards ``β r`` are detached.
    """
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}: both > 0")
    desirable = desirable.bool()
    log_ratios = policy_logps - ref_logps
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratios.dtype)
    signed = torch.where(desirable, log_ratios - reference_point, reference_point - log_ratios)
    return weights * (1 - torch.sigmoid(beta * signed)), beta * log_ratios.detach()
