"""Record reading and validation, tokenization boundaries and truncation, collators, DataModules."""

import json
import os

import pytest
import torch

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, PromptDataModule
from lightning_rlhf.data.collate import ComparisonCollator, DemonstrationCollator, PromptCollator
from lightning_rlhf.data.loader import EpochShuffleSampler
from lightning_rlhf.data.records import Record, RecordError, read_records
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import IGNORE_INDEX
from tests.helpers import bpe_tokenizer

TOKENIZER = load_tokenizer(None)
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_records_from(tmp_path, rows, kind="demonstration"):
    return read_records(write_jsonl(tmp_path / "records.jsonl", rows), kind)


def ids(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


# -- bad input: each names the file, the record and the field ------------------------------------------


@pytest.mark.parametrize(
    ("rows", "kind", "expected"),
    [
        ([{"prompt": "a", "response": "b"}, "{not json"], "demonstration", r"bad\.jsonl line 2: invalid JSON"),
        ([{"prompt": "a"}], "demonstration", r"bad\.jsonl line 1: field 'response' is missing"),
        ([{"prompt": "a", "response": 7}], "demonstration", r"line 1: field 'response' must be a string .* got int"),
        (
            [{"prompt": [{"role": "user"}], "response": "b"}],
            "demonstration",
            r"line 1: field 'prompt': message 0 has role 'user' but no 'content' string",
        ),
        ([["a", "b"]], "demonstration", r"line 1: expected a JSON object, got list"),
        ([{"prompt": "p", "responses": ["a", "b"], "ranks": [0]}], "comparison", r"'ranks' has 1 entries but 'resp"),
        ([{"prompt": "p", "responses": ["a"], "ranks": [0]}], "comparison", r"has 1 response; a comparison needs"),
        ([{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]}], "comparison", r"all responses tie"),
        ([{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 5]}], "comparison", r"each rank must lie in 0\.\.1"),
        (
            [{"prompt": "p", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}],
            "comparison",
            r"same response .* 0 and 2",
        ),
        ([{"prompt": "p", "chosen": "a", "rejected": "a"}], "comparison", r"'chosen' and 'rejected' are the same"),
        ([{"text": ""}], "text", r"line 1: field 'text' must be a non-empty string"),
        ([{"prompt": "p", "responses": ["a", 3], "ranks": [0, 1]}], "comparison", r"field 'responses\[1\]' must be"),
        (
            [{"prompt": "p", "response": ""}],
            "demonstration",
            r"line 1: field 'response' is an empty string: a demonstration teaches the tokens of its response",
        ),
        ([{"prompt": "", "response": "r"}], "demonstration", r"field 'prompt' is an empty string: a response answers"),
        ([{"prompt": "", "responses": ["a", ""], "ranks": [0, 1]}], "comparison", r"field 'prompt' is an empty str"),
        ([{"prompt": ""}], "prompt", r"line 1: field 'prompt' is an empty string: a response answers a prompt"),
        ([{"prompt": "p", "chosen": "", "rejected": ""}], "comparison", r"'chosen' and 'rejected' are the same"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, rows, kind, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecordError, match=expected):
        read_records(path, kind)


def test_an_empty_response_is_a_response_in_comparisons_and_to_score(tmp_path):
    """Both spellings of a comparison keep an empty response, ranked as given, and so does a record to score;
    a demonstration's is refused (the mutation of refusing '' everywhere, or of accepting it in demonstrations, fails
    here or in ``test_bad_records_name_file_line_and_field``)."""
    for record, expected in (
        ({"prompt": "p", "responses": ["a", "", "b"], "ranks": [0, 2, 1]}, (["a", "", "b"], [0, 2, 1])),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, (["a", ""], [0, 1])),
        ({"prompt": "p", "chosen": "", "rejected": "a"}, (["", "a"], [0, 1])),
    ):
        [read], _ = read_records(write_jsonl(tmp_path / "c.jsonl", [record]), "comparison")
        assert (read.fields["responses"], read.fields["ranks"]) == expected
    [scored], _ = read_records(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": ""}]), "scored")
    assert scored.fields == {"prompt": "p", "response": ""}


def test_an_empty_response_tokenizes_as_the_end_of_turn_token_alone():
    """Plain text: ''  -> [EOS] after the prompt's ids; a chat prompt with an empty assistant reply -> the template's
    reply up to and including its EOS. A tokenizer that dropped '' or appended nothing fails the first assertion."""
    tokenizer = load_tokenizer(None)
    record = Record("x line 1", {"prompt": "Reverse: ab\n", "responses": ["", "ba"], "ranks": [1, 0]})
    [example] = Tokenizer(tokenizer, 64).comparisons([record])
    eos = tokenizer.eos_token_id
    assert example["response_ids"][0] == [eos]
    assert example["response_ids"][1] == tokenizer("ba", add_special_tokens=False)["input_ids"] + [eos]
    chat = bpe_tokenizer("chatml")
    prompt = [{"role": "user", "content": "hi"}]
    record = Record("x line 2", {"prompt": prompt, "responses": ["", "yo"], "ranks": [1, 0]})
    [example] = Tokenizer(chat, 64).comparisons([record])
    assert example["response_ids"][0] == [chat.eos_token_id]  # the template's reply is "<|im_end|>\n": EOS, then cut


def test_skip_invalid_counts_what_it_skipped(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, "{broken", {"prompt": "c"}, {"prompt": "d", "response": "e"}]
    records, report = read_records(write_jsonl(tmp_path / "mixed.jsonl", rows), "demonstration", skip_invalid=True)
    assert [r.fields["prompt"] for r in records] == ["a", "d"]
    assert (report.kept, report.skipped) == (2, 2)
    assert "2 invalid records skipped" in report.summary() and "line 2" in report.summary()


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RecordError, match=r"empty\.jsonl: no records"):
        read_records(str(tmp_path / "empty.jsonl"), "demonstration")


