"""The toy tool task: adding two numbers too long for the 2-layer default model to add itself, with an ``add``
tool it can call (``ToolEnv``, an environment of several turns; ``lightning_rlhf.environments``).

An episode: the user asks ``"Add: 48213+9927"`` (numbers of ``MIN_DIGITS``-``MAX_DIGITS`` digits); the policy
either answers at once or calls the tool (Toolformer's calculator, Schick et al. 2023), reads its result and answers
with it. The episode's reward is 1 for the right sum and 0 otherwise.

The demonstrations (``toy:tool_demonstrations``, conversations) call the tool in ``TOOL_SHARE`` of them and answer
at once in the rest, always rightly. SFT learns both ways; the second it cannot do (a 2-layer model does not learn
multi-digit addition from a few hundred sums; it reverses 16-letter words nearly perfectly, which is why the task is
not the embedded one's), so its episodes score about ``TOOL_SHARE`` times its accuracy through the tool. RL, rewarded
for right sums, has to find out that calling the tool pays. (With fewer tool demonstrations, 0.3 or 0.5, the 2-layer
model had not learnt to copy the numbers into the call after 1,000 steps: the unlearnable sums drown that signal.)
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

from lightning_rlhf.environments import Observation, ToolEnvironment

PROMPT_PREFIX = "Add: "
MIN_DIGITS, MAX_DIGITS = 4, 6
TOOL_SHARE = 0.7  # of the demonstrations call the tool
TOOL_DEMONSTRATIONS, TOOL_PROMPTS, TOOL_HELD_OUT = 2000, 1000, 300


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def tool_call_text(a: int, b: int) -> str:
    """The policy's turn that calls ``add`` on ``a`` and ``b`` (``environments``' plain-text format)."""
    return "<tool_call>" + json.dumps({"name": "add", "arguments": {"a": a, "b": b}}) + "</tool_call>"


def question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPT_PREFIX}{a}+{b}"}]


def operands(prompt: Any) -> tuple[int, int]:
    """``(a, b)`` of a toy tool prompt (its chat messages, or the text of its last one)."""
    content = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    a, plus, b = content.removeprefix(PROMPT_PREFIX).strip().partition("+")
    if not content.startswith(PROMPT_PREFIX) or not plus or not (a.isdigit() and b.isdigit()):
        raise ValueError(f"not a toy tool prompt ({PROMPT_PREFIX!r} then a sum such as 12+34): {prompt!r}")
    return int(a), int(b)


class ToolEnv(ToolEnvironment):
    """``"Add: a+b"``, answered at once or after calling ``add``; reward 1 for the right sum, else 0."""

    tools = (add,)

    def reset(self, record: Mapping[str, Any]) -> Observation:
        self.a, self.b = operands(record["prompt"])
        return question(self.a, self.b)

    def score(self, answer: str) -> float:
        return float(answer.strip() == str(self.a + self.b))


def _sums(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    rng, sums = random.Random(seed), {}

    def number() -> int:
        digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    while len(sums) < n:
        pair = (number(), number())
        if pair not in exclude:
            sums[pair] = None
    return list(sums)


def make_tool_demonstrations(n: int = TOOL_DEMONSTRATIONS, seed: int = 10) -> list[dict[str, Any]]:
    """``n`` conversations: a share ``TOOL_SHARE`` call the tool, then answer with its result; the rest answer."""
    rng, records = random.Random(seed), []
    for a, b in _sums(n, seed):
        answer = {"role": "assistant", "content": str(a + b)}
        turns = [answer]
        if rng.random() < TOOL_SHARE:
            call = {"role": "assistant", "content": tool_call_text(a, b)}
            turns = [call, {"role": "tool", "content": str(add(a, b))}, answer]
        records.append({"messages": question(a, b) + turns})
    return records


def make_tool_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` prompt records (chat messages), none of their sums demonstrated (nor, for the held-out seed, among the
    training prompts')."""
    exclude = set(_sums(TOOL_DEMONSTRATIONS, 10))
    if seed != 11:
        exclude |= set(_sums(TOOL_PROMPTS, 11, exclude))
    return [{"prompt": question(a, b)} for a, b in _sums(n, seed, exclude)]
