"""DataModules on Arrow: the same examples as the list-based path, tokenized once and cached on disk, a stale cache
never reused, bad records still named (or counted)."""

import json

import datasets
import numpy as np
import pytest
import torch

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, PromptDataModule
from lightning_rlhf.data import cache
from lightning_rlhf.data.records import Record, RecordError, read_records
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import IGNORE_INDEX
from tests.helpers import bpe_tokenizer
from tests.test_data import write_jsonl

TOKENIZER = load_tokenizer(None)


def list_path(kind: str, method: str, max_length: int, val_fraction: float, seed: int):
    """What ``setup`` computes, the slow way: every valid toy record in a Python list; the distinct prompts in order
    of first appearance, permuted with the seed, the first ``val_fraction`` of them held out with all their records
    (in the permutation's order, file order within a prompt); then ``Tokenizer`` over each part (train and validation
    share its report). The toy demonstrations repeat 4 prompts, so a per-record split differs from this one."""
    records, _ = read_records(f"toy:{kind}s", kind, skip_invalid=True)
    prompts = list(dict.fromkeys(json.dumps(r.fields["prompt"]) for r in records))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {prompts[i]: place for place, i in enumerate(order[: round(len(prompts) * val_fraction)])}
    tokenizer = Tokenizer(TOKENIZER, max_length, skip_invalid=True)
    train = getattr(tokenizer, method)([r for r in records if json.dumps(r.fields["prompt"]) not in held])
    val_records = [r for r in records if json.dumps(r.fields["prompt"]) in held]
    val = getattr(tokenizer, method)(sorted(val_records, key=lambda r: held[json.dumps(r.fields["prompt"])]))
    return train, val, tokenizer.report


@pytest.mark.parametrize(
    ("module", "kind", "method"),
    [
        (DemonstrationDataModule, "demonstration", "demonstrations"),
        (ComparisonDataModule, "comparison", "comparisons"),
        (PromptDataModule, "prompt", "prompts"),
    ],
)
def test_toy_examples_are_those_of_the_list_based_path(tmp_path, module, kind, method):
    """Same token ids, in the same order, in train and validation, and the same counts of cut and skipped records:
    max_length=17 cuts responses and skips the longest prompts ("Reverse: " + up to 8 letters + newline)."""
    settings = {"max_length": 17, "val_fraction": 0.1, "seed": 3}
    data = module(skip_invalid=True, cache_dir=str(tmp_path), **settings)
    data.setup("fit")
    train, val, report = list_path(kind, method, **settings)
    assert report.skipped > 0 and (report.truncated > 0 or kind == "prompt")
    assert list(data.train_examples) == train
    assert list(data.val_examples) == val
    assert data.tokenize_report == report
    if kind == "comparison":  # the normalisation set: the first 1,000 toy demonstrations
        demonstrations, _ = read_records("toy:demonstrations", "demonstration")
        expected = Tokenizer(TOKENIZER, 17, skip_invalid=True).demonstrations(demonstrations[:1000])
        assert list(data.normalize_examples) == expected


def count_maps(monkeypatch) -> list:
    calls = []
    original = datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_a_second_setup_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    """prepare_data tokenizes (one map); setup, and a later run's prepare_data and setup, only load the saved Arrow
    files, memory-mapped from the cache directory."""
    maps = count_maps(monkeypatch)
    first = DemonstrationDataModule(cache_dir=str(tmp_path), max_length=32)
    first.prepare_data()
    assert len(maps) == 1
    first.setup("fit")
    cached = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    again = DemonstrationDataModule(cache_dir=str(tmp_path), max_length=32)
    again.prepare_data()
    again.setup("fit")
    assert len(maps) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == cached  # nothing written
    assert list(again.train_examples) == list(first.train_examples)
    assert all(f["filename"].startswith(str(tmp_path)) for f in again.train_examples.cache_files)


