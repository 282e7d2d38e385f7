"""Defaults that belong to the data: toy data named ``toy:NAME`` and found inside the package from any directory, a
user's comparisons never normalised on toy demonstrations, and ``sample --judge`` with any judge, not only the toy's."""

import json

import pytest
import torch
import yaml

from lightning_rlhf import ComparisonDataModule
from lightning_rlhf.commands import sample as sample_command
from lightning_rlhf.data.records import Record, read_records
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation.judges import score_records
from lightning_rlhf.evaluation.ratings import rank
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model
from lightning_rlhf.toy import toy_path
from tests.helpers import REPO

PROMPTS = ["Write a haiku about rain.", "Name a prime number.", "Say hello."]  # not toy prompts: gold refuses them


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def rm_config_data(**overrides) -> ComparisonDataModule:
    """The ComparisonDataModule of the shipped configs/rm.yaml, with ``overrides``."""
    config = yaml.safe_load((REPO / "configs" / "rm.yaml").read_text())["data"]["init_args"]
    return ComparisonDataModule(**{**config, **overrides})


def longer_is_better(prompt: str, response: str) -> float:
    """A judge for ``sample --judge tests.test_defaults.longer_is_better``."""
    return float(len(response))


def test_toy_data_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name, _ = read_records("toy:demonstrations", "demonstration")
    by_path, _ = read_records(toy_path("demonstrations"), "demonstration")
    assert [r.fields for r in by_name] == [r.fields for r in by_path] and len(by_name) == 2100
    with pytest.raises(FileNotFoundError, match=r"toy:demos: .* it has toy:comparisons, toy:demonstrations, toy:pro"):
        read_records("toy:demos", "demonstration")


def test_the_rm_config_normalises_toy_comparisons_on_toy_demonstrations_from_any_directory(tmp_path, monkeypatch):
    """rm.yaml as shipped, run outside the repository: the toy comparisons come with the toy normalisation set (its
    first 1000 demonstrations); it once named them by a path relative to the repository root."""
    monkeypatch.chdir(tmp_path)
    data = rm_config_data()
    data.setup("fit")
    assert data.normalize_path == "toy:demonstrations" and len(data.normalize_examples) == 1000


def test_a_users_comparisons_are_never_normalised_on_toy_demonstrations(tmp_path):
    """The README's 'own data' line overrides train_path only: the reward offset must not then be measured on 1000
    toy 'Reverse:' demonstrations. Demonstrations the user names are used, toy ones included when asked for."""
    rows = [{"prompt": "Name a prime number.", "chosen": "7", "rejected": "8"}] * 4
    comparisons = write_jsonl(tmp_path / "ranks.jsonl", rows)
    data = rm_config_data(train_path=comparisons, val_fraction=0)
    data.setup("fit")
    assert data.normalize_path is None and data.normalize_dataloader() is None

    own = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "Name a prime number.", "response": "2"}] * 3)
    for normalize_path, count in ((own, 3), ("toy:demonstrations", 1000)):
        data = rm_config_data(train_path=comparisons, val_fraction=0, normalize_path=normalize_path)
        data.setup("fit")
        assert len(data.normalize_examples) == count


def sample(tiny_model_dir, tmp_path, judge: str) -> list[dict]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "comparisons.jsonl"
    sample_command.main(
        [
            "--model",
            tiny_model_dir,
            "--prompts",
            prompts,
            "--k",
            "4",
            "--max_new_tokens",
            "6",
            "--judge",
            judge,
            "--output",
            str(out),
        ]
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_sample_judges_with_any_function_named_by_its_import_path(tiny_model_dir, tmp_path):
    """An untrained model's samples differ in length; the judge ranks the longest first, ties (equal lengths) share a
    rank, and prompts whose samples all tie are left out."""
    records = sample(tiny_model_dir, tmp_path, "tests.test_defaults.longer_is_better")
    assert records and {r["prompt"] for r in records} <= set(PROMPTS)
    for record in records:
        assert record["ranks"] == rank([float(len(response)) for response in record["responses"]])


def test_sample_judges_with_a_reward_model_directory(tiny_model_dir, tmp_path):
    """Each prompt's samples are ranked by the exported reward model's rewards, as ``score`` computes them."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, tmp_path / "rm")
    records = sample(tiny_model_dir, tmp_path, str(tmp_path / "rm"))
    assert records
    reward_model = load_reward_model(str(tmp_path / "rm"), tokenizer).eval()
    for record in records:
        pairs = [Record("test", {"prompt": record["prompt"], "response": r}) for r in record["responses"]]
        assert record["ranks"] == rank(score_records(reward_model, tokenizer, pairs))


def test_sample_refuses_an_unknown_judge_before_sampling(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"judge 'no_such\.judge' is neither 'gold', a reward-model directory nor"):
        sample(tiny_model_dir, tmp_path, "no_such.judge")
    assert not (tmp_path / "comparisons.jsonl").exists()
