"""The embedded toy task's two skills: reversal (what RL trains) and naming the last letter (the second skill SFT also
learns, which RL never sees), with one gold judge for both, and the shipped data regenerated exactly by
scripts/make_toy_data.py."""

import json
import runpy

import pytest

from lightning_rlhf.data.records import read_records
from lightning_rlhf.toy import gold_score, second_skill_held_out, toy_path
from lightning_rlhf.toy.reverse import (
    PROMPT_PREFIX,
    SECOND_SKILL_DEMONSTRATIONS,
    SECOND_SKILL_HELD_OUT,
    SECOND_SKILL_PREFIX,
    make_demonstrations,
    make_second_skill_demonstrations,
    with_second_skill,
)


def test_the_gold_judge_scores_each_skill_by_its_own_answer():
    """ "Last: abcd" is answered "d", "Reverse: abcd" "dcba". SequenceMatcher's ratio 2·M / (|a| + |b|): "dcba"
    against "d" matches one character, 2·1 / 5 = 0.4; "abcd" against "dcba" one ("a" or another single one),
    2·1 / 8 = 0.25. Catches a judge that reverses every answer (the second skill's right answer would score 0.4) or
    refuses the second skill's prompts."""
    assert gold_score(f"{SECOND_SKILL_PREFIX}abcd\n", "d") == 1.0
    assert gold_score(f"{SECOND_SKILL_PREFIX}abcd\n", "dcba") == 0.4
    assert gold_score(f"{PROMPT_PREFIX}abcd\n", "dcba") == 1.0
    assert gold_score(f"{PROMPT_PREFIX}abcd\n", "abcd") == 0.25
    with pytest.raises(ValueError, match="not a toy prompt"):
        gold_score("Shout: abcd\n", "ABCD")


def test_the_second_skill_is_placed_among_the_reversals_which_keep_their_order():
    """Catches the mix losing or duplicating a record, or reordering the reversals (their validation split and the
    systematic-error pattern would change with it)."""
    reversals, seconds = make_demonstrations(40, seed=0), make_second_skill_demonstrations(10, seed=3)
    mixed = with_second_skill(reversals, seconds)
    assert len(mixed) == 50
    assert [r for r in mixed if r["prompt"].startswith(PROMPT_PREFIX)] == reversals
    assert [r for r in mixed if r["prompt"].startswith(SECOND_SKILL_PREFIX)] == seconds
    assert mixed[:10] != reversals[:10]  # some land early, not all appended at the end
    assert all(
        r["response"] == r["prompt"].strip()[-1] for r in seconds
    )  # the second skill is never demonstrated wrong


def test_the_second_skills_held_out_prompts_are_distinct_and_never_trained_on():
    """Held out: distinct, never demonstrated, never among PPO-ptx's texts; a prefix of one fixed list (300 of them are
    the first 300 of 1,000), and no more than that list. Catches evaluating the second skill on prompts SFT or PPO-ptx
    trained on, a prompt counted twice, and --eval_prompts above 1,000 quietly reaching prompts the texts may hold."""
    demonstrated = {r["prompt"] for r in make_second_skill_demonstrations(SECOND_SKILL_DEMONSTRATIONS)}
    texts = {json.loads(line)["text"] for line in open(toy_path("second_skill_texts"))}
    held_out = second_skill_held_out(SECOND_SKILL_HELD_OUT)
    assert len(held_out) == len(set(held_out)) == 1000 and second_skill_held_out(300) == held_out[:300]
    assert not demonstrated & set(held_out)
    assert not {prompt + prompt.strip()[-1] for prompt in held_out} & texts
    assert all(prompt.startswith(SECOND_SKILL_PREFIX) for prompt in held_out)
    with pytest.raises(ValueError, match="holds out 1000 prompts, not 1001"):
        second_skill_held_out(1001)


def test_the_shipped_toy_data_is_what_make_toy_data_writes(tmp_path, monkeypatch):
    """scripts/make_toy_data.py run into a scratch directory writes the shipped files byte for byte: 2,000 reversals
    with 100 demonstrations of the second skill among them, and 1,000 fresh examples of it as PPO-ptx's texts
    (prompt then answer, as SFT renders a demonstration).
    Catches shipped data edited by hand, or a generator change not followed by regenerating the data."""
    import lightning_rlhf.toy as toy

    monkeypatch.setattr(toy, "DATA_DIR", tmp_path)
    runpy.run_path("scripts/make_toy_data.py", run_name="__main__")
    for name in ("demonstrations", "second_skill_texts", "prompts", "comparisons"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == open(toy_path(name), "rb").read(), name
    demonstrations, _ = read_records("toy:demonstrations", "demonstration")
    seconds = [r.fields for r in demonstrations if r.fields["prompt"].startswith(SECOND_SKILL_PREFIX)]
    assert (len(demonstrations), len(seconds)) == (2100, SECOND_SKILL_DEMONSTRATIONS)
    texts = [json.loads(line)["text"] for line in open(toy_path("second_skill_texts"))]
    assert len(set(texts)) == 1000 and not {r["prompt"] + r["response"] for r in seconds} & set(texts)  # fresh ones
    assert all(text.startswith(SECOND_SKILL_PREFIX) and text[-1] == text[:-2][-1] for text in texts)  # right answers
