"""Episodes of several turns sampled into one ``Rollout``: the policy acts, the environment answers, until done.

Each row is one episode. The environment's first observation (``reset``) is the prompt; then, turn by turn, the
engine samples the policy's turn (up to and including EOS, the end-of-turn token), the environment answers it
(``step``: the turn's reward, done or not, and its observation), and the observation's tokens are appended for the
next turn to read. The token stream is the one SFT trains on for the same conversation (``data.conversations``:
the policy's tokens as sampled, the template's text between turns), so the tokens trained are the tokens sampled.

In the rollout, ``sequences`` is the left-padded prompt then the episode, right-padded; ``attention_mask`` covers
both; ``response_mask`` covers the policy's tokens only, so that log-probs, KL, entropy, losses and advantages count
them alone (environment and tool tokens are context). ``Rollout.episodes`` holds each episode's reward (the sum of
its steps'), turns, tool calls and errors, and whether a limit cut it:

- ``max_turns`` policy turns at most; an episode still running after its last turn is truncated;
- ``max_episode_tokens`` tokens after the prompt (policy and environment); a turn or an observation that would pass
  it ends the episode there, truncated: it is never cut silently. A truncated episode keeps the reward its steps
  earned; PPOModule's ``missing_eos_penalty`` is subtracted from it (an episode that did not end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.data.collate import pad
from lightning_rlhf.data.conversations import observation_ids, observation_text_ids, prompt_ids
from lightning_rlhf.environments import Environment, Observation, tool_schemas
from lightning_rlhf.rl.generation import Episodes, Rollout
from lightning_rlhf.rl.rollouts import episode_texts


@dataclass(frozen=True)
class EpisodeOptions:
    """How episodes are sampled: PPOModule's arguments of the same names (``max_new_tokens`` is per turn)."""

    max_turns: int = 4
    max_new_tokens: int = 64
    max_episode_tokens: int = 256
    temperature: float = 1.0
    cache_implementation: str = "dynamic"
    compile_generation: bool = False