def test_a_changed_file_or_setting_is_tokenized_again(tmp_path, monkeypatch):
    """Rewriting the file with other text of the same length at once (same size, and possibly the same mtime at the
    filesystem's resolution) must not reuse the old tokens; nor may another max_length or skip_invalid."""
    maps = count_maps(monkeypatch)
    path = tmp_path / "demos.jsonl"

    def responses(**settings) -> list[str]:
        data = DemonstrationDataModule(train_path=str(path), val_fraction=0, cache_dir=str(tmp_path / "c"), **settings)
        data.setup("fit")
        return [TOKENIZER.decode(ex["input_ids"][-4:-1]) for ex in data.train_examples]  # before EOS

    write_jsonl(path, [{"prompt": "Reverse: abc\n", "response": "cba"}])
    assert responses() == ["cba"]
    write_jsonl(path, [{"prompt": "Reverse: xyz\n", "response": "zyx"}])
    assert responses() == ["zyx"]
    assert responses() == ["zyx"] and len(maps) == 2  # unchanged: cached
    responses(max_length=64)
    responses(skip_invalid=True)
    assert len(maps) == 4


def test_the_tokenizer_fingerprint_is_stable_and_changes_with_what_changes_token_ids():
    base = cache.tokenizer_fingerprint(load_tokenizer(None))
    assert cache.tokenizer_fingerprint(load_tokenizer(None)) == base  # a fresh load of the same tokenizer
    templated = load_tokenizer(None)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    added = load_tokenizer(None)
    added.add_tokens(["<|x|>"], special_tokens=True)
    other_eos = load_tokenizer(None)
    other_eos.eos_token = "<s>"
    changed = {cache.tokenizer_fingerprint(t) for t in (templated, added, other_eos)}
    assert len(changed) == 3 and base not in changed


def test_a_bad_record_names_file_line_and_field_and_leaves_no_cache(tmp_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
    data = DemonstrationDataModule(train_path=path, cache_dir=str(tmp_path / "c"))
    with pytest.raises(RecordError, match=r"demos\.jsonl line 2: field 'response' is missing"):
        data.setup("fit")
    assert list((tmp_path / "c").iterdir()) == []


def test_an_unwritable_cache_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    data = DemonstrationDataModule(cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError, match=r"cache_dir .*file/cache: tokenized data cannot be written there \(.*is a file"):
        data.prepare_data()


def test_skipped_records_are_counted_on_the_first_and_the_cached_run(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, "{not json", {"prompt": "a"}, {"prompt": "c", "response": "d"}]
    path = write_jsonl(tmp_path / "demos.jsonl", rows)
    for _ in range(2):
        examples, report = cache.tokenized(path, "demonstration", TOKENIZER, 16, skip_invalid=True, cache_dir=tmp_path)
        assert (len(examples), report.kept, report.skipped) == (2, 2, 2)
        assert [r.split(": ")[0] for r in report.reasons] == [f"{path} line 2", f"{path} line 3"]


def test_several_tokenizing_processes_give_the_same_examples(tmp_path):
    one = DemonstrationDataModule(max_length=24, cache_dir=str(tmp_path / "one"))
    two = DemonstrationDataModule(max_length=24, cache_dir=str(tmp_path / "two"), num_proc=2)
    for data in (one, two):
        data.setup("fit")
    assert list(two.train_examples) == list(one.train_examples)
    assert list(two.val_examples) == list(one.val_examples)


def test_select_counts_over_the_chosen_rows_and_keeps_those_not_skipped():
    """Rows (skipped, truncated, texts_truncated): r0 (F, 1, 0), r1 (T, 0, 0), r2 (F, 2, 1).
    All rows: truncated 1 + 0 + 2 = 3, skipped 1, texts 1; kept r0, r2. Rows [2, 1]: truncated 2, skipped 1, texts 1;
    kept r2 alone."""
    rows = {"input_ids": [[5], [], [7, 8]], "skipped": [False, True, False]}
    rows |= {"truncated": [1, 0, 2], "texts_truncated": [0, 0, 1], "location": ["l0", "l1", "l2"]}
    dataset = datasets.Dataset.from_dict(rows | {"prompt_key": [11, 12, 13]})
    every, report = cache.select(dataset)
    assert report == cache.TokenizeReport(truncated=3, skipped=1, texts_truncated=1)
    assert list(every) == [{"input_ids": [5]}, {"input_ids": [7, 8]}]
    chosen, report = cache.select(dataset, np.array([2, 1]))
    assert report == cache.TokenizeReport(truncated=2, skipped=1, texts_truncated=1)
    assert list(chosen) == [{"input_ids": [7, 8]}]


def test_split_by_prompt_keeps_each_prompts_rows_together_by_hand():
    """Rows' prompt keys [7, 9, 7, 4, 9, 4]: prompts by first appearance 7 -> 0, 9 -> 1, 4 -> 2. With seed 0,
    ``torch.randperm(3)`` is the permutation ``order``; fraction 1/3 holds out round(3 / 3) = 1 prompt, ``order[0]``,
    with both its rows, in file order; the other four rows train, sorted. Catches a split of rows instead of prompts
    (rows of one prompt on both sides), held-out rows out of file order, and a prompt numbering that depends on the
    keys' values (np.unique's sorted order) rather than on first appearance."""
    keys = np.array([7, 9, 7, 4, 9, 4])
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    rows_of_prompt = {0: [0, 2], 1: [1, 4], 2: [3, 5]}
    train, held = cache.split_by_prompt(keys, 1 / 3, seed=0)
    assert held.tolist() == rows_of_prompt[order[0]]
    assert train.tolist() == sorted(rows_of_prompt[order[1]] + rows_of_prompt[order[2]])
    train, held = cache.split_by_prompt(keys, 2 / 3, seed=0)  # two prompts held out: in the permutation's order
    assert held.tolist() == rows_of_prompt[order[0]] + rows_of_prompt[order[1]]
    assert train.tolist() == rows_of_prompt[order[2]]


def test_split_by_prompt_of_distinct_prompts_is_the_former_per_record_split():
    """Every prompt distinct (keys need not be sorted): the split equals ``randperm(n)``'s first round(n * f) rows
    held out in its order, the rest sorted: what ``val_fraction`` held out before prompts were grouped, so data
    without repeated prompts (the toy's PPO prompts) splits exactly as before."""
    keys = np.array([50, 3, 41, 8, 77, 12, 60, 1, 29, 33])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5)).numpy()
    train, held = cache.split_by_prompt(keys, 0.3, seed=5)
    assert held.tolist() == order[:3].tolist() and train.tolist() == sorted(order[3:].tolist())