def test_unknown_file_type_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,response\na,b\n")
    with pytest.raises(RecordError, match=r"data\.csv: unknown file type '\.csv'"):
        read_records(str(tmp_path / "data.csv"), "demonstration")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_records(str(tmp_path / "nowhere.jsonl"), "demonstration")


def test_prompt_longer_than_max_length_is_an_error_or_a_counted_skip(tmp_path):
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "x" * 20, "response": "y"}, {"prompt": "ok", "response": "y"}]
    )
    records, _ = read_records(path, "demonstration")
    with pytest.raises(RecordError, match=r"long\.jsonl line 1: field 'prompt' is 20 tokens, more than max_length=10"):
        Tokenizer(TOKENIZER, max_length=10).demonstrations(records)
    tokenizer = Tokenizer(TOKENIZER, max_length=10, skip_invalid=True)
    assert len(tokenizer.demonstrations(records)) == 1 and tokenizer.report.skipped == 1


# -- sources and column mapping -----------------------------------------------------------------------

ROWS = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]


def test_json_parquet_and_saved_dataset_read_the_same_records(tmp_path):
    import datasets

    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    columns = {"prompt": "question", "response": "answer"}
    sources = [write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved"]
    for source in sources:
        records, _ = read_records(str(source), "demonstration", columns=columns)
        assert [r.fields for r in records] == [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)], source
    assert records[2].location.endswith("row 2")


# -- tokenization: the prompt/response boundary ---------------------------------------------------------


def test_demonstration_masks_the_prompt_token_for_token(tmp_path):
    records, _ = read_records_from(tmp_path, [{"prompt": "Reverse: abc\n", "response": "cba"}])
    (example,) = Tokenizer(TOKENIZER, max_length=64).demonstrations(records)
    prompt_ids = ids("Reverse: abc\n")
    assert example["input_ids"] == prompt_ids + ids("cba") + [EOS]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + ids("cba") + [EOS]


