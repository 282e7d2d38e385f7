"""Sampling responses from a policy, and the experience PPO learns from them.

Generation is ``transformers``' KV-cached ``generate`` on left-padded prompts (``PromptCollator``); a response
counts up to and including its first EOS, and everything after it is masked. The KV cache is transformers' dynamic
one, or its static one (``cache_implementation="static"``: preallocated, fixed shapes), over which ``compile`` has
transformers ``torch.compile`` the decode step; either way the same distribution is sampled. ``build_experience``
turns a rollout's log-probs, values and scores into what the PPO updates need: InstructGPT's per-token reward and
GAE, or a critic-free estimator. With ``num_generations`` G the rollout holds each prompt's G responses in
consecutive rows (a group), and minibatches take whole groups (``group_minibatches``). The ``sample`` step uses the
generation part to write responses for people to rank.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import CompileConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.losses import (
    GROUP_ESTIMATORS,
    LOSS_AGGREGATIONS,
    engine_importance_weights,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_rewards,
    reinforce_pp_advantages,
)
from lightning_rlhf.validation import check_range

ADVANTAGE_ESTIMATORS = ("gae", *GROUP_ESTIMATORS, "reinforce_pp")  # gae needs a value function, the others none
CACHE_IMPLEMENTATIONS = ("dynamic", "static")  # transformers' names; the two tested here


class Rollout(NamedTuple):
    """Prompts and the responses sampled for them.

    Attributes:
        sequences: ``(b, p + r)`` left-padded prompt ⊕ response (padded after EOS).
        attention_mask: ``(b, p + r)`` real tokens of both.
        response_mask: ``(b, r)`` response tokens up to and including the first EOS.
        prompt_length: ``p``, the column where responses start.
        logprobs: ``(b, r)`` log-probs of the response tokens under the distribution they were drawn from, recorded
            during generation (``generate(return_logprobs=True)``; ``None`` otherwise), 0 past the mask.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    logprobs: Tensor | None = None

    @property
    def responses(self) -> Tensor:
        return self.sequences[:, self.prompt_length :]


def mask_after_eos(responses: Tensor, eos_token_id: int) -> Tensor:
    """``(b, r)`` mask of response tokens up to and including the first EOS (all of them when there is none)."""
    is_eos = responses == eos_token_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return eos_before == 0


def check_sampling_options(temperature: float, top_k: int, top_p: float) -> None:
    """PPO samples at ``temperature > 0`` from the whole tempered distribution: the one its log-probs, KL and ratios
    are computed under (``top_k`` / ``top_p`` are arguments only so that a config setting them fails clearly)."""
    scored = "(PPO scores the whole tempered distribution, not a truncated one)"
    check_range("temperature", temperature, "> 0 (PPO samples its rollouts)", temperature > 0)
    check_range("top_k", top_k, f"0 {scored}", top_k == 0)
    check_range("top_p", top_p, f"1.0 {scored}", top_p == 1.0)


