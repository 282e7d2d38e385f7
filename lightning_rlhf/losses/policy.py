"""Losses and estimators of the policy-gradient stages (PPO, GRPO, RLOO, REINFORCE++), each variant an entry in a
small table chosen by name: KL estimators (``KL_ESTIMATORS``), group advantages (``GROUP_ESTIMATORS``), advantage
estimators (``ADVANTAGE_ESTIMATORS``), loss aggregations (``LOSS_AGGREGATIONS``); GAE, the clipped policy and value
losses (Schulman et al. 2017), InstructGPT's per-token reward and the adaptive KL coefficient (Ziegler et al. 2019).
Corrections for a sampler other than the trained policy are in ``off_policy``.

Shapes: ``b`` batch, ``t`` time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_rlhf.losses.tokens import masked_mean, masked_sum, masked_whiten


def _kl_k1(u: Tensor) -> Tensor:
    return -u


def _kl_k2(u: Tensor) -> Tensor:
    return 0.5 * u**2


def _kl_k3(u: Tensor) -> Tensor:
    return torch.expm1(u) - u


# Estimators of KL(π || π_ref) from samples of π (Schulman, "Approximating KL divergence", 2020).
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate, ``(b, t)``, with ``u = ref_logprobs - logprobs``: ``k1`` -u, ``k2`` u²/2, ``k3`` eᵘ-1-u.

    ``k1`` is the unbiased log-ratio InstructGPT's reward uses; ``k3`` is unbiased and never negative.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](ref_logprobs - logprobs)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the policy's tokens of each row.

    ``δ_t = r_t + γ V_{t'} - V_t``, ``A_t = δ_t + γλ A_{t'}``, ``returns = A + V``, where ``t'`` is the next token of
    the mask after ``t``: tokens outside it (an episode's environment and tool turns, padding) are no steps, and the
    discount passes over them, so the value at the end of one policy turn bootstraps from the start of the next.
    The value after the last real token is 0 (the episode ends there); both outputs are 0 outside the mask.

    Args:
        rewards, values: ``(b, t)`` per-token rewards and value estimates.
        mask: ``(b, t)`` the policy's tokens (a single response's: its tokens, right-padded).

    Returns:
        ``(advantages, returns)``, each ``(b, t)``.
    """
    mask = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        step = mask[:, t]
        advantages[:, t] = torch.where(step, advantage, 0.0)
        next_value = torch.where(step, values[:, t], next_value)  # carried over the tokens that are no steps
        next_advantage = torch.where(step, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    aggregation: str = "token_mean",
    max_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), negated to minimise: masked mean (or another ``aggregation``,
    see ``aggregate_loss``) of ``max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))`` with ``ρ = exp(logprobs - old_logprobs)``, all
    ``(b, t)``.

    Returns:
        The loss and statistics: ``clipfrac`` (share of tokens where the clipped term won) and ``approx_kl``
        (masked mean of ½(log ρ)², the old-to-new policy drift).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation, max_length)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ``½ · masked mean of max((V - R)², (clip(V, V_old ± c) - R)²)``, all ``(b, t)``.

    Returns:
        The loss and ``clipfrac``, the share of tokens where the clipped error was the larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).detach()}