def test_chat_messages_render_through_the_chat_template(tmp_path):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    records, _ = read_records_from(tmp_path, [{"prompt": prompt, "response": "hello"}])
    (example,) = Tokenizer(TOKENIZER, max_length=128).demonstrations(records)
    prompt_text = "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert TOKENIZER.decode(example["input_ids"]) == prompt_text + "hello\n</s>"
    scored = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert TOKENIZER.decode(scored) == "hello\n</s>"
    assert example["labels"][: len(ids(prompt_text))] == [IGNORE_INDEX] * len(ids(prompt_text))


def test_long_response_is_cut_at_max_length_and_counted(tmp_path):
    records, _ = read_records_from(
        tmp_path, [{"prompt": "pp", "response": "r" * 10}, {"prompt": "pp", "response": "r"}]
    )
    tokenizer = Tokenizer(TOKENIZER, max_length=6)
    long, short = tokenizer.demonstrations(records)
    assert long["input_ids"] == ids("pp") + ids("rrrr")  # 2 prompt + 4 response tokens, EOS cut off
    assert short["input_ids"] == ids("pp") + ids("r") + [EOS]
    assert tokenizer.report.truncated == 1


# -- collators ----------------------------------------------------------------------------------------------


def test_demonstration_collator_right_pads_with_masked_labels():
    batch = DemonstrationCollator(PAD)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_prompt_collator_left_pads():
    batch = PromptCollator(PAD)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_comparison_collator_flattens_responses_and_lists_ordered_pairs():
    """Prompt A has 3 responses ranked (1, 0, 1): pairs (1 > 0) and (1 > 2), the tie 0 ~ 2 gives none.
    Prompt B has 2 responses ranked (0, 1): pair (3 > 4) in flat rows; its third slot is absent (-1)."""
    examples = [
        {"prompt_ids": [1], "response_ids": [[10], [11, 12], [13]], "ranks": [1, 0, 1]},
        {"prompt_ids": [2, 3], "response_ids": [[20], [21]], "ranks": [0, 1]},
    ]
    batch = ComparisonCollator(PAD)(examples)
    assert batch["input_ids"].tolist() == [[1, 10, PAD], [1, 11, 12], [1, 13, PAD], [2, 3, 20], [2, 3, 21]]
    assert batch["labels"][3].tolist() == [-100, -100, 20]
    assert batch["ranks"].tolist() == [[1, 0, 1], [0, 1, -1]]
    assert batch["response_index"].tolist() == [[0, 1, 2], [3, 4, -1]]
    assert sorted(map(tuple, batch["pairs"].tolist())) == [(1, 0), (1, 2), (3, 4)]


# -- DataModules ------------------------------------------------------------------------------------------


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def split(seed):
        dm = DemonstrationDataModule(train_path=path, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return {tuple(e["input_ids"]) for e in dm.train_examples}, {tuple(e["input_ids"]) for e in dm.val_examples}

    train, val = split(0)
    assert len(train) == 30 and len(val) == 10 and not train & val
    assert split(0) == (train, val) and split(1)[1] != val


def test_datamodules_default_to_the_embedded_toy_data():
    dm = DemonstrationDataModule(batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    assert TOKENIZER.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]).startswith("Reverse: ")
    prompts = PromptDataModule(batch_size=3)
    prompts.setup("fit")
    assert next(iter(prompts.train_dataloader()))["attention_mask"][:, -1].all()  # left-padded


