"""The sample step: K responses per prompt, ranked by a simulated labeller into valid comparison records."""

import json

import pytest
import torch

from lightning_rlhf import ComparisonDataModule
from lightning_rlhf.cli import main
from lightning_rlhf.commands import sample
from lightning_rlhf.commands.sample import judge_records, unranked_records
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation import judges
from lightning_rlhf.evaluation.judges import make_scorer
from lightning_rlhf.evaluation.ratings import rank
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl import engines
from lightning_rlhf.rl.generation import generate
from lightning_rlhf.rl.sampling import judge_samples, sample_and_judge, sample_responses

GOLD = make_scorer("gold")


def test_rank_is_dense_with_ties_sharing_a_rank():
    assert rank([0.5, 0.9, 0.5, 0.1]) == [1, 0, 1, 2]


def test_judge_merges_duplicates_and_counts_prompts_that_all_tie():
    """Prompt 1: 'cba' (gold 1.0) twice and 'cb' (0.8) -> two unique responses ranked 0, 1, one duplicate merged.
    Prompt 2: the same response four times -> one unique response, nothing to prefer: left out and counted."""
    prompts = ["Reverse: abc\n", "Reverse: xyz\n"]
    samples = [["cba", "cb", "cba", "cb"], ["zy"] * 4]
    records, report = judge_records(prompts, samples, GOLD, noise=0.0, seed=0)
    assert records == [{"prompt": prompts[0], "responses": ["cba", "cb"], "ranks": [0, 1]}]
    assert (report.prompts, report.written, report.all_tied, report.merged_duplicates) == (2, 1, 1, 5)


def test_noise_can_flip_the_labeller_but_is_seeded():
    prompts, samples = ["Reverse: abcdef\n"] * 200, [["fedcba", "fedcb"]] * 200
    flipped = sum(r["ranks"] == [1, 0] for r in judge_records(prompts, samples, GOLD, 0.5, seed=1)[0])
    assert 0 < flipped < 100
    assert judge_records(prompts, samples, GOLD, 0.5, seed=1) == judge_records(prompts, samples, GOLD, 0.5, seed=1)


