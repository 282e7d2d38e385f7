"""A PPO rollout: prompts sampled into responses (``sample_rollout``), scored and made into experience
(``experience_from``), and the statistics watched of it.

Scoring gives, for every response token ``t``, the policy's and the reference's log-probs (under
``softmax(logits / temperature)``: the distribution sampled) and the value ``V_t`` of the state before the token;
for every sequence its score, from the reward model or from reward functions on the decoded text. The statistics are
computed once per response (``sequence_statistics``): training logs their means with a few more
(``rollout_statistics``), validation averages the same per-response values over its batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.losses.tokens import masked_mean
from lightning_rlhf.rl.experience import Experience, build_experience, correct_for_engine, group_statistics
from lightning_rlhf.rl.generation import Rollout

RowsForward = Callable[[Tensor, Tensor, int], Tensor]  # (sequences, attention_mask, prompt_length) -> outputs
PolicyForward = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor | None]]  # -> (log-probs, values or None)
TextScore = Callable[[str, str], float]  # (prompt, response) -> score
EPISODE_METRICS = ("turns", "tool_calls", "tool_errors", "truncated")  # logged as episode/<name>, means per episode


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout is sampled and made into experience: PPOModule's arguments of the same names."""

    num_generations: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    cache_implementation: str = "dynamic"
    compile_generation: bool = False
    forward_batch_size: int | None = None
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    advantage_estimator: str = "gae"
    objective: str = "clipped"  # ``dpo`` learns from pairs of scores: no advantages
    kl_in_reward: bool = True
    engine_is_correction: str = "none"
    engine_is_cap: float = 2.0

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> RolloutOptions:
        """The options among ``arguments`` (PPOModule's hparams), by name."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})


@contextmanager
def seeded(key: tuple, device: torch.device) -> Iterator[None]:
    """Draw random numbers (sampling, shuffling) from a generator seeded by ``key`` (e.g. ``(seed, stream, index,
    rank)``: a resumed run draws what the uninterrupted one drew), leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(hash(key) % 2**63)
        yield


def sample_rollout(
    engine: Any,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, Tensor],
    options: RolloutOptions,
    synced_gpus: bool = False,
    return_logprobs: bool = False,
) -> Rollout:
    """``num_generations`` responses per left-padded prompt of ``batch`` (a prompt's in consecutive rows), sampled by
    ``engine`` (``engines``) from ``model``'s current weights; ``synced_gpus`` for sharded ranks, which must keep
    stepping together (their forwards gather weights) until all have finished. ``return_logprobs``: the hf engine
    records its log-probs of the sampled tokens too (the rollout worker's behaviour policy)."""
    input_ids, attention_mask = (
        batch[k].repeat_interleave(options.num_generations, 0) for k in ("input_ids", "attention_mask")
    )
    engine.sync(model)  # never sample from stale weights
    return engine.generate(
        model,
        tokenizer,
        input_ids,
        attention_mask,
        options.max_new_tokens,
        options.temperature,
        synced_gpus=synced_gpus,
        cache_implementation=options.cache_implementation,
        compile=options.compile_generation,
        **({"return_logprobs": True} if return_logprobs else {}),
    )


def experience_from(
    rollout: Rollout,
    forwards: tuple[PolicyForward, RowsForward, RowsForward | None],
    reward_fns: dict[str, tuple[TextScore, float]],
    tokenizer: PreTrainedTokenizerBase,
    kl_coef: float,
    options: RolloutOptions,
) -> Experience:
    """``rollout`` scored and made into experience (``experience.build_experience``, weighted for the engine by
    ``correct_for_engine``).

    ``forwards``: the policy's ``(b, r)`` log-probs and values (``None`` without a value function), the reference's
    log-probs, and the reward model's ``(b,)`` scores (``None`` without one: then the score is the weighted sum of
    ``reward_fns``, name -> (function, weight), whose parts are kept in ``reward_parts``). Episodes
    (``rl.episodes``) are scored by their environment: the score is the episode's reward."""
    logprobs, values, ref_logprobs, scores = score_in_chunks(rollout, options.forward_batch_size, *forwards)
    parts = text_scores({name: fn for name, (fn, _) in reward_fns.items()}, tokenizer, rollout)
    if rollout.episodes is not None:  # the environment's rewards
        scores = rollout.episodes.rewards
    elif scores is None:
        scores = sum(weight * parts[name] for name, (_, weight) in reward_fns.items())
    experience = build_experience(
        rollout,
        logprobs,
        ref_logprobs,
        values,
        scores,
        tokenizer.eos_token_id,
        kl_coef,
        options.kl_estimator,
        options.gamma,
        options.lam,
        options.whiten_advantages,
        options.missing_eos_penalty,
        options.advantage_estimator if options.objective == "clipped" else None,
        options.num_generations,
        options.kl_in_reward,
    )
    experience = correct_for_engine(experience, options.engine_is_correction, options.engine_is_cap)
    return experience._replace(reward_parts=parts)


