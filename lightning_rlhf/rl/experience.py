"""The experience PPO learns from a rollout: InstructGPT's per-token reward (−β·KL per token, the score on the last)
with GAE, or a critic-free estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++), whitened where the estimator says so.
With ``num_generations`` G a rollout holds each prompt's G responses in consecutive rows (a group), and minibatches
take whole groups (``group_minibatches``). The engine's log-probs, when it has its own, give the importance weights
that correct for the engine sampling from a slightly different distribution than the trainer computes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_rlhf.losses.off_policy import engine_importance_weights
from lightning_rlhf.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    LOSS_AGGREGATIONS,
    advantages_and_returns,
    kl_penalty,
)
from lightning_rlhf.losses.tokens import masked_mean
from lightning_rlhf.rl.generation import Rollout


def check_critic_free_args(estimator: str, num_generations: int, loss_aggregation: str, value_head: bool) -> None:
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator={estimator!r} is not one of {list(ADVANTAGE_ESTIMATORS)}")
    if num_generations < 1 or (estimator in GROUP_ESTIMATORS and num_generations < 2):
        raise ValueError(
            f"num_generations={num_generations}: advantage_estimator={estimator!r} needs "
            f"{'>= 2 responses per prompt to compare' if estimator != 'gae' else '>= 1'}"
        )
    if loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation={loss_aggregation!r} is not one of {sorted(LOSS_AGGREGATIONS)}")
    if value_head and estimator != "gae":
        raise ValueError(f"value_head=True: advantage_estimator={estimator!r} has no value function")


class Experience(NamedTuple):
    """What one PPO rollout hands to its updates.

    Attributes:
        rollout: the sampled sequences and their masks.
        logprobs: ``(b, r)`` log-probs of the response tokens under the trainer's policy before this rollout's
            updates (the proximal policy; the sampler's own are ``rollout.logprobs``).
        values: ``(b, r)`` value of the state before each response token (``None`` without a value function).
        advantages: ``(b, r)`` advantages of the chosen estimator, 0 past the mask.
        returns: ``(b, r)`` value targets, ``advantages + values`` before whitening (``None`` without GAE).
        scores: ``(b,)`` reward of each whole response (after any missing-EOS penalty).
        kl: ``(b,)`` per-token KL estimate to the reference, summed over the response.
        ended: ``(b,)`` responses that ended with EOS (episodes: that their environment ended, not a limit).
        ref_logprobs: ``(b, r)`` log-probs of the response tokens under the reference (for a KL loss term).
        reward_parts: ``(b,)`` score of each reward function, by name, before weighting (``reward_fns``).
    """

    rollout: Rollout
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    kl: Tensor
    ended: Tensor
    ref_logprobs: Tensor | None = None
    reward_parts: dict[str, Tensor] | None = None

    @property
    def mask(self) -> Tensor:
        return self.rollout.response_mask

    @property
    def empty(self) -> Tensor:
        """``(b,)`` responses that are the end-of-turn token alone (the empty response): a policy drifting there is
        worth seeing, since a reward model that rarely saw one may score it anything."""
        return self.ended & (self.mask.sum(-1) == 1)


def build_experience(
    rollout: Rollout,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor | None,
    scores: Tensor,
    eos_token_id: int,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    missing_eos_penalty: float | None = None,
    estimator: str | None = "gae",
    group_size: int = 1,
    kl_in_reward: bool = True,
) -> Experience:
    """Where the advantage is computed; all ``(b, r)`` tensors are over the rollout's responses.

    ``estimator`` names an entry of ``losses.ADVANTAGE_ESTIMATORS`` (``losses.advantages_and_returns``): ``gae``
    (the InstructGPT reward per token, then GAE; whitened when ``whiten_advantages``), ``reinforce_pp``, or the
    group-relative ``grpo``, ``dr_grpo``, ``rloo`` over groups of ``group_size``. ``kl_in_reward=False`` leaves the
    KL out of the reward (β = 0 there; e.g. GRPO's KL loss term instead). ``None``: no advantages (zeros) and no
    returns, for an objective that learns from the scores themselves (online DPO).
    """
    mask = rollout.response_mask
    ended = ((rollout.responses == eos_token_id) & mask).any(-1)
    if rollout.episodes is not None:  # an episode ends when its environment says so, not at its first turn's EOS
        ended = ~rollout.episodes.truncated
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    reward_kl_coef = kl_coef if kl_in_reward else 0.0
    advantages, returns = torch.zeros_like(kl), None
    if estimator is not None:
        advantages, returns = advantages_and_returns(
            estimator, scores, kl, mask, reward_kl_coef, values, gamma, lam, whiten_advantages, group_size
        )
    kl_sums = (kl * mask).sum(-1)
    return Experience(rollout, logprobs, values, advantages, returns, scores, kl_sums, ended, ref_logprobs)


def group_minibatches(group_order: Tensor, group_size: int, num_mini_batches: int) -> list[Tensor]:
    """Row indices of each minibatch: ``group_order`` (a permutation of the rollout's groups) cut into
    exactly ``num_mini_batches`` near-even chunks (10 groups in 4: 3, 3, 2, 2), each group's ``group_size``
    consecutive rows kept together. With ``group_size`` 1 a group is a row."""
    offsets = torch.arange(group_size, device=group_order.device)
    return [(chunk[:, None] * group_size + offsets).flatten() for chunk in group_order.tensor_split(num_mini_batches)]


def group_statistics(scores: Tensor, group_size: int) -> dict[str, Tensor]:
    """``reward_std``: the mean over groups of their scores' unbiased standard deviation; ``groups_without_signal``:
    the share of groups whose scores are all equal (a group-relative advantage is 0 for all of them)."""
    groups = scores.view(-1, group_size)
    return {
        "reward_std": groups.std(-1).mean(),
        "groups_without_signal": (groups == groups[:, :1]).all(-1).float().mean(),
    }


def engine_mismatch(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``logprob_diff_mean`` and ``logprob_diff_max``: the mean and the largest ``|logprobs - engine_logprobs|`` over
    the response tokens of ``mask``, all ``(b, r)``: how far the engine that sampled is from the trainer's policy."""
    diff = (logprobs - engine_logprobs).abs().masked_fill(~mask.bool(), 0.0)
    return {"logprob_diff_mean": masked_mean(diff, mask), "logprob_diff_max": diff.max()}


def correct_for_engine(experience: Experience, level: str, cap: float) -> Experience:
    """Advantages weighted by truncated importance ratios of the policy to the engine that sampled
    (``losses.engine_importance_weights``; ``level`` ``none``: as they are). A weight ``w >= 0`` scales both terms of
    the clipped surrogate alike, so this weights each token's policy loss, as TRL and verl do. With the updates'
    ratio taken against ``experience.logprobs`` (the trainer's, before the updates: the proximal policy) and
    ``rollout.logprobs`` the engine's (the behaviour policy, however many versions old), the updates minimise
    ``losses.decoupled_ppo_loss`` (AReaL's decoupled objective; tested in ``test_engines.py``)."""
    if level == "none":
        return experience
    rollout = experience.rollout
    weights = engine_importance_weights(experience.logprobs, rollout.logprobs, rollout.response_mask, level, cap)
    return experience._replace(advantages=experience.advantages * weights)