def check_prompts_fit(model: PreTrainedModel, prompt_length: int, max_new_tokens: int) -> None:
    """Prompts of ``prompt_length`` tokens + ``max_new_tokens`` must fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"prompts of {prompt_length} tokens + max_new_tokens={max_new_tokens} exceed the model's "
            f"max_position_embeddings={limit}: lower data max_length or model max_new_tokens"
        )


def check_critic_free_args(estimator: str, num_generations: int, loss_aggregation: str, value_head: bool) -> None:
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator={estimator!r} is not one of {list(ADVANTAGE_ESTIMATORS)}")
    if num_generations < 1 or (estimator in ("grpo", "dr_grpo", "rloo") and num_generations < 2):
        raise ValueError(
            f"num_generations={num_generations}: advantage_estimator={estimator!r} needs "
            f"{'>= 2 responses per prompt to compare' if estimator != 'gae' else '>= 1'}"
        )
    if loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation={loss_aggregation!r} is not one of {sorted(LOSS_AGGREGATIONS)}")
    if value_head and estimator != "gae":
        raise ValueError(f"value_head=True: advantage_estimator={estimator!r} has no value function")


def check_generation_options(cache_implementation: str, compile: bool) -> None:
    """Refuse an unknown KV cache, and ``compile`` without the static cache it needs."""
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation={cache_implementation!r} is not one of {list(CACHE_IMPLEMENTATIONS)}")
    if compile and cache_implementation != "static":
        raise ValueError(
            f"compiling the decode step needs cache_implementation='static', not {cache_implementation!r}: "
            "transformers compiles it only over a static cache"
        )


@torch.no_grad()
def shared_prompt_cache(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
    """``{name: KV cache}`` (``name``: ``cache`` from transformers 5.2x on, ``past_key_values`` before) of every column
    but the last of left-padded prompts, each distinct prompt forwarded once and its cache copied to each of its rows;
    ``{}`` when no prompt repeats (or a prompt of one column).

    Given to ``generate`` with the whole prompts, the cache leaves it only their last column to forward before it
    samples (transformers continues from a cache: ``GenerationMixin._prefill``). Positions are the ones
    ``generate`` gives, from the attention mask (``_prepare_position_ids_for_generation``: count of real tokens
    before, pads 0), so absolute-position models match too. K = 8 samples of the toy's 19-token prompts: the prefill
    was 45 % of sampling's time.
    """
    if input_ids.size(1) < 2:
        return {}
    distinct, row_of = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(input_ids):
        return {}
    ids, mask = distinct[:, : input_ids.size(1) - 1], distinct[:, input_ids.size(1) : -1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    parameters = inspect.signature(model.forward).parameters
    logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **logits)
    name = "cache" if "cache" in parameters else "past_key_values"
    cache = out[name]
    cache.batch_select_indices(row_of)
    return {name: cache}


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    synced_gpus: bool = False,
    cache_implementation: str = "dynamic",
    compile: bool = False,
    return_logprobs: bool = False,
    share_prompts: bool = True,
) -> Rollout:
    """Sample (``temperature > 0``) or decode greedily (``temperature == 0``) a response for each left-padded prompt.

    Generation follows exactly these settings (``top_k=0`` and ``top_p=1`` sample the whole tempered distribution,
    what PPO's log-probs score): nothing comes from the checkpoint's own ``generation_config.json``, whose
    repetition penalty or ``no_repeat_ngram_size`` would change what is sampled without the log-probs knowing.
    The model is put in eval mode for generation and restored afterwards. ``synced_gpus`` keeps ranks of a
    sharded model stepping together until all of them have finished.

    ``cache_implementation``: ``"dynamic"`` (the KV cache grows as tokens come) or ``"static"`` (preallocated for
    prompt + ``max_new_tokens``; a batch of another width allocates a new one). ``compile``: transformers compiles
    the decode step over the static cache with ``torch.compile`` (``CompileConfig``'s defaults: inductor,
    ``reduce-overhead``, i.e. CUDA graphs on a GPU); the first call pays the compilation, and each new batch shape
    a recompilation. ``return_logprobs``: record in ``Rollout.logprobs`` the log-probs of the sampled tokens
    under the (tempered) distribution they were drawn from; it keeps ``(b, r, vocabulary)`` float32 scores during
    generation.

    ``share_prompts``: a prompt in several rows (K samples to rank, a GRPO group) has its KV cache computed once
    (``shared_prompt_cache``) and the rows sample on from copies of it: the same distributions (to rounding) for a
    K-th of the prefill. With the dynamic cache, uncompiled, on one device (``synced_gpus`` keeps the usual
    prefill, the same forwards on every rank).
    """
    check_generation_options(cache_implementation, compile)
    compile_config = None
    if compile:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' own switch to compile off CUDA/XPU too (e.g. CPU)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        compile_config=compile_config,
        disable_compile=not compile,  # no automatic compile behind our back on CUDA
        return_dict_in_generate=return_logprobs,
        output_scores=return_logprobs,
        **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if sampling else {}),
    )
    was_training, checkpoint_defaults = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()  # generate fills unset values from here: the library defaults only
    try:
        cache = {}
        if share_prompts and cache_implementation == "dynamic" and not (compile or synced_gpus):
            cache = shared_prompt_cache(model, input_ids, attention_mask)
        config.cache_implementation = None if cache else cache_implementation  # a cache given is one of its own
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=synced_gpus,
            **cache,
        )
    finally:
        model.generation_config = checkpoint_defaults
        model.train(was_training)
    sequences = output.sequences if return_logprobs else output
    prompt_length = input_ids.shape[1]
    response_mask = mask_after_eos(sequences[:, prompt_length:], tokenizer.eos_token_id)
    sequences[:, prompt_length:] = sequences[:, prompt_length:].masked_fill(~response_mask, tokenizer.pad_token_id)
    logprobs = None
    if return_logprobs:  # output.scores: one (b, vocabulary) tensor per step, logits after temperature (and top-k/p)
        scores = torch.stack(output.scores, dim=1).log_softmax(-1)  # (b, r, vocabulary)
        logprobs = scores.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1).masked_fill(~response_mask, 0)
    attention_mask = torch.cat([attention_mask, response_mask.long()], dim=1)
    return Rollout(sequences, attention_mask, response_mask, prompt_length, logprobs)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens."""
    return tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)


