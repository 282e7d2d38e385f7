"""Many responses per prompt from a model, by batches: the engine samples (``hf`` or ``vllm``), and each batch has
its own seed so a resumed ``sample`` run draws what an uninterrupted one would. ``sample_and_judge`` samples and
scores every response with a judge (``judge_samples``, one call for all); ``gold_scores`` is the judge's score of
one response per prompt, greedy or sampled, as the pipeline's evaluation reports it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lightning_rlhf.data.collate import PromptCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.evaluation.judges import Scorer
from lightning_rlhf.rl.engines import HFEngine
from lightning_rlhf.rl.generation import decode_responses
from lightning_rlhf.toy.reverse import gold_score


def judge_samples(prompts: list, samples: list[list[str]], judge: Scorer) -> list[list[float]]:
    """``judge``'s score of every sample, ``scores[i][j]`` of ``samples[i][j]`` answering ``prompts[i]``: all the
    (prompt, response) pairs in one ``judge`` call (none when there are no samples), so a reward model batches them."""
    pairs = [(prompt, response) for prompt, responses in zip(prompts, samples, strict=True) for response in responses]
    flat = iter(judge([p for p, _ in pairs], [r for _, r in pairs]) if pairs else [])
    return [[next(flat) for _ in responses] for responses in samples]


def sample_and_judge(
    model,
    tokenizer,
    prompts: list,
    judge: Scorer,
    k: int = 1,
    max_length: int = 512,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "sampling",
    engine=None,
    **generation,
) -> tuple[list[list[str]], list[list[float]]]:
    """``k`` responses per prompt (``sample_responses``, same arguments) and ``judge``'s score of each
    (``judge_samples``): ``(samples, scores)``, ``scores[i][j]`` of ``samples[i][j]`` answering ``prompts[i]``."""
    samples = sample_responses(
        model, tokenizer, prompts, k, max_length, batch_size, progress, desc, engine, **generation
    )
    return samples, judge_samples(prompts, samples, judge)


def gold_scores(
    model,
    tokenizer,
    prompts: list[str],
    temperature: float,
    max_new_tokens: int = 16,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "sampling",
    judge: Callable[[str, str], float] = gold_score,
) -> list[float]:
    """Gold score (or ``judge``'s, a function ``(prompt, response) -> float``, given the prompt as it is) of one
    response per prompt, in prompt order: greedy when ``temperature == 0``, else sampled; ``progress`` shows a bar
    named ``desc`` on stderr."""

    def score(prompts: list, responses: list[str]) -> list[float]:
        return [judge(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]

    _, scores = sample_and_judge(
        model,
        tokenizer,
        prompts,
        score,
        1,
        512,
        batch_size,
        progress,
        desc,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    return [prompt_scores[0] for prompt_scores in scores]


def tokenize_prompts(model, tokenizer, prompts: list, max_length: int, max_new_tokens: int, first: int = 0) -> list:
    """Tokenized prompts (``first`` numbers the first one in errors), refused when the longest one and
    ``max_new_tokens`` would run past the model's positions."""
    records = [Record(f"prompt {first + i}", {"prompt": prompt}) for i, prompt in enumerate(prompts)]
    examples = Tokenizer(tokenizer, max_length).prompts(records)
    longest = max(len(ex["input_ids"]) for ex in examples) + max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(
            f"the longest prompt + max_new_tokens is {longest} tokens, past the model's max_position_embeddings="
            f"{limit}: lower --max_new_tokens or --max_length"
        )
    return examples


def batch_seed(seed: int, first: int) -> int:
    """The seed of the batch that starts at prompt ``first``: a batch samples the same whether a run starts with it
    or continues to it (a single stream seeded once would shift with the batches a resumed run skips)."""
    return int(np.random.SeedSequence([seed, first]).generate_state(1)[0])


def sample_batches(
    model,
    tokenizer,
    prompts: list,
    k: int,
    max_length: int,
    batch_size: int,
    seed: int,
    start: int = 0,
    engine=None,
    **generation,
) -> Iterator[tuple[int, list[list[str]]]]:
    """``k`` responses for each prompt from prompt ``start`` on, by batches of whole prompts (``batch_size``
    responses, rounded down to whole prompts, at least one), each sampled under ``batch_seed(seed, first)``: yields
    ``(first, samples)``, ``samples[i]`` answering ``prompts[first + i]``. ``start`` is where a previous run with
    the same settings stopped, a batch boundary. ``engine``: what samples (``engines``; ``None``: the hf engine)."""
    if start >= len(prompts):  # a previous run finished them all
        return
    per_batch = max(1, batch_size // k)
    examples = tokenize_prompts(
        model, tokenizer, prompts[start:], max_length, generation.get("max_new_tokens", 0), start
    )
    for offset in range(0, len(examples), per_batch):
        torch.manual_seed(batch_seed(seed, start + offset))  # the vllm engine draws its requests' seeds from here
        repeated = [ex for ex in examples[offset : offset + per_batch] for _ in range(k)]
        texts = sample_texts(model, tokenizer, repeated, engine, **generation)
        yield start + offset, [texts[i : i + k] for i in range(0, len(texts), k)]


def sample_texts(model, tokenizer, examples: list[dict], engine=None, **generation) -> list[str]:
    """One decoded response to each tokenized prompt of ``examples`` (left-padded into one batch), sampled by
    ``engine`` (``engines``; ``None``: the hf engine)."""
    batch = PromptCollator(tokenizer.pad_token_id)(examples)
    device = next(model.parameters()).device
    rollout = (engine or HFEngine()).generate(
        model, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device), **generation
    )
    return decode_responses(tokenizer, rollout)


def sample_responses(
    model,
    tokenizer,
    prompts: list,
    k: int,
    max_length: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "sampling",
    engine=None,
    **generation,
) -> list:
    """``k`` decoded responses for each prompt (strings or chat messages), in prompt order; ``progress`` shows a bar
    named ``desc`` (responses done, responses/s, time left) on stderr; ``engine`` samples (``None``: the hf one)."""
    examples = tokenize_prompts(model, tokenizer, prompts, max_length, generation.get("max_new_tokens", 0))
    repeated = [ex for ex in examples for _ in range(k)]
    texts: list[str] = []
    with tqdm(total=len(repeated), desc=desc, unit="response", disable=not progress) as bar:
        for start in range(0, len(repeated), batch_size):
            chunk = repeated[start : start + batch_size]
            texts += sample_texts(model, tokenizer, chunk, engine, **generation)
            bar.update(len(chunk))
    return [texts[i * k : (i + 1) * k] for i in range(len(examples))]
