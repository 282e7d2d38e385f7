"""The embedded default task: string reversal with a programmatic gold judge (see ``reverse.py``)."""

from lightning_rlhf.toy.reverse import (
    DATA_DIR,
    TOY_SCHEME,
    gold_score,
    make_demonstrations,
    make_prompts,
    resolve_source,
    toy_path,
)

__all__ = ["DATA_DIR", "TOY_SCHEME", "gold_score", "make_demonstrations", "make_prompts", "resolve_source", "toy_path"]
