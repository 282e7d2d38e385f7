"""String reversal: a task small enough to learn on a CPU in seconds, with a known right answer.

Prompt ``"Reverse: abcde\\n"``, ideal response ``"edcba"``. The gold judge scores a response by its similarity
to the ideal one (1.0 exact). Half of the shipped demonstrations carry a *systematic* error (the last character
is dropped): random typos would average out under greedy decoding, a systematic one leaves the SFT model with
something for preference learning to fix — like AlpacaFarm's simulated annotators, the judge stands in for people.
"""

from __future__ import annotations

import difflib
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PROMPT_PREFIX = "Reverse: "
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


TOY_SCHEME = "toy:"


def toy_path(name: str) -> str:
    """Path of a shipped toy file, e.g. ``toy_path("demonstrations")``."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        shipped = ", ".join(f"{TOY_SCHEME}{p.stem}" for p in sorted(DATA_DIR.glob("*.jsonl")))
        raise FileNotFoundError(f"{TOY_SCHEME}{name}: the package ships no such toy data; it has {shipped}")
    return str(path)


def resolve_source(source: str) -> str:
    """``toy:NAME`` (``toy:demonstrations``, ``toy:comparisons``, ``toy:prompts``) is the toy data shipped inside the
    package, found wherever the command runs; any other source comes back as given."""
    return toy_path(source.removeprefix(TOY_SCHEME)) if source.startswith(TOY_SCHEME) else source


def _word(rng: random.Random, min_len: int = 3, max_len: int = 8) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))


def make_prompt(word: str) -> str:
    return f"{PROMPT_PREFIX}{word}\n"


def ideal_response(prompt: str) -> str:
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return prompt[len(PROMPT_PREFIX) :].strip()[::-1]


def gold_score(prompt: str, response: str) -> float:
    """Similarity in [0, 1] between ``response`` and the reversed word (1.0 = exactly right)."""
    return difflib.SequenceMatcher(None, response.strip(), ideal_response(prompt)).ratio()


def make_demonstrations(n: int, seed: int = 0, error_rate: float = 0.5) -> list[dict[str, str]]:
    """``n`` demonstrations; a fraction ``error_rate`` drop the last character of the answer."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = make_prompt(_word(rng))
        response = ideal_response(prompt)
        if rng.random() < error_rate:
            response = response[:-1]
        records.append({"prompt": prompt, "response": response})
    return records


def make_prompts(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": make_prompt(_word(rng))} for _ in range(n)]


def _corrupt(rng: random.Random, text: str) -> str:
    """``text`` with one character replaced by a different one."""
    position = rng.randrange(len(text))
    replacement = rng.choice(ALPHABET.replace(text[position], ""))
    return text[:position] + replacement + text[position + 1 :]


def make_comparisons(n: int, seed: int = 2) -> list[dict]:
    """``n`` prompts, each with 3-4 candidate responses ranked by ``gold_score`` (0 best, equal scores tie).

    Candidates: the ideal reversal, the systematic error of the demonstrations (last character dropped), one
    random corruption, and for half the prompts the word itself unreversed. Duplicates (e.g. a palindrome) are
    kept once; the order of the candidates is shuffled so that position says nothing about rank.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = _word(rng)
        prompt = make_prompt(word)
        ideal = ideal_response(prompt)
        candidates = [ideal, ideal[:-1], _corrupt(rng, ideal)]
        if rng.random() < 0.5:
            candidates.append(word)
        responses = list(dict.fromkeys(candidates))
        rng.shuffle(responses)
        scores = [round(gold_score(prompt, r), 6) for r in responses]
        distinct = sorted(set(scores), reverse=True)
        records.append({"prompt": prompt, "responses": responses, "ranks": [distinct.index(s) for s in scores]})
    return records