def test_the_scale_benchmark_writes_demonstrations_of_the_stated_lengths(tmp_path):
    """scripts/data_scale.py: prompts of 20-200 characters, responses of 1-80, and the same file for the same seed."""
    from scripts.data_scale import generate

    generate(300, tmp_path / "a.jsonl")
    generate(300, tmp_path / "b.jsonl")
    records, _ = read_records(str(tmp_path / "a.jsonl"), "demonstration")
    assert len(records) == 300
    assert {len(r.fields["prompt"]) for r in records} <= set(range(20, 201))
    assert {len(r.fields["response"]) for r in records} <= set(range(1, 81))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Plain and chat records side by side (the batch path groups them apart and must put them back in order), responses
# with EOS already inside, responses cut to fit max_length=24, and records skipped: prompts over max_length, a chat
# reply after a plain prompt (a rendering error). For comparisons, K = 2 and 3 in one batch.
MIXED = {
    "demonstration": [
        {"prompt": "Reverse: abc\n", "response": "cba"},
        {"prompt": user("Reverse: abcde"), "response": "edcba"},
        {"prompt": "Reverse: abcdefgh\n", "response": "hgfedcba" * 4},
        {"prompt": user("the quick brown fox jumps over the lazy dog " * 2), "response": "a"},
        {"prompt": "p", "response": "ab{eos}cd{eos}"},
        {"prompt": user("q"), "response": [{"role": "assistant", "content": "the quick brown fox jumps over"}]},
        {"prompt": "the lazy dog " * 4, "response": "x"},
        {"prompt": "p", "response": [{"role": "assistant", "content": "a"}]},
        {"prompt": user("fox"), "response": "ab{eos}c"},
    ],
    "comparison": [
        {"prompt": user("Reverse: abc"), "responses": ["cba", "abc"], "ranks": [0, 1]},
        {"prompt": "Reverse: ab\n", "responses": ["ba", "b{eos}a", "the quick brown fox jumps"], "ranks": [0, 1, 1]},
        {"prompt": "the lazy dog " * 4, "responses": ["a", "b"], "ranks": [1, 0]},
        {"prompt": user("q"), "responses": ["the quick brown fox jumps over", "x"], "ranks": [1, 0]},
        {"prompt": user("dog " * 9), "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
    ],
    "prompt": [
        {"prompt": "Reverse: abc\n"},
        {"prompt": user("the quick brown fox jumps over the lazy dog " * 2)},
        {"prompt": user("Reverse: abcde")},
        {"prompt": "the lazy dog " * 4},
        {"prompt": "ab"},
    ],
    "text": [
        {"text": "the quick brown fox"},
        {"text": "the quick brown fox jumps over the lazy dog"},
        {"text": "a"},
        {"text": "zyxwvutsrq" * 4},
    ],
}


def mixed_records(kind: str, eos: str) -> list[Record]:
    rows = json.loads(json.dumps(MIXED[kind]).replace("{eos}", eos))
    return [Record(f"records.jsonl line {i + 1}", row) for i, row in enumerate(rows)]


@pytest.mark.parametrize("kind", list(MIXED))
@pytest.mark.parametrize("style", ["byte", "chatml"])
def test_a_batch_is_tokenized_as_each_of_its_records_alone(tmp_path, style, kind):
    """Tokenizing the list at once (one tokenizer call per list of texts, one template call per list of
    conversations) gives each record the example, the skip and the counts it gets tokenized alone, on the list path and
    in the Arrow cache (one datasets.map batch); the batch does cut and skip something, for both tokenizers."""
    tokenizer = TOKENIZER if style == "byte" else bpe_tokenizer("chatml")
    records = mixed_records(kind, tokenizer.eos_token)
    together = Tokenizer(tokenizer, 24, skip_invalid=True)
    alone = [Tokenizer(tokenizer, 24, skip_invalid=True).examples(kind, [record])[0] for record in records]
    assert together.examples(kind, records) == alone
    total = cache.TokenizeReport()
    for _, counts in alone:
        total.add(counts)
    assert together.report == total
    if kind == "text":
        assert total.texts_truncated > 0
    else:
        assert total.skipped > 0 and (total.truncated > 0 or kind == "prompt")

    path = write_jsonl(tmp_path / "records.jsonl", [record.fields for record in records])
    rows, _ = cache.tokenized(path, kind, tokenizer, 24, skip_invalid=True, cache_dir=tmp_path / "cache")
    columns = list(cache.FEATURES[kind])
    for row, (example, counts) in zip(rows, alone, strict=True):
        assert {name: row[name] for name in columns} == (example or cache.EMPTY[kind])
        assert (row["skipped"], row["truncated"], row["texts_truncated"]) == (
            bool(counts.skipped),
            counts.truncated,
            counts.texts_truncated,
        )


def test_mixed_byte_demonstrations_worked_by_hand():
    """Byte tokenizer, one token per byte, max_length=24; chat prompts render as '<|user|>TEXT\\n<|assistant|>' and
    a reply as 'TEXT\\n' (the template closes the turn with a newline, so EOS is appended after it):
    - 'Reverse: abc\\n' (13) + 'cba' (3) + EOS = 17 tokens, nothing cut;
    - '<|user|>Reverse: abcde\\n<|assistant|>' is 8 + 14 + 1 + 13 = 36 tokens, over 24 - 1: skipped;
    - 'Reverse: abcdefgh\\n' (18) leaves 6 of the 33 response tokens: 'hgfedc', truncated;
    - 'p' + 'ab</s>': the response ends at its first EOS, 'cd</s>' dropped."""
    records = mixed_records("demonstration", TOKENIZER.eos_token)
    tokenizer = Tokenizer(TOKENIZER, 24, skip_invalid=True)
    (first, _), (second, _), (third, third_counts), _, (fifth, _), *_ = tokenizer.examples("demonstration", records)

    def ids(text: str) -> list[int]:
        return TOKENIZER(text, add_special_tokens=False)["input_ids"]

    eos = TOKENIZER.eos_token_id
    assert first == {"input_ids": ids("Reverse: abc\ncba") + [eos], "labels": [IGNORE_INDEX] * 13 + ids("cba") + [eos]}
    assert second is None
    assert third == {"input_ids": ids("Reverse: abcdefgh\nhgfedc"), "labels": [IGNORE_INDEX] * 18 + ids("hgfedc")}
    assert third_counts == cache.TokenizeReport(truncated=1)
    assert fifth["labels"] == [IGNORE_INDEX] + ids("ab") + [eos]
