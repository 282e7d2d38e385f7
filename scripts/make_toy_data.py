"""Regenerate the toy data shipped in lightning_rlhf/toy/data (deterministic).

python scripts/make_toy_data.py
"""

import json

from lightning_rlhf.toy import DATA_DIR, make_demonstrations, make_prompts
from lightning_rlhf.toy.reverse import (
    SECOND_SKILL_DEMONSTRATIONS,
    SECOND_SKILL_TEXTS,
    make_comparisons,
    make_second_skill_demonstrations,
    second_skill_texts,
    with_second_skill,
)
from lightning_rlhf.toy.tools import TOOL_HELD_OUT, TOOL_PROMPTS, make_tool_demonstrations, make_tool_prompts


def write_jsonl(name: str, records: list[dict]) -> None:
    with (DATA_DIR / f"{name}.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    second_skill = make_second_skill_demonstrations(SECOND_SKILL_DEMONSTRATIONS)
    write_jsonl("demonstrations", with_second_skill(make_demonstrations(2000, seed=0), second_skill))
    write_jsonl("second_skill_texts", second_skill_texts(SECOND_SKILL_TEXTS))  # PPO-ptx's
    write_jsonl("prompts", make_prompts(500, seed=1))
    write_jsonl("comparisons", make_comparisons(2000, seed=2))
    write_jsonl("tool_demonstrations", make_tool_demonstrations())  # conversations (toy.tools)
    write_jsonl("tool_prompts", make_tool_prompts(TOOL_PROMPTS, seed=11))
    write_jsonl("tool_held_out", make_tool_prompts(TOOL_HELD_OUT, seed=12))
