"""Judges: what scores a (prompt, response) pair.

``score_batches`` / ``score_records`` run a trained reward model over records (``lightning-rlhf score`` writes
them to a file). ``import_reward_fn`` resolves PPO's ``reward_fn``: a function ``(prompt, response) -> float`` used
instead of a reward model. ``make_scorer`` makes one batch scorer of any judge (the toy's gold judge, a reward-model
export, such a function): ``sample --judge`` ranks with it and ``evaluate`` rates with it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.data.collate import DemonstrationCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.reward import load_reward_model, sequence_rewards
from lightning_rlhf.toy import gold_score

Scorer = Callable[[list, list[str]], list[float]]  # (prompts, responses) -> one score per pair


@torch.no_grad()
def score_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    batch_size: int = 32,
    max_length: int = 512,
    subtract_offset: bool = True,
    skip_invalid: bool = False,
) -> Iterator[tuple[list[int], list[float | None]]]:
    """Rewards of ``records`` a batch at a time: yields ``(positions in records, rewards)``. Batches are formed by
    length to waste little padding; every record is yielded once.

    A record that cannot be tokenized (a prompt longer than ``max_length``) raises, or with ``skip_invalid`` is
    yielded first with reward ``None``."""
    tokenized = Tokenizer(tokenizer, max_length, skip_invalid).examples("demonstration", list(records))
    examples = {i: example for i, (example, _) in enumerate(tokenized) if example is not None}
    if invalid := [i for i in range(len(records)) if i not in examples]:
        yield invalid, [None] * len(invalid)
    collate = DemonstrationCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    order = sorted(examples, key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows])
        scores = sequence_rewards(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), subtract_offset
        )
        yield rows, scores.tolist()


def score_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    batch_size: int = 32,
    max_length: int = 512,
    subtract_offset: bool = True,
    progress: bool = False,
    skip_invalid: bool = False,
) -> list[float | None]:
    """Reward of each demonstration record, in order (``None`` for one ``skip_invalid`` left out; see
    ``score_batches``); ``progress`` shows a bar (records done, records/s, time left) on stderr."""
    rewards: list[float | None] = [None] * len(records)
    with tqdm(total=len(records), desc="scoring", unit="record", disable=not progress) as bar:
        for rows, scores in score_batches(
            model, tokenizer, records, batch_size, max_length, subtract_offset, skip_invalid
        ):
            for i, score in zip(rows, scores, strict=True):
                rewards[i] = score
            bar.update(len(rows))
    return rewards


def import_reward_fn(path: str) -> Callable[[str, str], float]:
    """The function at import path ``package.module.function``, with an error that says what is wrong."""
    module_name, _, name = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_fn={path!r}: cannot import it ({err})") from None
    if not callable(function):
        raise ValueError(f"reward_fn={path!r} must name a function (prompt, response) -> float, as package.module.fn")
    return function


def _pointwise(judge: Callable[[str, str], float]) -> Scorer:
    def score(prompts: list, responses: list[str]) -> list[float]:
        # A chat prompt reaches a text judge as JSON, as in ``sample.judge_records``.
        texts = [prompt if isinstance(prompt, str) else json.dumps(prompt) for prompt in prompts]
        return [float(judge(text, response)) for text, response in zip(texts, responses, strict=True)]

    return score


def reward_model_scorer(model_dir: str, batch_size: int = 32, device: str = "cpu", progress: bool = False) -> Scorer:
    """Scores from the reward model exported at ``model_dir`` (its ``reward_offset`` subtracted)."""
    tokenizer = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, tokenizer).eval().requires_grad_(False).to(device)

    def score(prompts: list, responses: list[str]) -> list[float]:
        records = [Record("eval", {"prompt": p, "response": r}) for p, r in zip(prompts, responses, strict=True)]
        return score_records(model, tokenizer, records, batch_size, progress=progress)

    return score


def make_scorer(
    judge: Callable[[str, str], float] | str, batch_size: int = 32, device: str = "cpu", progress: bool = False
) -> Scorer:
    """A scorer from ``judge``: a function ``(prompt, response) -> float``, ``"gold"`` (the toy task's gold judge),
    the directory of a reward-model export (``progress``: with a bar), or the import path of a function
    (``package.module.fn``)."""
    if callable(judge):
        return _pointwise(judge)
    if judge == "gold":
        return _pointwise(gold_score)
    if Path(judge).is_dir():
        return reward_model_scorer(judge, batch_size, device, progress)
    try:
        return _pointwise(import_reward_fn(judge))
    except ValueError as err:
        raise ValueError(
            f"judge {judge!r} is neither 'gold', a reward-model directory nor a function package.module.fn: {err}"
        ) from None
