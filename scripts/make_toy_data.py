"""Regenerate the toy data shipped in lightning_rlhf/toy/data (deterministic).

python scripts/make_toy_data.py
"""

import json

from lightning_rlhf.toy import DATA_DIR, make_demonstrations, make_prompts
from lightning_rlhf.toy.reverse import make_comparisons


def write_jsonl(name: str, records: list[dict]) -> None:
    with (DATA_DIR / f"{name}.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    write_jsonl("demonstrations", make_demonstrations(2000, seed=0))
    write_jsonl("prompts", make_prompts(500, seed=1))
    write_jsonl("comparisons", make_comparisons(2000, seed=2))
