"""The PPO updates of one rollout: ``ppo_epochs`` passes over its experience in ``num_mini_batches`` shuffled
minibatches of whole groups, one optimiser step each (Schulman et al. 2017; InstructGPT, Ouyang et al. 2022).

Each minibatch's loss is its ``objective``, an entry of ``OBJECTIVES`` (+ ``ptx_coef`` · PPO-ptx's language-model
loss on the minibatch's pretraining text):

- ``clipped``: the clipped surrogate + ``vf_coef`` · clipped value loss (+ ``kl_loss_coef`` · GRPO's k3 KL to the
  reference on the policy, Shao et al. 2024);
- ``dpo``: online DPO (Guo et al. 2024): each group's best- and worst-scored responses are a pair
  (``losses.best_worst_pairs``), and ``losses.dpo_loss`` of the policy's sequence log-probs against the frozen
  reference's, ``dpo_beta`` its β; groups scored all alike make no pair.

Under manual optimisation ``trainer.global_step`` counts these steps: ``max_steps = rollouts · ppo_epochs ·
num_mini_batches``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.losses.off_policy import decoupled_ppo_loss
from lightning_rlhf.losses.policy import (
    aggregate_loss,
    best_worst_pairs,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)
from lightning_rlhf.losses.preference import DPO_LOSSES, LENGTH_NORMALISED, dpo_loss
from lightning_rlhf.losses.tokens import masked_mean, masked_sum
from lightning_rlhf.models.causal_lm import forward_logits, shifted_logprobs
from lightning_rlhf.rl.experience import Experience, group_minibatches
from lightning_rlhf.rl.rollouts import PolicyForward

IS_STATISTICS = ("is_weight_mean", "is_clipped")  # the decoupled loss's importance weights, logged as policy/*


@dataclass(frozen=True)
class PPOUpdates:
    """The updates of one rollout, tensors in, tensors out: PPOModule's arguments of the same names.

    Attributes:
        clip_range: ε of the clipped surrogate.
        clip_range_value: how far a value may move from its rollout estimate before its loss is clipped.
        vf_coef: weight of the value loss.
        kl_loss_coef: weight of the k3 KL term on the policy; 0 for none.
        ptx_coef: γ, the weight of the language-model loss on pretraining text (PPO-ptx).
        loss_aggregation: how per-token losses make one (``losses.aggregate_loss``).
        max_new_tokens: the constant ``seq_mean_token_sum`` divides by.
        num_generations: rows per group, kept together in a minibatch.
        num_mini_batches: minibatches (optimiser steps) per pass.
        objective: the loss of each minibatch, an entry of ``OBJECTIVES``.
        dpo_beta, dpo_loss_type: β and the ``losses.DPO_LOSSES`` type of the ``dpo`` objective.
        dpo_nll_weight: weight of RPO's per-token NLL of each pair's chosen response in the ``dpo`` objective.
        behaviour_level, behaviour_cap: ``none``: the surrogate's ratio against the experience's log-probs (the
            sync path); a level of ``losses.ENGINE_IS_LEVELS``: ``losses.decoupled_ppo_loss`` with those as the
            proximal policy and the rollout's own (``Rollout.logprobs``, the sampler's) as the behaviour policy,
            weights up to the cap (``async_rollouts``).
    """

    clip_range: float
    clip_range_value: float
    vf_coef: float
    kl_loss_coef: float
    ptx_coef: float
    loss_aggregation: str
    max_new_tokens: int
    num_generations: int
    num_mini_batches: int
    objective: str = "clipped"
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    dpo_nll_weight: float = 0.0
    behaviour_level: str = "none"
    behaviour_cap: float = 2.0

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> PPOUpdates:
        """The settings among ``arguments`` (PPOModule's hparams), by name (those it lacks at their defaults)."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls) if field.name in arguments})

    def loss(
        self, experience: Experience, rows: Tensor, logprobs: Tensor, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``objective``'s loss over ``rows`` of ``experience`` given the policy's ``(m, r)`` ``logprobs`` and
        ``values`` of those rows (``None`` without a value function), and the statistics logged of it, detached."""
        return OBJECTIVES[self.objective](self, experience, rows, logprobs, values)

    def clipped_objective(
        self, experience: Experience, rows: Tensor, logprobs: Tensor, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO's clipped surrogate (with the value loss and GRPO's KL term where set)."""
        mask = experience.mask[rows]
        if self.behaviour_level == "none":
            policy_loss, policy_stats = ppo_policy_loss(
                logprobs,
                experience.logprobs[rows],
                experience.advantages[rows],
                mask,
                self.clip_range,
                self.loss_aggregation,
                self.max_new_tokens,
            )
        else:
            policy_loss, policy_stats = decoupled_ppo_loss(
                logprobs,
                experience.logprobs[rows],
                experience.rollout.logprobs[rows],
                experience.advantages[rows],
                mask,
                self.clip_range,
                self.behaviour_cap,
                self.behaviour_level,
                self.loss_aggregation,
                self.max_new_tokens,
            )
        loss = policy_loss
        stats = {f"policy/{name}": policy_stats[name] for name in IS_STATISTICS if name in policy_stats}
        if values is not None:
            value_loss, value_stats = ppo_value_loss(
                values, experience.values[rows], experience.returns[rows], mask, self.clip_range_value
            )
            loss = loss + self.vf_coef * value_loss
            stats["loss/value"], stats["value/clipfrac"] = value_loss.detach(), value_stats["clipfrac"]
        if self.kl_loss_coef:
            kl = kl_penalty(logprobs, experience.ref_logprobs[rows], "k3")  # GRPO's, on the policy's graph
            kl_loss = aggregate_loss(kl, mask, self.loss_aggregation, self.max_new_tokens)
            loss = loss + self.kl_loss_coef * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        stats["loss/policy"] = policy_loss.detach()
        stats["policy/clipfrac"], stats["policy/approxkl"] = policy_stats["clipfrac"], policy_stats["approx_kl"]
        return loss, stats

    def dpo_objective(
        self, experience: Experience, rows: Tensor, logprobs: Tensor, values: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Online DPO over the pairs of the minibatch's groups (``rows`` hold whole groups), each pair weighing the
        same. Logged: the DPO loss, the implicit rewards ``β · (log π − log π_ref)`` of the chosen and the rejected
        response, their margin and how often it is positive (``dpo/rewards/*``), the scores' margin between the pair
        (``dpo/score_margin``) and the share of the minibatch's prompts with no pair (``dpo/no_pair``). With
        ``dpo_nll_weight``, RPO's term (Pang et al. 2024): that weight times the chosen responses' mean per-token
        negative log-likelihood (``dpo/nll``)."""
        mask, scores = experience.mask[rows], experience.scores[rows]
        chosen, rejected, paired = best_worst_pairs(scores, self.num_generations)
        policy, ref = masked_sum(logprobs, mask, -1), masked_sum(experience.ref_logprobs[rows], mask, -1)  # (m,)
        lengths = mask.sum(-1).clamp(min=1)
        if self.dpo_loss_type in LENGTH_NORMALISED:  # IPO, SimPO, ORPO: stated on per-token averaged log-probs
            policy, ref = policy / lengths, ref / lengths
        stats = {"dpo/no_pair": 1 - paired.float().mean()}
        if not len(chosen):  # every group scored alike: nothing to learn, but a graph to step through
            return logprobs.sum() * 0, {"loss/policy": torch.zeros((), device=logprobs.device), **stats}
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[chosen], policy[rejected], ref[chosen], ref[rejected], self.dpo_beta, self.dpo_loss_type
        )
        nll = -(masked_sum(logprobs[chosen], mask[chosen], -1) / lengths[chosen]).mean()
        loss = losses.mean() + self.dpo_nll_weight * nll
        margins = chosen_rewards - rejected_rewards
        stats |= {
            "loss/policy": loss.detach(),
            "dpo/rewards/chosen": chosen_rewards.mean(),
            "dpo/rewards/rejected": rejected_rewards.mean(),
            "dpo/rewards/margins": margins.mean(),
            "dpo/rewards/accuracies": (margins > 0).float().mean(),
            "dpo/score_margin": (scores[chosen] - scores[rejected]).mean(),
            "dpo/nll": nll.detach(),
        }
        return loss, stats

    def run(
        self,
        experience: Experience,
        orders: Sequence[Tensor],
        policy_outputs: PolicyForward,
        optimise: Callable[[Tensor], Sequence[Tensor]],
        ptx_loss: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One pass over ``experience`` per permutation of its groups in ``orders``, each cut into exactly
        ``num_mini_batches`` near-even minibatches of whole groups (10 in 4: 3, 3, 2, 2; ``chunk`` would make 3, 3,
        3, 1), so that ``max_steps = rollouts · ppo_epochs · num_mini_batches`` holds.

        Per minibatch: ``policy_outputs`` of its rows with gradients (``(m, r)`` log-probs and values), its ``loss``
        (plus ``ptx_coef`` · ``ptx_loss(rows)`` when given), and ``optimise(loss)``: one optimiser step, returning
        the gradient norms, the policy's and the value function's if any. Returns each statistic's mean over the
        steps, the norms as ``policy/grad_norm`` and ``value/grad_norm``."""
        rollout = experience.rollout
        stats: dict[str, list[Tensor]] = defaultdict(list)
        for permutation in orders:
            for rows in group_minibatches(permutation, self.num_generations, self.num_mini_batches):
                logprobs, values = policy_outputs(
                    rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_length
                )
                loss, step_stats = self.loss(experience, rows, logprobs, values)
                if ptx_loss is not None:
                    ptx = ptx_loss(rows)
                    loss = loss + self.ptx_coef * ptx
                    step_stats["loss/ptx"] = ptx.detach()
                norms = optimise(loss)
                for name, value in step_stats.items():
                    stats[name].append(value)
                for name, norm in zip(("policy/grad_norm", "value/grad_norm"), norms, strict=False):
                    stats[name].append(norm)
        return {name: torch.stack(values).mean() for name, values in stats.items()}


# The loss of a minibatch, by PPOModule's ``objective`` (``PPOUpdates.loss``).
OBJECTIVES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "clipped": PPOUpdates.clipped_objective,
    "dpo": PPOUpdates.dpo_objective,
}


def check_objective(
    objective: str,
    num_generations: int,
    advantage_estimator: str,
    value_head: bool,
    dpo_loss_type: str,
    dpo_nll_weight: float = 0.0,
) -> None:
    """Refuse an ``objective`` that is not one of ``OBJECTIVES``, or settings the ``dpo`` objective cannot use."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {list(OBJECTIVES)}")
    if dpo_loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss_type={dpo_loss_type!r} is not one of {sorted(DPO_LOSSES)}")
    if objective != "dpo":
        if dpo_nll_weight:
            raise ValueError(f"dpo_nll_weight={dpo_nll_weight}: RPO's term belongs to objective='dpo'; leave it 0")
        return
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: objective='dpo' pairs >= 2 responses per prompt")
    if advantage_estimator != "gae" or value_head:
        raise ValueError(
            "objective='dpo' learns from pairs, not advantages: leave advantage_estimator and value_head unset "
            f"(got advantage_estimator={advantage_estimator!r}, value_head={value_head})"
        )


def ptx_loss(model: PreTrainedModel, batch: dict[str, Tensor], rows: Tensor, group_size: int) -> Tensor:
    """Mean next-token loss of ``model`` over the pretraining text (``batch["ptx_*"]``) of rollout ``rows``: PPO-ptx's
    ``-log π(x)``, per token. A prompt carries one text, whatever its number of responses (minibatches hold whole
    groups of ``group_size`` rows)."""
    rows = rows[::group_size] // group_size
    ids, attention, labels = (batch[f"ptx_{k}"][rows] for k in ("input_ids", "attention_mask", "labels"))
    logprobs, scored = shifted_logprobs(forward_logits(model, ids, attention), labels)
    return -masked_mean(logprobs, scored)