def score_in_chunks(
    rollout: Rollout,
    forward_batch_size: int | None,
    policy_outputs: PolicyForward,
    reference_logprobs: RowsForward,
    rewards: RowsForward | None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(logprobs, values, ref_logprobs, scores)`` of ``rollout`` (``None`` where a forward gives none), from forwards
    of ``forward_batch_size`` rows at a time (``None``: all at once). Every rank makes the same number of forwards, as
    sharded models need, when ranks hold rollouts of the same size."""
    sequences, attention_mask, start = rollout.sequences, rollout.attention_mask, rollout.prompt_length
    parts = []
    for rows in torch.arange(len(sequences), device=sequences.device).split(forward_batch_size or len(sequences)):
        ids, mask = sequences[rows], attention_mask[rows]
        logprobs, values = policy_outputs(ids, mask, start)
        ref_logprobs = reference_logprobs(ids, mask, start)
        scores = rewards(ids, mask, start) if rewards is not None else None
        parts.append((logprobs, values, ref_logprobs, scores))
    logprobs, values, ref_logprobs, scores = (
        torch.cat(column) if column[0] is not None else None for column in zip(*parts, strict=True)
    )
    return logprobs, values, ref_logprobs, scores


def rollout_texts(tokenizer: PreTrainedTokenizerBase, rollout: Rollout, n: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, response)`` texts of the first ``n`` rows (``None``: all), without special tokens; the prompt as
    the policy saw it (chat template rendered)."""
    prompts = tokenizer.batch_decode(rollout.sequences[:n, : rollout.prompt_length], skip_special_tokens=True)
    responses = tokenizer.batch_decode(rollout.responses[:n], skip_special_tokens=True)
    return list(zip(prompts, responses, strict=True))


def episode_texts(tokenizer: PreTrainedTokenizerBase, rollout: Rollout, n: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, episode)`` texts of the first ``n`` episodes, special tokens kept (they mark the turns), padding
    removed."""
    rows = range(len(rollout.sequences))[:n]
    real = [rollout.sequences[row][rollout.attention_mask[row].bool()] for row in rows]
    prompt_lengths = rollout.attention_mask[:n, : rollout.prompt_length].sum(-1).tolist()
    return [
        (tokenizer.decode(ids[:length]), tokenizer.decode(ids[length:]))
        for ids, length in zip(real, prompt_lengths, strict=True)
    ]


def text_scores(fns: dict[str, TextScore], tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> dict[str, Tensor]:
    """``(b,)`` float32 ``fn(prompt, response)`` of each function of ``fns`` on the rollout's texts, decoded once."""
    texts = rollout_texts(tokenizer, rollout) if fns else []
    device = rollout.sequences.device
    return {
        name: torch.tensor([float(fn(*text)) for text in texts], dtype=torch.float32, device=device)
        for name, fn in fns.items()
    }


def sequence_statistics(experience: Experience, kl_coef: float, judge: Tensor | None = None) -> dict[str, Tensor]:
    """``(b,)`` per response: its score, its KL to the reference (summed over its tokens), the KL-penalised reward
    ``score - β · KL`` the policy maximises, its length (the policy's tokens), the ``judge``'s score when there is
    one, and an episode's turns, tool calls, failed calls and whether a limit cut it (``episode/<name>``)."""
    scores, kl = experience.scores, experience.kl
    stats = {
        "objective/scores": scores,
        "objective/kl": kl,
        "objective/rlhf_reward": scores - kl_coef * kl,
        "response_length": experience.mask.sum(-1).float(),
    }
    if judge is not None:
        stats["objective/judge"] = judge
    if (episodes := experience.rollout.episodes) is not None:
        stats.update({f"episode/{name}": getattr(episodes, name).float() for name in EPISODE_METRICS})
    return stats


def rollout_statistics(
    experience: Experience, kl_coef: float, group_size: int, judge: Tensor | None = None
) -> dict[str, Tensor]:
    """Scalars of one training rollout: the means of ``sequence_statistics``, the KL penalty's share of the reward,
    the entropy estimate, the share of responses that ended (and that are empty), each reward function's mean score
    (``objective/reward/<name>``) and with groups (``group_size`` > 1) how much their scores spread."""
    stats = {name: values.mean() for name, values in sequence_statistics(experience, kl_coef, judge).items()}
    stats["objective/non_score_reward"] = -kl_coef * stats["objective/kl"]
    # -log π of sampled tokens: a Monte Carlo estimate of the (tempered) policy's entropy per token.
    stats["objective/entropy"] = -masked_mean(experience.logprobs, experience.mask)
    stats["eos_fraction"] = experience.ended.float().mean()
    stats["empty_fraction"] = experience.empty.float().mean()
    for name, part in (experience.reward_parts or {}).items():
        stats[f"objective/reward/{name}"] = part.mean()
    if group_size > 1:
        stats.update({f"objective/{k}": v for k, v in group_statistics(experience.scores, group_size).items()})
    return stats


def samples_table(tokenizer: PreTrainedTokenizerBase, experience: Experience, n: int) -> str:
    """The first ``n`` prompts, responses and scores of ``experience`` as a Markdown table (TensorBoard text)."""
    rows = ["| prompt | response | score |", "|---|---|---|"]
    texts = rollout_texts(tokenizer, experience.rollout, n)
    if experience.rollout.episodes is not None:
        texts = episode_texts(tokenizer, experience.rollout, n)
    for (prompt, response), score in zip(texts, experience.scores[:n].tolist(), strict=True):
        rows.append(f"| {prompt!r} | {response!r} | {score:.3f} |")
    return "\n".join(rows)