def ppo_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token rewards of the InstructGPT objective, ``(b, t)``: ``-β · KL_t`` on every response token, plus the
    reward model's score ``r_θ(x, y)`` on the last one.

    Args:
        scores: ``(b,)`` reward model score of each whole response.
        kl: ``(b, t)`` per-token KL estimate to the reference (``kl_penalty``).
        mask: ``(b, t)`` the policy's tokens (a row's last one holds its score; an episode's may have gaps).
        kl_coef: β.
    """
    columns = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask.bool(), columns, 0).amax(-1)  # (b,) column of the last policy token
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    has_tokens = mask.sum(-1) > 0
    return rewards.scatter_add(1, last[:, None], (scores.to(kl.dtype) * has_tokens)[:, None])


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The next β of Ziegler et al. (2019)'s proportional controller, steering the measured KL towards ``target``:
    ``β · (1 + clip(KL / target - 1, -0.2, 0.2) · n_steps / horizon)``.

    Args:
        kl: measured KL(π || π_ref) per sequence (summed over its tokens), averaged over the batch.
        n_steps: sequences in the batch the KL was measured on.
        horizon: sequences over which a constant error of 20 % would change β by a factor e^0.2.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def _grpo(groups: Tensor, eps: float) -> Tensor:
    return (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)  # unbiased std


def _dr_grpo(groups: Tensor, eps: float) -> Tensor:
    return groups - groups.mean(-1, keepdim=True)


def _rloo(groups: Tensor, eps: float) -> Tensor:
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (groups.size(-1) - 1)
    return groups - others_mean


# Each maps ``(n_groups, G)`` sequence rewards to advantages.
GROUP_ESTIMATORS: dict[str, Callable[[Tensor, float], Tensor]] = {"grpo": _grpo, "dr_grpo": _dr_grpo, "rloo": _rloo}


def group_advantages(scores: Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-4) -> Tensor:
    """One advantage per response from the rewards of the ``group_size`` (G) responses sampled for its prompt.

    ``grpo``: ``(s - mean_g) / (std_g + eps)`` with the group's unbiased standard deviation; ``dr_grpo``:
    ``s - mean_g``; ``rloo``: ``s - mean of the other G - 1 scores of the group``. A group of equal scores gives
    zeros (no signal, and no NaN).

    Args:
        scores: ``(b,)`` with ``b = n_groups · G``, a prompt's G responses in consecutive rows.
        group_size: G >= 2.
        estimator: one of ``GROUP_ESTIMATORS``.

    Returns:
        ``(b,)`` advantages, in the rows of ``scores``.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {sorted(GROUP_ESTIMATORS)}")
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(
            f"group_size={group_size}: needs >= 2 responses per prompt, and {scores.numel()} scores "
            "must hold whole groups"
        )
    return GROUP_ESTIMATORS[estimator](scores.view(-1, group_size), eps).reshape(scores.shape)


def best_worst_pairs(scores: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Online DPO's pair of each group: its best-scored response chosen, its worst rejected (Guo et al. 2024).

    Equal best scores go to the first of them, equal worst to the first of those; a group whose scores are all equal
    makes no pair (nothing to prefer).

    Args:
        scores: ``(b,)`` with ``b = n_groups · G``, a prompt's G responses in consecutive rows.
        group_size: G >= 2.

    Returns:
        ``(chosen, rejected, paired)``: ``(p,)`` rows of ``scores`` of each pair's better and worse response, one pair
        per group with ``paired`` ``(n_groups,)`` true, in group order.
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(
            f"group_size={group_size}: a pair needs >= 2 responses per prompt, and {scores.numel()} scores "
            "must hold whole groups"
        )
    groups = scores.view(-1, group_size)
    paired = groups.amax(-1) > groups.amin(-1)
    offsets = torch.arange(len(groups), device=scores.device) * group_size
    chosen, rejected = groups.argmax(-1) + offsets, groups.argmin(-1) + offsets
    return chosen[paired], rejected[paired], paired


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + γ G_{t+1}`` over right-padded response tokens, ``(b, t)``: GAE with no values and λ = 1."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return returns


def reinforce_pp_advantages(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): InstructGPT's per-token rewards (``ppo_rewards``: ``-β · KL_t``, the score on the last
    token), discounted returns, whitened over all real tokens of the batch (padding neither counts nor gets any).

    Returns:
        ``(b, t)`` advantages, 0 past the mask.
    """
    return masked_whiten(discounted_returns(ppo_rewards(scores, kl, mask, kl_coef), mask, gamma), mask)


def _gae_estimator(
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    kl_coef: float,
    *,
    values: Tensor,
    gamma: float,
    lam: float,
    whiten: bool,
    **_,
) -> tuple[Tensor, Tensor | None]:
    advantages, returns = gae(ppo_rewards(scores, kl, mask, kl_coef), values, mask, gamma, lam)
    return (masked_whiten(advantages, mask) if whiten else advantages), returns


def _reinforce_pp_estimator(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, *, gamma: float, **_
) -> tuple[Tensor, Tensor | None]:
    return reinforce_pp_advantages(scores, kl, mask, kl_coef, gamma), None


def _group_estimator(name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """``GROUP_ESTIMATORS[name]`` of each response's reward ``score - β · Σ_t KL_t``, on every one of its tokens."""

    def estimator(
        scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, *, group_size: int, **_
    ) -> tuple[Tensor, Tensor | None]:
        rewards = scores - kl_coef * (kl * mask).sum(-1)  # (b,)
        return group_advantages(rewards, group_size, name)[:, None] * mask, None

    return estimator


