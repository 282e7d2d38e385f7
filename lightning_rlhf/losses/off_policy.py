"""Corrections for responses sampled by a policy other than the one being trained: the engine's slightly different
numerics (truncated importance weights, a table of levels ``ENGINE_IS_LEVELS``) and rollouts some policy versions
old (AReaL's decoupled PPO objective, built on the same weights).

Shapes: ``b`` batch, ``t`` time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_rlhf.losses.policy import ppo_policy_loss
from lightning_rlhf.losses.tokens import masked_mean, masked_sum


def _is_token(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return log_ratio


def _is_sequence(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(log_ratio, mask, dim=-1)[:, None].expand_as(log_ratio)


ENGINE_IS_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"token": _is_token, "sequence": _is_sequence}


def _log_weights(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, level: str) -> Tensor:
    """``(b, t)`` untruncated log importance weights of ``level``, detached (any value past the mask)."""
    if level not in ENGINE_IS_LEVELS:
        raise ValueError(f"engine_is_correction={level!r} is not one of {['none', *ENGINE_IS_LEVELS]}")
    log_ratio = (logprobs - engine_logprobs).detach().float().masked_fill(~mask.bool(), 0.0)
    return ENGINE_IS_LEVELS[level](log_ratio, mask)


def _truncated(log_weights: Tensor, mask: Tensor, cap: float) -> Tensor:
    return torch.exp(log_weights.clamp(max=math.log(cap))) * mask  # clamp in log space: no overflow on long sequences


def engine_importance_weights(
    logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, level: str = "token", cap: float = 2.0
) -> Tensor:
    """Truncated importance weights that correct for sampling with an engine whose distribution differs slightly
    from the trainer's (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
    TRL's ``vllm_importance_sampling_correction``, verl's TIS). All ``(b, t)``; with ``δ_t = logprobs_t -
    engine_logprobs_t`` (trainer minus engine, of the sampled token):

    - ``token``: ``w_t = min(exp(δ_t), C)``;
    - ``sequence``: ``w_t = min(exp(Σ_s mask_s δ_s), C)``, one weight for every token of a response.

    Weights are 0 past the mask and carry no gradient; multiplying the (non-negative-weighted) advantages by them
    multiplies the clipped surrogate's per-token term by them, as the references weight the per-token loss.
    """
    return _truncated(_log_weights(logprobs, engine_logprobs, mask, level), mask, cap)


def decoupled_ppo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    cap: float = 2.0,
    level: str = "token",
    aggregation: str = "token_mean",
    max_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AReaL's decoupled PPO objective (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning
    System"), negated to minimise, for responses sampled by a behaviour policy π_behav (an engine, perhaps
    some policy versions behind) that is not the proximal policy π_prox the update is kept close to (the trainer's
    own log-probs at the start of the update). Per token, ``ρ = π_θ / π_prox`` is clipped as in ``ppo_policy_loss``
    and the term is weighted by ``w = min(π_prox / π_behav, C)`` (``engine_importance_weights``: per ``token``, or
    per ``sequence``), a constant to the gradient::

        loss_t = w_t · max(-A_t · ρ_t, -A_t · clip(ρ_t, 1 - ε, 1 + ε))

    aggregated over the real tokens by ``aggregation`` (``aggregate_loss``). The weight is truncated at C, as TIS
    does (AReaL's code instead drops the tokens whose weight exceeds its cap). With ``behaviour_logprobs ==
    proximal_logprobs`` and C >= 1 every weight is exactly 1 and this is ``ppo_policy_loss`` of the same tensors:
    synchronous rollouts from the trainer's own ``generate``. Clipping against π_prox rather than π_behav keeps each
    update's step bounded however stale the rollout, while the weight corrects for the staleness itself.

    Args:
        logprobs: ``(b, t)`` log-probs of the sampled tokens under the policy being trained, π_θ (with gradient).
        proximal_logprobs: ``(b, t)`` the same under π_prox: the denominator of the clipped ratio.
        behaviour_logprobs: ``(b, t)`` the same under π_behav, the policy that sampled them.
        advantages: ``(b, t)``.
        mask: ``(b, t)`` real response tokens.
        clip_range: ε.
        cap: C > 0, the largest weight.
        level: an entry of ``ENGINE_IS_LEVELS``.

    Returns:
        The loss and statistics: ``ppo_policy_loss``'s ``clipfrac`` and ``approx_kl`` (both against π_prox),
        ``is_weight_mean`` (masked mean of w) and ``is_clipped`` (share of tokens whose weight was truncated).
    """
    log_weights = _log_weights(proximal_logprobs, behaviour_logprobs, mask, level)
    weights = _truncated(log_weights, mask, cap)
    # w >= 0 scales both terms of the max alike, so weighting the advantages weights the per-token loss.
    loss, stats = ppo_policy_loss(
        logprobs, proximal_logprobs, advantages * weights, mask, clip_range, aggregation, max_length
    )
    stats["is_weight_mean"] = masked_mean(weights, mask)
    stats["is_clipped"] = masked_mean((log_weights > math.log(cap)).float(), mask)
    return loss, stats
