"""Honest alignment numbers for the toy task: the gold judge's scores of a model's responses."""

from __future__ import annotations

from collections.abc import Callable

from lightning_rlhf.sampling import sample_responses
from lightning_rlhf.toy.reverse import gold_score


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
    """Gold score (or ``judge``'s, a function ``(prompt, response) -> float``) of one response per prompt, in prompt
    order: greedy when ``temperature == 0``, else sampled; ``progress`` shows a bar named ``desc`` on stderr."""
    samples = sample_responses(
        model,
        tokenizer,
        prompts,
        1,
        512,
        batch_size,
        progress,
        desc,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    return [judge(prompt, responses[0]) for prompt, responses in zip(prompts, samples, strict=True)]
