"""The embedded default task: string reversal, and naming a word's last letter as a second skill, with a programmatic
gold judge (see ``reverse.py``); and a tool task, adding long numbers with an ``add`` tool (``tools.py``)."""

from lightning_rlhf.toy.reverse import (
    DATA_DIR,
    SECOND_SKILL_HELD_OUT,
    TOY_SCHEME,
    gold_score,
    make_demonstrations,
    make_prompts,
    resolve_source,
    second_skill_held_out,
    toy_path,
)
from lightning_rlhf.toy.tools import ToolEnv

__all__ = [
    "DATA_DIR",
    "SECOND_SKILL_HELD_OUT",
    "TOY_SCHEME",
    "ToolEnv",
    "gold_score",
    "make_demonstrations",
    "make_prompts",
    "resolve_source",
    "second_skill_held_out",
    "toy_path",
]
