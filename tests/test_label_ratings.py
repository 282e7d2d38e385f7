"""Likert ratings on the labelling page (1..7 per response, optional) and the KTO records `--aggregate --kto`
makes of them, or of the rankings where an item has no ratings."""

import json

import pytest
from starlette.testclient import TestClient

from lightning_rlhf.commands import label
from lightning_rlhf.commands.label.app import make_app
from lightning_rlhf.commands.label.store import LabelStore, read_items
from lightning_rlhf.data.records import RecordError, validate_unpaired

SAMPLES = [
    {"prompt": "p0", "responses": ["a", "b", "c", "d"]},
    {"prompt": "p1", "responses": ["e", "f"]},
    {"prompt": "p2", "responses": ["g", "h", "i"]},
]


@pytest.fixture
def client_and_output(tmp_path):
    samples, out = tmp_path / "samples.jsonl", tmp_path / "labels.jsonl"
    samples.write_text("".join(json.dumps(record) + "\n" for record in SAMPLES))
    return TestClient(make_app(LabelStore(read_items(str(samples)), out))), out


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# --- the store ----------------------------------------------------------------------------------------------------


def test_ratings_are_kept_with_the_label_and_optional(client_and_output):
    """[6, null, 2, 7] is stored as given (null: not rated); a label without ratings, or with every one null, is
    stored without the field, exactly as before ratings. Catches: ratings dropped from the record, a null refused
    or turned into a number, an all-null list stored."""
    client, out = client_and_output
    bodies = [
        {"labeller": "alice", "item": 0, "ranks": [0, 1, 2, 3], "ratings": [6, None, 2, 7]},
        {"labeller": "alice", "item": 1, "ranks": [1, 0]},
        {"labeller": "alice", "item": 2, "ranks": [0, 1, 2], "ratings": [None, None, None]},
    ]
    for body in bodies:
        assert client.post("/api/label", json=body).status_code == 200
    written = lines(out)
    assert written[0]["ratings"] == [6, None, 2, 7]
    assert "ratings" not in written[1] and "ratings" not in written[2]


@pytest.mark.parametrize(
    "ratings, words",
    [
        ([6, 2], "field 'ratings' must be a list of 4 entries, one per response (1..7 or null), got 2 entries"),
        ("6,2,1,1", "field 'ratings' must be a list of 4 entries, one per response (1..7 or null), got a str"),
        ([6, "5", 1, 1], "field 'ratings[1]' = \"5\" is not an integer: rate 1..7, or null"),
        ([6, 2, 4.5, 1], "field 'ratings[2]' = 4.5 is not an integer"),
        ([True, 2, 1, 1], "field 'ratings[0]' = true is not an integer"),
        ([6, 2, 1, 0], "field 'ratings[3]' = 0 is out of range: 1 (worst) to 7 (best), or null"),
        ([6, 8, 1, 1], "field 'ratings[1]' = 8 is out of range"),
    ],
)
def test_bad_ratings_get_a_422_naming_the_field_and_write_nothing(client_and_output, ratings, words):
    """Each case catches the removal of its own check: the length, the list, the integer (a string, a float), the
    bool (true is an int in Python and would pass as a 1), and either end of the 1..7 range."""
    client, out = client_and_output
    answer = client.post("/api/label", json={"labeller": "bob", "item": 0, "ranks": [0, 1, 2, 3], "ratings": ratings})
    assert answer.status_code == 422 and words in answer.json()["error"]
    assert out.read_bytes() == b""


def test_aggregate_refuses_bad_ratings_in_a_labels_file_naming_the_line(tmp_path):
    """A hand-edited labels file with a rating of 9 on line 2 is refused before anything is written. Catches:
    read_labels not checking ratings (the KTO step would average a 9 in)."""
    labels = tmp_path / "labels.jsonl"
    good = {**SAMPLES[1], "ranks": [0, 1], "labeller": "alice", "item": 1, "ratings": [6, 2]}
    labels.write_text(json.dumps(good) + "\n" + json.dumps({**good, "labeller": "bob", "ratings": [9, 1]}) + "\n")
    kto = tmp_path / "kto.jsonl"
    with pytest.raises(RecordError, match=r"labels.jsonl line 2: field 'ratings\[0\]' = 9 is out of range"):
        label.main(["--aggregate", str(labels), "--output", str(tmp_path / "comparisons.jsonl"), "--kto", str(kto)])
    assert not kto.exists()


