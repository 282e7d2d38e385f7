"""Pure tensor functions for the RLHF objectives: no Lightning, no models.

Shapes: ``b`` batch, ``t`` time, ``v`` vocabulary, ``k`` responses per prompt.
Every function here is pinned by hand-computed values in ``tests/test_losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token] in float32, one chunk of rows at a time, forward and backward.

    ``torch.log_softmax(logits.float())`` would hold a float32 copy of the whole ``(b, t, v)`` tensor, and
    autograd would keep it for backward. Here each chunk is normalised by a fused kernel that upcasts as it reads
    (``dtype=torch.float32``), only the picked log-prob is kept, and backward recomputes the softmax chunk by chunk,
    so the extra memory is one float32 chunk.
    """

    @staticmethod
    def _scaled(chunk: Tensor, temperature: float) -> Tensor:
        # At temperature 1 the kernels upcast as they read; otherwise one float32 chunk is divided.
        return chunk if temperature == 1.0 else chunk.float() / temperature  # a new tensor: never in place

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, chunk_rows: int, temperature: float) -> Tensor:  # (n, v) -> (n,)
        picked = [
            torch.log_softmax(_TokenLogprobs._scaled(chunk, temperature), dim=-1, dtype=torch.float32)
            .gather(-1, chunk_tokens[:, None])
            .squeeze(-1)
            for chunk, chunk_tokens in zip(logits.split(chunk_rows), tokens.split(chunk_rows), strict=True)
        ]
        ctx.save_for_backward(logits, tokens)
        ctx.chunk_rows, ctx.temperature = chunk_rows, temperature
        return torch.cat(picked)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, tokens = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            scale = grad_out[rows, None] / ctx.temperature
            # d/dlogits [log softmax(logits / T)_y] = (onehot(y) - softmax(logits / T)) / T, in float32
            probs = torch.softmax(_TokenLogprobs._scaled(logits[rows], ctx.temperature), dim=-1, dtype=torch.float32)
            grad_logits[rows] = probs.mul_(-scale).scatter_add_(-1, tokens[rows, None], scale)
        return grad_logits, None, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_rows: int = 1024, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under its own logits (divided by ``temperature``), no shift inside.

    ``logits[:, t]`` scores ``tokens[:, t]``: to score next tokens, callers pass ``logits[:, :-1]`` and
    ``tokens[:, 1:]``. Positions whose token is negative (``IGNORE_INDEX``) get 0.

    Args:
        logits: ``(b, t, v)`` in any float dtype (bf16 included).
        tokens: ``(b, t)`` token ids.
        chunk_rows: rows of ``b * t`` normalised at once in float32; bounds the extra memory.
        temperature: scores under ``softmax(logits / temperature)``, the distribution sampled at that temperature,
            without a tempered copy of the whole ``logits``.

    Returns:
        ``(b, t)`` float32 log-probabilities, exact in float32 for the given logits.
    """
    valid = tokens >= 0
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    flat = _TokenLogprobs.apply(
        logits.reshape(-1, logits.size(-1)), tokens.clamp(min=0).reshape(-1), chunk_rows, float(temperature)
    )
    return flat.view(tokens.shape) * valid


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is true (over ``dim``, or everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true, over ``dim`` or everything. An empty mask gives 0."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``values`` (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of ``values`` to unit variance (and zero mean unless ``shift_mean=False``).

    The statistics use the masked entries only (unbiased variance); entries past the mask come out 0.
    Used to whiten PPO advantages (Schulman et al. 2017 implementations; Ziegler et al. 2019).
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


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


# -- PPO (InstructGPT step 3; Schulman et al. 2017, Ziegler et al. 2019) ------------------------------------


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
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded response tokens.

    ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γλ A_{t+1}``, ``returns = A + V``. The value after the last real
    token is 0 (the episode ends there), whatever lies past the mask is ignored, and both outputs are 0 there.

    Args:
        rewards, values: ``(b, t)`` per-token rewards and value estimates.
        mask: ``(b, t)`` real response tokens.

    Returns:
        ``(advantages, returns)``, each ``(b, t)``.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
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
        mask: ``(b, t)`` real response tokens, right-padded (a row's last real token holds its score).
        kl_coef: β.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (b,) column of the last real token
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


# -- Critic-free estimators (GRPO: Shao et al. 2024; Dr. GRPO: Liu et al. 2025; RLOO: Ahmadian et al. 2024;
# REINFORCE++: Hu 2025). No value function: a response's baseline comes from its group or from the batch. -------


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


# -- Loss aggregation: how per-token losses become one number -----------------------------------------------


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


def _is_token(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return log_ratio


def _is_sequence(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(log_ratio, mask, dim=-1)[:, None].expand_as(log_ratio)


ENGINE_IS_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"token": _is_token, "sequence": _is_sequence}


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
    if level not in ENGINE_IS_LEVELS:
        raise ValueError(f"engine_is_correction={level!r} is not one of {['none', *ENGINE_IS_LEVELS]}")
    log_ratio = (logprobs - engine_logprobs).detach().float().masked_fill(~mask.bool(), 0.0)
    log_weights = ENGINE_IS_LEVELS[level](log_ratio, mask)
    return torch.exp(log_weights.clamp(max=math.log(cap))) * mask  # clamp in log space: no overflow on long sequences
