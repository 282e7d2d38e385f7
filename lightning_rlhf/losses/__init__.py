"""Pure tensor functions for the RLHF objectives: no Lightning, no models.

Shapes: ``b`` batch, ``t`` time, ``v`` vocabulary, ``k`` responses per prompt. Every function is pinned by
hand-computed values in ``tests/test_losses.py`` and its siblings. Four files, one import path:

- ``tokens``: log-probs of tokens and masked reductions;
- ``preference``: the reward model's ranking loss, the DPO family (a table of loss types) and KTO;
- ``policy``: PPO's clipped losses, KL estimators, GAE, group advantages and online DPO's pairs, advantage
  estimators and loss aggregations (each a table of pure functions chosen by name);
- ``off_policy``: corrections for a sampler other than the trained policy: the engine's truncated importance weights
  (a table of levels) and AReaL's decoupled PPO loss for rollouts some policy versions old.
"""

from lightning_rlhf.losses.off_policy import ENGINE_IS_LEVELS, decoupled_ppo_loss, engine_importance_weights
from lightning_rlhf.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    adaptive_kl_coef,
    advantages_and_returns,
    aggregate_loss,
    best_worst_pairs,
    discounted_returns,
    gae,
    group_advantages,
    kl_penalty,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    reinforce_pp_advantages,
)
from lightning_rlhf.losses.preference import (
    DPO_LOSSES,
    LENGTH_NORMALISED,
    REFERENCE_FREE,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    ranking_loss,
)
from lightning_rlhf.losses.tokens import (
    IGNORE_INDEX,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DPO_LOSSES",
    "ENGINE_IS_LEVELS",
    "GROUP_ESTIMATORS",
    "IGNORE_INDEX",
    "KL_ESTIMATORS",
    "LENGTH_NORMALISED",
    "LOSS_AGGREGATIONS",
    "REFERENCE_FREE",
    "adaptive_kl_coef",
    "advantages_and_returns",
    "aggregate_loss",
    "best_worst_pairs",
    "decoupled_ppo_loss",
    "discounted_returns",
    "dpo_loss",
    "engine_importance_weights",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_rewards",
    "ppo_value_loss",
    "ranking_loss",
    "reinforce_pp_advantages",
    "token_logprobs",
]