def test_comparison_datamodule_batches_whole_prompts(tmp_path):
    rows = [
        {"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
    ]
    dm = ComparisonDataModule(train_path=write_jsonl(tmp_path / "c.jsonl", rows), val_fraction=0, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 5 and batch["pairs"].shape == (4, 2)


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    b.set_epoch(1)
    assert list(b) == list(a)
    assert torch.equal(torch.tensor(list(EpochShuffleSampler(50, seed=3))), torch.tensor(first))


def test_atomic_writes_get_the_usual_file_mode_not_mkstemps_private_one(tmp_path):
    """A written file is readable as any file the user creates (0666 minus the umask), not 0600."""
    import os
    import stat

    from lightning_rlhf.io import write_jsonl_atomic

    mask = os.umask(0o022)
    try:
        path = write_jsonl_atomic([{"a": 1}], tmp_path / "out.jsonl")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_non_utf8_line_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(RecordError, match=r"latin1\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at byte 16 of"):
        read_records(str(path), "demonstration")
    records, report = read_records(str(path), "demonstration", skip_invalid=True)
    assert [r.location for r in records] == [f"{path} line 1"] and report.skipped == 1
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "caf\xe9", "response": "b"}\n]')
    with pytest.raises(RecordError, match=r"latin1\.json line 3: not valid UTF-8 \(byte 0xe9\)"):
        read_records(str(path), "demonstration")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    for name in ("bom.jsonl", "bom.json"):
        row = json.dumps({"prompt": "é", "response": "b"})
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (row if name.endswith("l") else f"[{row}]").encode())
        (record,), _ = read_records(str(tmp_path / name), "demonstration")
        assert record.fields == {"prompt": "é", "response": "b"}


def test_a_corrupt_parquet_file_and_a_fifo_are_clear_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RecordError, match=r"broken\.parquet: not a readable Parquet file"):
        read_records(str(tmp_path / "broken.parquet"), "demonstration")
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(RecordError, match=r"pipe\.jsonl: not a regular file"):
        read_records(str(tmp_path / "pipe.jsonl"), "demonstration")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"batch_size": 0}, r"batch_size=0: must be >= 1"),
        ({"val_batch_size": 0}, r"val_batch_size=0: must be >= 1 or None"),
        ({"max_length": 1}, r"max_length=1: must be >= 2"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0: must be in \[0, 1\)"),
    ],
)
def test_datamodule_settings_out_of_range_are_refused_naming_the_range(setting, message):
    with pytest.raises(ValueError, match=message):
        DemonstrationDataModule(**setting)


def test_validation_never_shares_a_prompt_with_training_with_three_labels_per_prompt(tmp_path):
    """100 prompts, each labelled by 3 labellers (one comparison record per label, as ``label`` writes them),
    ``val_fraction=0.3``: 30 prompts with all 90 of their records held out, 70 prompts and 210 records train, and no
    prompt on both sides. A per-record split (the old one) put 55 of 60 validation prompts in training too."""
    rows = [
        {
            "prompt": f"Reverse: {i:03d}\n",
            "responses": ["a", "b", ""],
            "ranks": [labeller % 2, 1 - labeller % 2, 2],
            "labeller": f"l{labeller}",
            "item": i,
        }
        for i in range(100)
        for labeller in range(3)
    ]
    data = ComparisonDataModule(
        train_path=write_jsonl(tmp_path / "labels.jsonl", rows), val_fraction=0.3, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    decoded = {
        side: [TOKENIZER.decode(ex["prompt_ids"]) for ex in examples]
        for side, examples in (("train", data.train_examples), ("val", data.val_examples))
    }
    assert set(decoded["train"]).isdisjoint(decoded["val"])
    assert (len(set(decoded["val"])), len(decoded["val"]), len(set(decoded["train"])), len(decoded["train"])) == (
        30,
        90,
        70,
        210,
    )
    assert data.split_report.summary() == "210 train / 90 val examples of 70 / 30 distinct prompts"


def test_a_validation_file_sharing_prompts_with_training_is_reported(tmp_path):
    """A separate validation file is taken as given, but its prompts that training has too are counted and warned of."""
    train = [{"prompt": f"p{i}", "chosen": "a", "rejected": ""} for i in range(4)]
    val = [{"prompt": p, "chosen": "b", "rejected": "a"} for p in ("p1", "p3", "q")]
    data = ComparisonDataModule(
        train_path=write_jsonl(tmp_path / "t.jsonl", train),
        val_path=write_jsonl(tmp_path / "v.jsonl", val),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(UserWarning, match=r"v\.jsonl: 2 of its 3 prompts are training prompts too"):
        data.setup("fit")
    assert data.split_report.shared_prompts == 2