class Experience(NamedTuple):
    """What one PPO rollout hands to its updates.

    Attributes:
        rollout: the sampled sequences and their masks.
        logprobs: ``(b, r)`` log-probs of the response tokens under the policy that sampled them.
        values: ``(b, r)`` value of the state before each response token (``None`` without a value function).
        advantages: ``(b, r)`` advantages of the chosen estimator, 0 past the mask.
        returns: ``(b, r)`` value targets, ``advantages + values`` before whitening (``None`` without GAE).
        scores: ``(b,)`` reward of each whole response (after any missing-EOS penalty).
        kl: ``(b,)`` per-token KL estimate to the reference, summed over the response.
        ended: ``(b,)`` responses that ended with EOS.
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
    estimator: str = "gae",
    group_size: int = 1,
    kl_in_reward: bool = True,
) -> Experience:
    """Where the advantage is computed; all ``(b, r)`` tensors are over the rollout's responses.

    ``gae``: the InstructGPT reward per token, ``-β · KL_t`` plus the score on the last one (``losses.ppo_rewards``),
    then GAE advantages and returns (``losses.gae``). ``reinforce_pp``: the same rewards, discounted returns whitened
    over the batch (``losses.reinforce_pp_advantages``). ``grpo``, ``dr_grpo``, ``rloo``: each response's reward
    ``score - β · Σ_t KL_t`` against its group of ``group_size`` (``losses.group_advantages``), on every one of its
    tokens. ``kl_in_reward=False`` leaves the KL out of the reward (β = 0 there; e.g. GRPO's KL loss term instead).
    """
    mask = rollout.response_mask
    ended = ((rollout.responses == eos_token_id) & mask).any(-1)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    reward_kl_coef = kl_coef if kl_in_reward else 0.0
    returns = None
    if estimator == "gae":
        advantages, returns = gae(ppo_rewards(scores, kl, mask, reward_kl_coef), values, mask, gamma, lam)
        if whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    elif estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(scores, kl, mask, reward_kl_coef, gamma)
    else:
        rewards = scores - reward_kl_coef * (kl * mask).sum(-1)  # (b,)
        advantages = group_advantages(rewards, group_size, estimator)[:, None] * mask
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
    the clipped surrogate alike, so this weights each token's policy loss, as TRL and verl do."""
    if level == "none":
        return experience
    rollout = experience.rollout
    weights = engine_importance_weights(experience.logprobs, rollout.logprobs, rollout.response_mask, level, cap)
    return experience._replace(advantages=experience.advantages * weights)