# Each maps ``(scores (b,), kl (b, t), mask (b, t), kl_coef)`` and the keywords it uses of ``values``, ``gamma``,
# ``lam``, ``whiten``, ``group_size`` to ``(advantages (b, t), returns (b, t) or None)``. ``gae`` needs a value
# function, the others none.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    "gae": _gae_estimator,
    **{name: _group_estimator(name) for name in GROUP_ESTIMATORS},
    "reinforce_pp": _reinforce_pp_estimator,
}


def advantages_and_returns(
    estimator: str,
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    kl_coef: float,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    group_size: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Advantages ``(b, t)`` (0 past the mask) and, for ``gae``, its returns ``(b, t)`` (else ``None``), by the
    estimator named in ``ADVANTAGE_ESTIMATORS``.

    ``gae``: the InstructGPT reward per token, ``-β · KL_t`` plus the score on the last one (``ppo_rewards``), then
    GAE advantages and returns (``gae``), the advantages whitened over the real tokens when ``whiten``.
    ``reinforce_pp``: the same rewards, discounted returns whitened over the batch (``reinforce_pp_advantages``).
    ``grpo``, ``dr_grpo``, ``rloo``: each response's reward ``score - β · Σ_t KL_t`` against its group of
    ``group_size`` (``group_advantages``), on every one of its tokens.

    Args:
        scores: ``(b,)`` score of each whole response.
        kl: ``(b, t)`` per-token KL estimate to the reference (``kl_penalty``).
        mask: ``(b, t)`` real response tokens.
        kl_coef: β.
        values: ``(b, t)`` value estimates (``gae`` only).
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator={estimator!r} is not one of {list(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[estimator](
        scores, kl, mask, kl_coef, values=values, gamma=gamma, lam=lam, whiten=whiten, group_size=group_size
    )


def _token_mean(losses: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    return masked_mean(losses, mask)


def _seq_mean_token_sum(losses: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    if max_length is None:
        raise ValueError("seq_mean_token_sum divides each response's token sum by a constant max_length: give one")
    return (masked_sum(losses, mask, dim=-1) / max_length).mean()


def _seq_mean_token_mean(losses: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    return masked_mean(losses, mask, dim=-1).mean()


# ``token_mean``: every token of the batch weighs the same (long responses weigh more); ``seq_mean_token_sum``:
# Dr. GRPO's length-unbiased form, token sums over a constant length; ``seq_mean_token_mean``: GRPO's paper form,
# every response weighs the same whatever its length.
LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "seq_mean_token_mean": _seq_mean_token_mean,
}


def aggregate_loss(
    losses: Tensor, mask: Tensor, aggregation: str = "token_mean", max_length: int | None = None
) -> Tensor:
    """One scalar from ``(b, t)`` per-token ``losses`` over the real tokens of ``mask``.

    ``token_mean``: Σ loss / Σ tokens; ``seq_mean_token_sum``: mean over responses of Σ_t loss_t / ``max_length``;
    ``seq_mean_token_mean``: mean over responses of their own token mean.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation={aggregation!r} is not one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[aggregation](losses, mask, max_length)
