"""Long commands say how far they are: ``sample``, ``score``, ``evaluate``, ``label --aggregate`` and the pipeline's
evaluation draw a progress bar (done/total, rate, time left)."""

import json

import torch

from lightning_rlhf.commands import evaluate, label, sample, score
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model
from lightning_rlhf.rl.sampling import gold_scores


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def final_bar(stderr: str, description: str) -> str:
    """The last state tqdm drew of the bar named ``description``."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(description)][-1]


def test_sample_shows_responses_done_of_all_and_their_rate(tiny_model_dir, tmp_path, capsys):
    """3 prompts × k = 2 in batches of 4: the bar ends at 6/6 responses."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Reverse: {w}\n"} for w in ("ab", "cd", "ef")])
    sample.main(
        [
            "--model",
            tiny_model_dir,
            "--prompts",
            prompts,
            "--k",
            "2",
            "--batch_size",
            "4",
            "--max_new_tokens",
            "2",
            "--output",
            str(tmp_path / "samples.jsonl"),
        ]
    )
    bar = final_bar(capsys.readouterr().err, "sampling")
    assert "6/6" in bar and "response/s" in bar


def test_score_shows_records_done_of_all_and_their_rate(tiny_model_dir, tmp_path, capsys):
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, tmp_path / "rm")
    rows = [{"prompt": "p", "response": "r" * n} for n in range(1, 6)]
    score.main(
        [
            "--model",
            str(tmp_path / "rm"),
            "--input",
            write_jsonl(tmp_path / "in.jsonl", rows),
            "--output",
            str(tmp_path / "scored.jsonl"),
            "--batch_size",
            "2",
        ]
    )
    bar = final_bar(capsys.readouterr().err, "scoring")
    assert "5/5" in bar and "record/s" in bar


def test_evaluate_shows_each_models_sampling_and_the_reward_models_scoring(tiny_model_dir, tmp_path, capsys):
    """Two models on 3 held-out prompts, judged by a reward model: a bar per model ends at 3/3 responses, and the
    reward model's bar at 3/3 records (once per model)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, tmp_path / "rm")
    evaluate.main(
        [
            "--models",
            tiny_model_dir,
            tiny_model_dir,
            "--names",
            "a",
            "b",
            "--toy_held_out",
            "3",
            "--max_new_tokens",
            "2",
            "--reward_model",
            str(tmp_path / "rm"),
            "--bootstrap",
            "10",
            "--output",
            str(tmp_path / "eval"),
        ]
    )
    err = capsys.readouterr().err
    for name in ("a", "b"):
        bar = final_bar(err, f"sampling {name}")
        assert "3/3" in bar and "response/s" in bar
    scoring_bars = [
        line for line in err.replace("\r", "\n").splitlines() if line.startswith("scoring") and "3/3" in line
    ]
    assert len(scoring_bars) == 2 and all("record/s" in bar for bar in scoring_bars)


def test_gold_scores_show_a_named_bar_when_asked(tiny_model_dir, capsys):
    """The pipeline's evaluation stage scores every model greedy and sampled under bars named for both."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    gold_scores(
        model, tokenizer, ["Reverse: ab\n", "Reverse: cd\n"], 0.0, max_new_tokens=2, progress=True, desc="sft greedy"
    )
    bar = final_bar(capsys.readouterr().err, "sft greedy")
    assert "2/2" in bar and "response/s" in bar


def test_label_aggregate_shows_items_done_and_their_rate(tmp_path, capsys):
    """3 items, two labellers each, aggregated by a Bradley–Terry consensus: the bar ends at 3/3 items."""
    labels = [
        {"prompt": f"p{item}", "responses": ["a", "b"], "ranks": ranks, "labeller": who, "item": item}
        for item in range(3)
        for who, ranks in (("ann", [0, 1]), ("bob", [0, 1]))
    ]
    label.main(
        [
            "--aggregate",
            write_jsonl(tmp_path / "labels.jsonl", labels),
            "--output",
            str(tmp_path / "comparisons.jsonl"),
            "--consensus",
            "bradley-terry",
        ]
    )
    bar = final_bar(capsys.readouterr().err, "aggregating")
    assert "3/3" in bar and "item/s" in bar
