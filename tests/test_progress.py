"""Long commands say how far they are: ``sample`` and ``score`` draw a progress bar (done/total, rate, time left)."""

import json

import torch

from lightning_rlhf import sampling, scoring
from lightning_rlhf.models import export_pretrained, load_tokenizer
from lightning_rlhf.reward_model import load_reward_model


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def final_bar(stderr: str, description: str) -> str:
    """The last state tqdm drew of the bar named ``description``."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(description)][-1]


def test_sample_shows_responses_done_of_all_and_their_rate(tiny_model_dir, tmp_path, capsys):
    """3 prompts × k = 2 in batches of 4: the bar ends at 6/6 responses."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Reverse: {w}\n"} for w in ("ab", "cd", "ef")])
    sampling.main(["--model", tiny_model_dir, "--prompts", prompts, "--k", "2", "--batch_size", "4",
                   "--max_new_tokens", "2", "--output", str(tmp_path / "samples.jsonl")])  # fmt: skip
    bar = final_bar(capsys.readouterr().err, "sampling")
    assert "6/6" in bar and "response/s" in bar


def test_score_shows_records_done_of_all_and_their_rate(tiny_model_dir, tmp_path, capsys):
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, tmp_path / "rm")
    rows = [{"prompt": "p", "response": "r" * n} for n in range(1, 6)]
    scoring.main(["--model", str(tmp_path / "rm"), "--input", write_jsonl(tmp_path / "in.jsonl", rows),
                  "--output", str(tmp_path / "scored.jsonl"), "--batch_size", "2"])  # fmt: skip
    bar = final_bar(capsys.readouterr().err, "scoring")
    assert "5/5" in bar and "record/s" in bar
