"""The pipeline's input files: the held-out evaluation prompts and the rest, each round's prompts to rank (fresh toy
prompts, or a draw of the user's), and how many optimiser steps one pass over a file of records is."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_rlhf.data.records import read_records
from lightning_rlhf.io import write_jsonl_atomic
from lightning_rlhf.toy import make_prompts

HELD_OUT_SEED = 1234  # the shipped demonstrations use seed 0, the shipped prompts seed 1


def prompt_key(prompt: str | list) -> str:
    """A prompt as a set member: chat prompts (lists of messages) as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def read_prompts(path: str) -> list:
    records, _ = read_records(path, "prompt")
    return [record.fields["prompt"] for record in records]


def split_held_out(prompts: list, n: int) -> tuple[list, list]:
    """``n`` of ``prompts`` held out (drawn with ``HELD_OUT_SEED``) and the rest, in file order, to train on."""
    if not 0 < n < len(prompts):
        raise ValueError(
            f"--eval_prompts={n}: must be between 1 and the {len(prompts)} --prompts less one (the "
            "rest train the policy), or name a --held_out file"
        )
    held = set(random.Random(HELD_OUT_SEED).sample(range(len(prompts)), n))
    return [p for i, p in enumerate(prompts) if i in held], [p for i, p in enumerate(prompts) if i not in held]


def held_out_and_train(prompts: str | None, held_out: str | None, eval_prompts: int) -> tuple[list, list | None]:
    """The held-out evaluation prompts and the user's prompts to train on (``None``: fresh toy prompts): the
    ``held_out`` file's, or a seeded share of ``eval_prompts`` of ``prompts``, or ``eval_prompts`` toy prompts. No
    held-out prompt is trained on."""
    if prompts:
        train_prompts = read_prompts(prompts)
        if held_out:
            held = read_prompts(held_out)
            overlap = {prompt_key(p) for p in held} & {prompt_key(p) for p in train_prompts}
            return held, [p for p in train_prompts if prompt_key(p) not in overlap]  # nobody trains on held-out
        return split_held_out(train_prompts, eval_prompts)
    if held_out:
        return read_prompts(held_out), None
    return [record["prompt"] for record in make_prompts(eval_prompts, seed=HELD_OUT_SEED)], None


def write_prompts(path: Path, n: int, seed: int, exclude: set[str]) -> Path:
    """``n`` fresh toy prompts, none of them in ``exclude`` (the held-out evaluation prompts)."""
    prompts = [record for record in make_prompts(n + len(exclude), seed=seed) if record["prompt"] not in exclude]
    return write_jsonl_atomic(prompts[:n], path)


def user_prompts_to_rank(path: Path, prompts: list, n: int, seed: int) -> Path:
    """``n`` of the user's training prompts (all of them when there are fewer), a different draw each round."""
    drawn = random.Random(seed).sample(prompts, min(n, len(prompts)))
    return write_jsonl_atomic([{"prompt": prompt} for prompt in drawn], path)


def prompts_to_rank(path: Path, n: int, seed: int, round_: int, train_prompts: list | None, held_out: list) -> Path:
    """``path``, written with ``n`` prompts for round ``round_`` of seed ``seed`` to sample and rank: fresh toy prompts
    none of them ``held_out`` (``train_prompts`` ``None``), or a draw of the user's ``train_prompts``."""
    draw = 10_000 + 100 * seed + round_
    if train_prompts is None:
        return write_prompts(path, n, draw, {prompt_key(p) for p in held_out})
    return user_prompts_to_rank(path, train_prompts, n, draw)


def steps_per_pass(config: Path, source: str, kind: str) -> float:
    """Optimiser steps in one pass over the training share of ``source``'s ``kind`` records, at ``config``'s
    ``data.init_args`` ``batch_size`` and ``val_fraction``: 2,000 records, 0.05 held out, batches of 32 -> 59.375."""
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    records, _ = read_records(source, kind)
    return len(records) * (1 - (data.get("val_fraction") or 0.0)) / data["batch_size"]
