"""Sampling responses from a policy.

Generation is ``transformers``' KV-cached ``generate`` on left-padded prompts (``PromptCollator``); a response
counts up to and including its first EOS, and everything after it is masked. The KV cache is transformers' dynamic
one, or its static one (``cache_implementation="static"``: preallocated, fixed shapes), over which ``compile`` has
transformers ``torch.compile`` the decode step; either way the same distribution is sampled. A prompt in several rows
(K samples, a GRPO group) has its KV cache computed once (``shared_prompt_cache``). ``rl.experience`` turns a
rollout into what the PPO updates need; the ``sample`` step uses this to write responses for people to rank.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import CompileConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.models.modes import evaluating
from lightning_rlhf.validation import check_range

CACHE_IMPLEMENTATIONS = ("dynamic", "static")  # transformers' names; the two tested here


class Episodes(NamedTuple):
    """``(b,)`` per episode of a multi-turn rollout (``rl.episodes``): its reward (the sum of its steps'), the policy's
    turns, its tool calls and the failed ones, and whether a limit (turns, tokens) cut it."""

    rewards: Tensor
    turns: Tensor
    tool_calls: Tensor
    tool_errors: Tensor
    truncated: Tensor


class Rollout(NamedTuple):
    """Prompts and the responses sampled for them.

    Attributes:
        sequences: ``(b, p + r)`` left-padded prompt ⊕ response (padded after EOS).
        attention_mask: ``(b, p + r)`` real tokens of both.
        response_mask: ``(b, r)`` response tokens up to and including the first EOS.
        prompt_length: ``p``, the column where responses start.
        logprobs: ``(b, r)`` log-probs of the response tokens under the distribution they were drawn from, recorded
            during generation (``generate(return_logprobs=True)``; ``None`` otherwise), 0 past the mask.
        episodes: multi-turn episodes (``rl.episodes``): the "response" is the whole episode after the prompt,
            ``response_mask`` its policy tokens only, and this their statistics; ``None`` for single responses.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    logprobs: Tensor | None = None
    episodes: Episodes | None = None

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
    with evaluating(model):
        checkpoint_defaults = model.generation_config
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