# --- KTO records from ratings, else rankings -----------------------------------------------------------------------

LABELS = [
    {**SAMPLES[0], "labeller": "alice", "item": 0, "ranks": [0, 1, 2, 3], "ratings": [7, 6, 5, None]},
    {**SAMPLES[0], "labeller": "bob", "item": 0, "ranks": [1, 0, 2, 3], "ratings": [5, 3, None, None]},
    {**SAMPLES[1], "labeller": "alice", "item": 1, "ranks": [0, 1], "ratings": [4, 3]},
    {**SAMPLES[1], "labeller": "bob", "item": 1, "ranks": [1, 0]},
    {**SAMPLES[2], "labeller": "bob", "item": 2, "ranks": [0, 0, 1]},
    {**SAMPLES[2], "labeller": "alice", "item": 2, "ranks": [1, 0, 2]},
]


def aggregate_kto(tmp_path, capsys, *options: str) -> tuple[list[dict], str]:
    labels, kto = tmp_path / "labels.jsonl", tmp_path / "kto.jsonl"
    labels.write_text("".join(json.dumps(record) + "\n" for record in LABELS))
    label.main(
        ["--aggregate", str(labels), "--output", str(tmp_path / "comparisons.jsonl"), "--kto", str(kto), *options]
    )
    return lines(kto), capsys.readouterr().out


def test_kto_records_from_mean_ratings_else_each_labels_ranking(tmp_path, capsys):
    """Item 0, both rated: a (7, 5) mean 6 -> desirable; b (6, 3) mean 4.5 -> neutral, left out; c (5, bob did not
    rate it) mean 5 over the one labeller who rated it -> desirable (2.5 if bob's null counted as 0); d rated by
    nobody -> unrated, left out. Item 1, rated by alice only: e 4 -> neutral; f 3 -> undesirable; bob's ranking
    (f best) is not used, the item has ratings. Item 2, no ratings: each label's ranking, labellers in name order:
    alice [1, 0, 2] -> h desirable, i undesirable; bob [0, 0, 1] -> g and h desirable, i undesirable.
    3 records from ratings + 5 from rankings = 8; 2 neutral (b, e) and 1 unrated (d) left out.
    Catches: a neutral band that is not 3 < mean < 5 on either side (b, e, f), a mean over every labeller (c),
    falling back to rankings when one label of a rated item has none (f), the fallback skipped, wrong counts."""
    records, printed = aggregate_kto(tmp_path, capsys)
    assert [(r["prompt"], r["completion"], r["label"]) for r in records] == [
        ("p0", "a", True),
        ("p0", "c", True),
        ("p1", "f", False),
        ("p2", "h", True),
        ("p2", "i", False),
        ("p2", "g", True),
        ("p2", "h", True),
        ("p2", "i", False),
    ]
    assert all(set(r) == {"prompt", "completion", "label"} for r in records)
    assert all(validate_unpaired(r)["desirable"] == [int(r["label"])] for r in records)  # what KTO's data reads
    assert "8 KTO records written to" in printed and "(3 from ratings, 5 from rankings)" in printed
    assert "left out: 2 neutral" in printed and "1 unrated" in printed


def test_kto_falls_back_to_the_consensus_ranking_with_consensus(tmp_path, capsys):
    """--consensus borda: item 2's labels [1, 0, 2] and [0, 0, 1] give g ½ (tie with h) + 0 + 2 (over i, twice)
    = 2.5 points, h 1 + ½ + 2 = 3.5, i 0: consensus [1, 0, 2], so one record each for h (desirable) and i
    (undesirable) instead of a set per label; the rated items are as without --consensus. Catches: the per-label
    fallback used with --consensus."""
    records, printed = aggregate_kto(tmp_path, capsys, "--consensus", "borda")
    assert [(r["prompt"], r["completion"], r["label"]) for r in records] == [
        ("p0", "a", True),
        ("p0", "c", True),
        ("p1", "f", False),
        ("p2", "h", True),
        ("p2", "i", False),
    ]
    assert "5 KTO records written to" in printed and "(3 from ratings, 2 from rankings)" in printed
