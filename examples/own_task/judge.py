"""The judge of the Caesar-shift task: ``score(prompt, response)`` in [0, 1], what ``--judge
examples.own_task.judge.score`` names. It is the only code of the user's that ``lightning-rlhf pipeline`` needs.

Prompt ``"Shift: hello\\n"``, right answer ``"ifmmp"``: each letter moved one on in the alphabet, ``z`` to ``a``.
Partial credit: the share of positions that hold the right letter, over the longer of the answer and the response, so
that a missing, wrong or extra letter each costs the same (``"ifmmo"`` 0.8, ``"ifmm"`` 0.8, ``"ifmmpp"`` 5/6).
"""

from __future__ import annotations

PREFIX = "Shift: "


def shifted(word: str) -> str:
    """``word`` with each letter moved one on, ``z`` to ``a``."""
    return "".join(chr((ord(letter) - ord("a") + 1) % 26 + ord("a")) for letter in word)


def answer(prompt: str) -> str:
    if not prompt.startswith(PREFIX):
        raise ValueError(f"not a Caesar-shift prompt (it starts {PREFIX!r}): {prompt!r}")
    return shifted(prompt.removeprefix(PREFIX).strip())


def score(prompt: str, response: str) -> float:
    right, given = answer(prompt), response.strip()
    matches = sum(a == b for a, b in zip(right, given, strict=False))
    return matches / max(len(right), len(given), 1)