def test_sample_cli_writes_k_responses_or_judged_comparisons_the_datamodule_reads(tiny_model_dir, tmp_path):
    """Unjudged: every prompt with its K samples, for people to rank. Judged (an untrained model scores gold 0
    everywhere, so the labeller's noise separates them): comparison records the ComparisonDataModule accepts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Reverse: {w}\n"}) + "\n" for w in ["abc", "hello", "xyz"]))
    common = ["--model", tiny_model_dir, "--prompts", str(prompts), "--k", "3", "--max_new_tokens", "8"]
    main(["sample", *common, "--output", str(tmp_path / "samples.jsonl")])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [len(s["responses"]) for s in samples] == [3, 3, 3] and "ranks" not in samples[0]

    out = tmp_path / "comparisons.jsonl"
    report = sample.main([*common, "--judge", "gold", "--noise", "0.1", "--output", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == report.written == 3 - report.all_tied and report.written >= 2
    data = ComparisonDataModule(train_path=str(out), val_fraction=0, tokenizer_name_or_path=tiny_model_dir)
    data.setup("fit")
    assert len(data.train_examples) == len(lines)


def test_toy_prompts_draws_that_many_fresh_prompts_by_seed(tiny_model_dir, tmp_path):
    """--toy_prompts 5: five toy prompts, the same for the same --seed and others for another (shipped prompts are
    not used)."""
    drawn = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"samples{seed}.jsonl"
        sample.main(
            [
                "--model",
                tiny_model_dir,
                "--toy_prompts",
                "5",
                "--k",
                "2",
                "--max_new_tokens",
                "2",
                "--seed",
                str(seed),
                "--output",
                str(out),
            ]
        )
        prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
        assert len(prompts) == 5 and all(p.startswith("Reverse: ") for p in prompts)
        assert drawn.setdefault(seed, prompts) == prompts
    assert drawn[0] != drawn[1]


def test_sample_and_score_refuse_an_unwritable_output_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The output's parent is a regular file (root ignores permission bits): both stop before loading a model."""
    (tmp_path / "file").write_text("x")
    loaded = []
    monkeypatch.setattr(sample, "load_causal_lm", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(judges, "load_reward_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit, match="1"):
        main(["sample", "--model", tiny_model_dir, "--k", "2", "--output", str(tmp_path / "file" / "out.jsonl")])
    assert "out.jsonl: cannot be written" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="1"):
        main(["score", "--model", tiny_model_dir, "--input", str(tmp_path / "file"), "--output", str(tmp_path)])
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert loaded == []


def test_sample_refuses_to_generate_past_the_models_positions(tiny_model_dir, tmp_path):
    """The tiny model has 128 positions: "Reverse: abc\\n" is 13 bytes, 13 tokens (no BOS), + 120 new = 133."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Reverse: abc\n"}) + "\n")
    args = ["--model", tiny_model_dir, "--prompts", str(prompts), "--k", "2", "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens is 133 tokens, past the model's max_position"):
        sample.main([*args, "--max_new_tokens", "120"])


def test_empty_samples_are_kept_ranked_and_counted():
    """'' twice among 4 samples: merged into one response like any duplicate, ranked by the judge like any other
    (gold scores '' 0, below 'cb' and 'cba'), and counted as empty: a sampler that dropped '' (the old behaviour)
    or stopped merging it fails."""
    records, report = judge_records(["Reverse: abc\n"], [["cba", "", "cb", ""]], GOLD, noise=0.0, seed=0)
    assert records == [{"prompt": "Reverse: abc\n", "responses": ["cba", "", "cb"], "ranks": [0, 2, 1]}]
    assert (report.empty, report.merged_duplicates) == (2, 1)
    records, report = unranked_records(["Reverse: abc\n"], [["", "cba"]])
    assert records == [{"prompt": "Reverse: abc\n", "responses": ["", "cba"]}] and report.empty == 1
    # Unranked samples report no ties or merges (they have none to report): catches the ranked wording printed for them.
    assert report.summary(ranked=False) == "1 of 1 prompts written, unranked; 1 empty responses (kept)"


def test_sample_and_score_settings_out_of_range_are_usage_errors(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(SystemExit, match="2"):
        main(["sample", "--model", tiny_model_dir, "--k", "0", "--output", out])
    assert "--k=0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["score", "--model", tiny_model_dir, "--input", out, "--output", out, "--batch_size", "0"])
    assert "--batch_size=0: must be >= 1" in capsys.readouterr().err


def test_sample_generates_with_the_cache_asked_for_and_refuses_compile_without_static(tiny_model_dir, tmp_path, capsys):
    """``--cache_implementation static --compile`` reach generation; an unknown cache and ``--compile`` over the
    dynamic cache are usage errors."""
    common = ["sample", "--model", tiny_model_dir, "--limit", "2", "--k", "2", "--max_new_tokens", "4"]
    out = str(tmp_path / "samples.jsonl")
    with pytest.raises(SystemExit, match="2"):
        main([*common, "--output", out, "--cache_implementation", "paged"])
    assert "--cache_implementation: invalid choice: 'paged'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*common, "--output", out, "--compile"])
    assert "--compile needs --cache_implementation static" in capsys.readouterr().err

    options = []

    def spy(*args, **kwargs):  # records the options, generates without compiling (a minute's warm-up on a CPU)
        options.append((kwargs["cache_implementation"], kwargs["compile"]))
        return generate(*args, **{**kwargs, "compile": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engines, "generate", spy)  # what the hf engine samples with
        main([*common, "--output", out, "--cache_implementation", "static", "--compile"])
    assert options == [("static", True)]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_judge_samples_scores_every_sample_in_one_judge_call_in_order():
    """Prompts "a" and "bb" with 2 and 1 samples, judged by 10 · len(prompt) + len(response): one call with the
    three pairs in order, the scores cut back per prompt ([[11, 12], [23]]); no samples, no call. Catches a judge
    called per prompt (a reward model would batch nothing), scores given to the wrong prompt or sample, and a
    call with empty lists."""
    calls = []

    def judge(prompts, responses):
        calls.append((list(prompts), list(responses)))
        return [10 * len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]

    assert judge_samples(["a", "bb"], [["x", "yy"], ["zzz"]], judge) == [[11, 12], [23]]
    assert calls == [(["a", "a", "bb"], ["x", "yy", "zzz"])]
    assert judge_samples(["a"], [[]], judge) == [[]] and len(calls) == 1


def test_sample_and_judge_scores_what_sample_responses_draws(tiny_model_dir):
    """Under the same seed, ``sample_and_judge`` returns exactly ``sample_responses``'s 2 samples per prompt and the
    judge's score of each (here its length). Catches sampling arguments passed on in the wrong places (other
    samples) and scores not aligned with the samples they belong to."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    prompts = ["Reverse: abc\n", "Reverse: hello\n", "Reverse: xy\n"]
    settings = {"max_new_tokens": 6, "temperature": 1.0}
    torch.manual_seed(0)
    samples, scores = sample_and_judge(
        model, tokenizer, prompts, lambda ps, rs: [float(len(r)) for r in rs], 2, 64, 4, **settings
    )
    torch.manual_seed(0)
    expected = sample_responses(model, tokenizer, prompts, 2, 64, 4, **settings)
    assert samples == expected and len(samples) == 3
    assert scores == [[float(len(r)) for r in responses] for responses in expected]