class _Episode:
    """One episode under way: its environment, prompt ids, the tokens after the prompt and which are the policy's."""

    def __init__(self, env: Environment, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase):
        self.env, self.tokenizer = env, tokenizer
        first: Observation = env.reset(record)
        tools = list(getattr(env, "tools", ()) or ())
        self.tools = tool_schemas(tools) if tools else None
        self.history = None if isinstance(first, str) else list(first)  # chat messages so far; None: plain text
        self.prompt = prompt_ids(tokenizer, first, self.tools)
        self.tokens: list[int] = []
        self.policy: list[bool] = []
        self.logprobs: list[float] = []
        self.reward, self.turns, self.tool_calls, self.tool_errors = 0.0, 0, 0, 0
        self.truncated, self.done = False, False

    def add(self, ids: list[int], policy: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.policy += [policy] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def answer(self, turn: list[int], options: EpisodeOptions, last_turn: bool) -> None:
        """The environment's answer to the policy's ``turn`` (already added), and its observation appended."""
        eos = self.tokenizer.eos_token_id
        if not turn or turn[-1] != eos:  # cut by max_new_tokens or the token budget: the turn never ended
            self.truncated, self.done = True, True
            return
        response = self.tokenizer.decode(turn, skip_special_tokens=True)
        step = self.env.step(response)
        self.reward += float(step.reward)
        self.tool_calls += step.tool_calls
        self.tool_errors += step.tool_errors
        if step.done:
            self.done = True
            return
        if last_turn or step.observation is None:  # still running at max_turns (or nothing to read)
            self.truncated, self.done = True, True
            return
        observation = self.observation_ids(response, step.observation)
        if len(self.tokens) + len(observation) + 1 > options.max_episode_tokens:  # no room left for a turn
            self.truncated, self.done = True, True
            return
        self.add(observation, policy=False)

    def observation_ids(self, response: str, observation: Observation) -> list[int]:
        if self.history is None:
            if not isinstance(observation, str):
                raise TypeError("a plain-text episode (reset gave text) takes text observations, not chat messages")
            return observation_text_ids(self.tokenizer, observation)
        new = [{"role": "user", "content": observation}] if isinstance(observation, str) else list(observation)
        self.history.append({"role": "assistant", "content": response})
        ids = observation_ids(self.tokenizer, self.history, new, self.tools)
        self.history += new
        return ids


def episodes_of(
    environment: type, records: Sequence[Mapping[str, Any]], group_size: int
) -> tuple[list[Environment], list[Mapping[str, Any]]]:
    """``group_size`` episodes of each record, in consecutive rows (a GRPO group), each with an environment of its
    own."""
    rows = [record for record in records for _ in range(group_size)]
    return [environment() for _ in rows], rows


def sample_episodes(
    engine: Any,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    envs: Sequence[Environment],
    records: Sequence[Mapping[str, Any]],
    options: EpisodeOptions,
    synced_gpus: bool = False,
    return_logprobs: bool = False,
) -> Rollout:
    """One episode per environment of ``envs``, reset from its record of ``records``, sampled by ``engine`` from
    ``model``'s current weights (``sample_rollout``'s arguments otherwise). Every rank steps the same number of turns
    (``synced_gpus``: sharded ranks generate together) as long as any rank has an episode running."""
    episodes = [_Episode(env, record, tokenizer) for env, record in zip(envs, records, strict=True)]
    device = next(model.parameters()).device
    engine.sync(model)  # never sample from stale weights
    for turn in range(options.max_turns):
        running = [episode for episode in episodes if not episode.done]
        if not running and not synced_gpus:
            break
        budgets = [options.max_episode_tokens - len(episode.tokens) for episode in running]
        contexts = [episode.prompt + episode.tokens for episode in running] or [episodes[0].prompt]
        input_ids = pad(contexts, tokenizer.pad_token_id, left=True).to(device)
        attention_mask = pad([[1] * len(c) for c in contexts], 0, left=True).to(device)
        sampled = engine.generate(
            model,
            tokenizer,
            input_ids,
            attention_mask,
            min(options.max_new_tokens, max(budgets, default=1)),
            options.temperature,
            synced_gpus=synced_gpus,
            cache_implementation=options.cache_implementation,
            compile=options.compile_generation,
            **({"return_logprobs": True} if return_logprobs else {}),
        )
        lengths = sampled.response_mask.sum(-1).tolist()
        for row, (episode, budget) in enumerate(zip(running, budgets, strict=True)):
            length = min(lengths[row], budget)  # a turn past the budget is cut, and the episode truncated
            ids = sampled.responses[row, :length].tolist()
            logprobs = sampled.logprobs[row, :length].tolist() if sampled.logprobs is not None else None
            episode.add(ids, policy=True, logprobs=logprobs)
            episode.turns += 1
            episode.answer(ids, options, last_turn=turn == options.max_turns - 1)
    return episodes_rollout(episodes, tokenizer.pad_token_id, device, return_logprobs)


def episodes_rollout(episodes: list[_Episode], pad_token_id: int, device: torch.device, logprobs: bool) -> Rollout:
    """The episodes as a ``Rollout``: prompts left-padded to one width, the episodes right-padded after them."""
    prompts = pad([episode.prompt for episode in episodes], pad_token_id, left=True)
    prompt_mask = pad([[1] * len(episode.prompt) for episode in episodes], 0, left=True)
    tokens = pad([episode.tokens or [pad_token_id] for episode in episodes], pad_token_id)
    real = pad([[1] * len(episode.tokens) or [0] for episode in episodes], 0)
    policy = pad([[int(p) for p in episode.policy] or [0] for episode in episodes], 0).bool()
    sequences = torch.cat([prompts, tokens], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, real], dim=1).to(device)
    engine_logprobs = None
    if logprobs:
        engine_logprobs = torch.zeros(tokens.shape)
        for row, episode in enumerate(episodes):
            engine_logprobs[row, : len(episode.logprobs)] = torch.tensor(episode.logprobs)
        engine_logprobs = engine_logprobs.to(device)
    stats = Episodes(
        *(
            torch.tensor([getattr(episode, name) for episode in episodes], device=device)
            for name in ("reward", "turns", "tool_calls", "tool_errors", "truncated")
        )
    )
    return Rollout(sequences, attention_mask, policy.to(device), prompts.size(1), engine_logprobs, stats)


def run_episodes(
    engine: Any,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    environment: type,
    records: Sequence[Mapping[str, Any]],
    options: EpisodeOptions,
    batch_size: int = 64,
) -> tuple[list[float], dict[str, float], list[str]]:
    """One episode of each record, ``batch_size`` at a time (``sample_episodes``): the rewards in record order, the
    mean over episodes of each ``Episodes`` statistic but the reward (``turns``, ``tool_calls``, ...), and each
    episode's text after its prompt (special tokens kept: the turns' ends show)."""
    rewards, texts, totals = [], [], dict.fromkeys(Episodes._fields[1:], 0.0)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        rollout = sample_episodes(engine, model, tokenizer, [environment() for _ in batch], batch, options)
        rewards += rollout.episodes.rewards.tolist()
        for name in totals:
            totals[name] += float(getattr(rollout.episodes, name).float().sum())
        texts += [episode for _, episode in episode_texts(tokenizer, rollout)]
    return rewards, {name: total / max(len(records), 1) for name, total in totals.items()}, texts
