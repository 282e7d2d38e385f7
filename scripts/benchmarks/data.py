"""The records the benchmarks train and sample on: the shipped toy data, or seeded random records of given lengths."""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
from pathlib import Path

from lightning_rlhf.toy import toy_path
from lightning_rlhf.toy.reverse import gold_score, ideal_response, make_prompts


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def write_jsonl(rows: list[dict], name: str) -> str:
    """``rows`` as a JSON-lines file of this name in a fresh temp directory; its path."""
    path = Path(tempfile.mkdtemp()) / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def preference_pairs(args: argparse.Namespace) -> list[dict[str, str]]:
    """Best vs worst response of each shipped toy comparison, or ``--synthetic`` pairs as long as ``--max-length``."""
    if args.synthetic:
        rng = random.Random(0)
        prompt, response = args.max_length // 4, args.max_length - args.max_length // 4 - 2  # room for EOS
        return [
            {
                "prompt": random_text(rng, prompt),
                "chosen": random_text(rng, response),
                "rejected": random_text(rng, response),
            }
            for _ in range(256)
        ]
    pairs = []
    for line in Path(toy_path("comparisons")).read_text().splitlines():
        record = json.loads(line)
        ranked = sorted(zip(record["ranks"], record["responses"], strict=True))
        pairs.append({"prompt": record["prompt"], "chosen": ranked[0][1], "rejected": ranked[-1][1]})
    return pairs


def mixed_length_demonstrations() -> list[dict[str, str]]:
    """The toy demonstrations and as many random ones of 10 to 500 tokens (bytes, EOS included), spread evenly, the
    prompt a quarter of each, in a seeded random order."""
    rng = random.Random(0)
    toy = [json.loads(line) for line in Path(toy_path("demonstrations")).read_text().splitlines()]
    long = []
    for _ in toy:
        length = rng.randint(10, 500)
        long.append({"prompt": random_text(rng, length // 4), "response": random_text(rng, length - length // 4 - 1)})
    rows = toy + long
    rng.shuffle(rows)
    return rows


def demonstrations_path(args: argparse.Namespace) -> str:
    """The toy demonstrations, or ``--synthetic`` ones (prompt ⊕ chosen of the synthetic pairs), or with
    ``--mixed-lengths`` ``mixed_length_demonstrations``, in a temp file."""
    if args.mixed_lengths:
        return write_jsonl(mixed_length_demonstrations(), "demonstrations.jsonl")
    if args.synthetic:
        pairs = preference_pairs(args)
        return write_jsonl([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs], "demonstrations.jsonl")
    return toy_path("demonstrations")


def prompts_path(args: argparse.Namespace) -> str:
    """The toy prompts, or ``--synthetic`` ones of ``--max-length`` tokens (bytes; ``--prompt-length`` if given) in a
    temp file."""
    length = args.prompt_length or (args.max_length if args.synthetic else 0)
    if not length:
        return toy_path("prompts")
    rng = random.Random(0)
    return write_jsonl([{"prompt": random_text(rng, length)} for _ in range(256)], "prompts.jsonl")


def kway_comparisons(args: argparse.Namespace) -> list[dict]:
    """K = ``--num-generations`` ranked responses per prompt: toy prompts with answers like an SFT model's samples,
    ranked by the gold judge; or ``--prompt-length`` random prompts with random responses of ``--max-new-tokens``
    bytes (EOS included), in random order."""
    rng, k = random.Random(0), args.num_generations
    if args.prompt_length:  # the byte tokenizer adds EOS to each response
        prompts = [random_text(rng, args.prompt_length) for _ in range(256)]
        return [
            {
                "prompt": p,
                "responses": [random_text(rng, args.max_new_tokens - 1) for _ in range(k)],
                "ranks": rng.sample(range(k), k),
            }
            for p in prompts
        ]

    def sample(ideal: str) -> str:
        typo = rng.randrange(len(ideal))
        return rng.choice([ideal, ideal[:-1], ideal[:typo] + rng.choice(string.ascii_lowercase) + ideal[typo + 1 :]])

    out = []
    for record in make_prompts(2048, seed=3):
        responses = [sample(ideal_response(record["prompt"])) for _ in range(k)]
        scores = [gold_score(record["prompt"], r) for r in responses]
        distinct = sorted(set(scores), reverse=True)
        if len(distinct) > 1:  # all tied: no preference, a record the reader refuses
            ranks = [distinct.index(s) for s in scores]
            out.append({"prompt": record["prompt"], "responses": responses, "ranks": ranks})
    return out
