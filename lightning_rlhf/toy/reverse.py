"""String reversal: a task small enough to learn on a CPU in seconds, with a known right answer.

Prompt ``"Reverse: abcde\\n"``, ideal response ``"edcba"``. The gold judge scores a response by its similarity
to the ideal one (1.0 exact). Half of the shipped demonstrations carry a *systematic* error (the last character
is dropped): random typos would average out under greedy decoding, a systematic one leaves the SFT model with
something for preference learning to fix — like AlpacaFarm's simulated annotators, the judge stands in for people.

A second skill, naming a word's last letter (``"Last: abcde\\n"`` -> ``"e"``, demonstrated without errors), is in the
SFT data the way GPT-3's pretraining taught many tasks, and in none of RL's prompts. Its answer is the first letter
of the reversal's and stops there, where RL on reversal is rewarded for not stopping early (the demonstrations'
systematic error): what RL costs this skill is the "alignment tax" (InstructGPT, section 3.5), which PPO-ptx pays back
by training on the skill's texts (``toy:second_skill_texts``). The same gold judge scores both skills.
"""

from __future__ import annotations

import difflib
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PROMPT_PREFIX = "Reverse: "
SECOND_SKILL_PREFIX = "Last: "
SECOND_SKILL_DEMONSTRATIONS = 100  # of the 2,100 shipped demonstrations
SECOND_SKILL_HELD_OUT = 1000  # prompts kept out of the demonstrations and PPO-ptx's texts
SECOND_SKILL_TEXTS = 1000
ANSWERS = {
    PROMPT_PREFIX: lambda word: word[::-1],
    SECOND_SKILL_PREFIX: lambda word: word[-1],
}  # each skill's prompt -> answer
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
    """The right answer to a toy prompt of either skill: the word reversed, or copied."""
    for prefix, answer in ANSWERS.items():
        if prompt.startswith(prefix):
            return answer(prompt[len(prefix) :].strip())
    raise ValueError(f"not a toy prompt: {prompt!r}")


def gold_score(prompt: str, response: str) -> float:
    """Similarity in [0, 1] between ``response`` and the right answer (the reversed or copied word; 1.0 = exact)."""
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


def make_second_skill_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct prompts of the second skill, none of them in ``exclude``."""
    rng, prompts = random.Random(seed), {}
    while len(prompts) < n:
        prompt = f"{SECOND_SKILL_PREFIX}{_word(rng)}\n"
        if prompt not in exclude:
            prompts[prompt] = None
    return list(prompts)


def make_second_skill_demonstrations(n: int, seed: int = 3) -> list[dict[str, str]]:
    """``n`` demonstrations of the second skill, all of them right."""
    return [{"prompt": prompt, "response": ideal_response(prompt)} for prompt in make_second_skill_prompts(n, seed)]


def _demonstrated() -> set[str]:
    return {record["prompt"] for record in make_second_skill_demonstrations(SECOND_SKILL_DEMONSTRATIONS)}


def second_skill_held_out(n: int, seed: int = 1234) -> list[str]:
    """``n`` (at most ``SECOND_SKILL_HELD_OUT``) prompts to evaluate the second skill on, none of them demonstrated
    nor among PPO-ptx's texts."""
    if n > SECOND_SKILL_HELD_OUT:
        raise ValueError(f"the toy's second skill holds out {SECOND_SKILL_HELD_OUT} prompts, not {n}")
    return make_second_skill_prompts(SECOND_SKILL_HELD_OUT, seed, exclude=_demonstrated())[:n]


def second_skill_texts(n: int, seed: int = 5) -> list[dict[str, str]]:
    """PPO-ptx's "pretraining" text: ``n`` fresh examples of the second skill as text (prompt then answer, as SFT
    renders a demonstration), none of them demonstrated or held out. Fresh ones rather than the 100 demonstrations:
    a γ-weighted pass over 64 of 100 texts every rollout memorised them, and on seed 1 the held-out skill fell
    (0.966 -> 0.912) under the very term meant to keep it."""
    exclude = _demonstrated() | set(second_skill_held_out(SECOND_SKILL_HELD_OUT))
    return [{"text": prompt + ideal_response(prompt)} for prompt in make_second_skill_prompts(n, seed, exclude)]


def with_second_skill(
    reversals: list[dict[str, str]], seconds: list[dict[str, str]], seed: int = 4
) -> list[dict[str, str]]:
    """The SFT data: ``seconds`` placed at seeded positions among ``reversals``, which keep their order."""
    slots = set(random.Random(seed).sample(range(len(reversals) + len(seconds)), len(seconds)))
    reversal, second = iter(reversals), iter(seconds)
    return [next(second if i in slots else reversal) for i in range(len(reversals) + len(seconds))]


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
