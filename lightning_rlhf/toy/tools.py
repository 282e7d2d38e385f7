"""The toy tool task: reversing words too long for the 2-layer default model to reverse itself, with a ``reverse``
tool it can call (``ToolEnv``, an environment of several turns; ``lightning_rlhf.environments``).

An episode: the user asks ``"Reverse: <word>"`` (a word of ``MIN_LENGTH``-``MAX_LENGTH`` letters, twice the
embedded task's); the policy either answers at once or calls the tool, reads its result and answers with it. The
episode's reward is the gold judge's similarity of the answer to the reversed word (``reverse.gold_score``).

The demonstrations (``toy:tool_demonstrations``, conversations) use the tool in only ``TOOL_SHARE`` of them and
reverse the word themselves in the rest, always rightly: SFT learns both ways, and mostly the one it cannot do well.
RL, rewarded for right answers, has to find out that calling the tool pays.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

from lightning_rlhf.environments import Observation, ToolEnvironment
from lightning_rlhf.toy.reverse import ALPHABET, PROMPT_PREFIX, gold_score

MIN_LENGTH, MAX_LENGTH = 10, 16
TOOL_SHARE = 0.3  # of the demonstrations call the tool
TOOL_DEMONSTRATIONS, TOOL_PROMPTS, TOOL_HELD_OUT = 2000, 1000, 300


def reverse(text: str) -> str:
    """Reverse a text, character by character.

    Args:
        text: The text to reverse.
    """
    return text[::-1]


def tool_call_text(word: str) -> str:
    """The policy's turn that calls ``reverse`` on ``word`` (``environments``' plain-text format)."""
    return "<tool_call>" + json.dumps({"name": "reverse", "arguments": {"text": word}}) + "</tool_call>"


def _question(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPT_PREFIX}{word}"}]


def _word_of(prompt: Any) -> str:
    content = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    if not content.startswith(PROMPT_PREFIX):
        raise ValueError(f"not a toy tool prompt: {prompt!r}")
    return content[len(PROMPT_PREFIX) :].strip()


class ToolEnv(ToolEnvironment):
    """``"Reverse: <word>"``, answered at once or after calling ``reverse``; rewarded by the gold judge."""

    tools = (reverse,)

    def reset(self, record: Mapping[str, Any]) -> Observation:
        self.word = _word_of(record["prompt"])
        return _question(self.word)

    def score(self, answer: str) -> float:
        return gold_score(f"{PROMPT_PREFIX}{self.word}\n", answer)


def _words(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng, words = random.Random(seed), {}
    while len(words) < n:
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))
        if word not in exclude:
            words[word] = None
    return list(words)


def make_tool_demonstrations(n: int = TOOL_DEMONSTRATIONS, seed: int = 10) -> list[dict[str, Any]]:
    """``n`` conversations: a share ``TOOL_SHARE`` call the tool, then answer with its result; the rest answer."""
    rng, records = random.Random(seed), []
    for word in _words(n, seed):
        answer = {"role": "assistant", "content": reverse(word)}
        if rng.random() < TOOL_SHARE:
            turns = [
                {"role": "assistant", "content": tool_call_text(word)},
                {"role": "tool", "content": reverse(word)},
                answer,
            ]
        else:
            turns = [answer]
        records.append({"messages": _question(word) + turns})
    return records


def make_tool_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` prompt records (chat messages), none of their words demonstrated (nor, for the held-out seed, among
    the training prompts')."""
    exclude = set(_words(TOOL_DEMONSTRATIONS, 10))
    if seed != 11:
        exclude |= set(_words(TOOL_PROMPTS, 11, exclude))
    return [{"prompt": _question(word)} for word in _words(n, seed, exclude)]
