"""Writes the Caesar-shift task's files for ``lightning-rlhf pipeline`` (README, "Your own task: a worked example"):

    python examples/own_task/make_data.py --output outputs/own_task

``demonstrations.jsonl``: ``--demonstrations`` prompts with a written answer, like data written by people, imperfect
in one systematic way: a share (``--error_rate``, default half) leave the last letter unshifted (``"ifmmp"`` written
``"ifmmo"``). Random slips would average out under greedy decoding; a systematic one leaves the SFT model something
for the judge's rankings to fix. ``prompts.jsonl``: ``--prompts`` further prompts with no answer, none of them a
demonstration's, to rank and to train the policy on (the pipeline holds a seeded share of them out for evaluation).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the clone's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.own_task.judge import PREFIX, shifted

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct random words of 3-8 letters, none in ``exclude``."""
    drawn: dict[str, None] = {}
    while len(drawn) < n:
        word = "".join(rng.choices(LETTERS, k=rng.randint(3, 8)))
        if word not in exclude:
            drawn[word] = None
    return list(drawn)


def demonstration(word: str, rng: random.Random, error_rate: float) -> dict[str, str]:
    response = shifted(word)
    if rng.random() < error_rate:
        response = response[:-1] + word[-1]  # the systematic error: the last letter left as it was
    return {"prompt": f"{PREFIX}{word}\n", "response": response}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/own_task"), help="directory to write into")
    parser.add_argument("--demonstrations", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=8000)
    parser.add_argument("--error_rate", type=float, default=0.5, help="share of demonstrations with the error")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    demonstrated = words(args.demonstrations, rng)
    prompted = words(args.prompts, rng, exclude=set(demonstrated))
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "demonstrations.jsonl").open("w") as out:
        out.writelines(json.dumps(demonstration(w, rng, args.error_rate)) + "\n" for w in demonstrated)
    with (args.output / "prompts.jsonl").open("w") as out:
        out.writelines(json.dumps({"prompt": f"{PREFIX}{w}\n"}) + "\n" for w in prompted)
    print(f"{args.demonstrations} demonstrations and {args.prompts} prompts written to {args.output}")


if __name__ == "__main__":
    main()
