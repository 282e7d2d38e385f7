"""RewardModule and reward_model: where the reward is read, what is new, what it learns, how it is exported."""

import json
import os
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GraniteConfig

from lightning_rlhf import ComparisonDataModule, RewardModule
from lightning_rlhf.commands.score import score_file
from lightning_rlhf.data.collate import ComparisonCollator
from lightning_rlhf.data.records import Record, RecordError, read_records
from lightning_rlhf.data.resumable import ResumableJsonl
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation.judges import score_records
from lightning_rlhf.losses.preference import ranking_loss
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model, sequence_rewards, token_values
from tests.helpers import REPO, TINY_CONFIG, make_tiny_export, run_cli, straight_and_resumed

TOKENIZER = load_tokenizer(None)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def token_ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def tiny_module(model_name_or_path=None, **kwargs) -> RewardModule:
    torch.manual_seed(0)
    config = TINY_CONFIG if model_name_or_path is None else None
    module = RewardModule(model_name_or_path, model_config=config, **kwargs)
    module.configure_model()
    return module


def other_architecture_export(directory: Path, architecture: str) -> str:
    """Granite has no sequence-classification class in transformers (the generic fallback); GPT-2 has one and
    keeps its backbone under ``transformer.`` rather than ``model.``."""
    sizes = {"vocab_size": len(TOKENIZER), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if architecture == "granite":
        config = GraniteConfig(**TINY_CONFIG, **sizes)
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **sizes)
    torch.manual_seed(0)
    return str(export_pretrained(AutoModelForCausalLM.from_config(config), TOKENIZER, directory))


# -- the model: what is new, where the reward is read ---------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "granite", "gpt2"])
def test_the_head_is_the_only_new_parameter(architecture, tiny_model_dir, tmp_path):
    """Every backbone weight equals the SFT export's; the unembedding is gone; one (1, hidden) head is new."""
    sft_dir = tiny_model_dir if architecture == "llama" else other_architecture_export(tmp_path, architecture)
    module = tiny_module(sft_dir)
    sft_weights = load_file(f"{sft_dir}/model.safetensors")
    reward_weights = module.model.state_dict()
    unembedding = {"lm_head.weight"} & set(sft_weights)
    assert set(reward_weights) - set(sft_weights) == {"score.weight"}
    assert set(sft_weights) - set(reward_weights) <= unembedding
    for name in set(sft_weights) - unembedding:
        assert torch.equal(reward_weights[name], sft_weights[name]), name
    assert module.model.score.weight.shape == (1, 32)
    assert module.model.score.weight.abs().sum() > 0 and module.model.training


@pytest.mark.parametrize("architecture", ["llama", "granite", "gpt2"])
def test_reward_is_read_at_the_last_real_token_whatever_the_padding_side(architecture, tiny_model_dir, tmp_path):
    """Brute force: each sequence alone, unpadded, the head on the backbone's last hidden state. Right- and
    left-padded batches (with junk token ids under the padding) must give the same numbers. GPT-2's absolute
    positions catch positions not taken from the mask (RoPE alone would not: it is shift-invariant)."""
    model_dir = tiny_model_dir if architecture == "llama" else other_architecture_export(tmp_path, architecture)
    model = tiny_module(model_dir).model.eval()
    sequences = [token_ids("Reverse: abc\ncba</s>"), token_ids("Q: x\ny"), token_ids("a longer one\nhere, ok")]
    width = max(map(len, sequences)) + 2
    right = torch.full((3, width), 77)
    left = torch.full((3, width), 55)
    right_mask, left_mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        right[row, : len(seq)], right_mask[row, : len(seq)] = torch.tensor(seq), 1
        left[row, width - len(seq) :], left_mask[row, width - len(seq) :] = torch.tensor(seq), 1
    with torch.no_grad():
        brute_force = torch.stack(
            [model.score(model.base_model(torch.tensor([seq])).last_hidden_state[0, -1])[0] for seq in sequences]
        )
        from_right = sequence_rewards(model, right, right_mask)
        from_left = sequence_rewards(model, left, left_mask)
        values = token_values(model, right, right_mask)
    torch.testing.assert_close(from_right, brute_force, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_left, brute_force, atol=1e-5, rtol=0)
    torch.testing.assert_close(values[0, len(sequences[0]) - 1], brute_force[0], atol=1e-5, rtol=0)
    assert brute_force.std() > 0  # the three rewards differ, so a wrong column would show


def test_reward_token_is_appended_after_the_last_real_token_and_read_there(tiny_model_dir, tmp_path):
    module = tiny_module(tiny_model_dir, reward_token="<|reward|>")
    model = module.model.eval()
    token_id = module.tokenizer.convert_tokens_to_ids("<|reward|>")
    assert token_id == len(TOKENIZER) and model.config.reward_token_id == token_id
    assert model.get_input_embeddings().num_embeddings == len(TOKENIZER) + 1
    seq = token_ids("Reverse: ab\nba")
    input_ids = torch.tensor([seq + [0, 0], [0, 0] + seq])
    mask = torch.tensor([[1] * len(seq) + [0, 0], [0, 0] + [1] * len(seq)])
    with torch.no_grad():
        expected = model.score(model.base_model(torch.tensor([seq + [token_id]])).last_hidden_state[0, -1])
        torch.testing.assert_close(sequence_rewards(model, input_ids, mask), expected.expand(2), atol=1e-5, rtol=0)
    export_pretrained(model, module.tokenizer, tmp_path / "rm")  # the token travels with the export
    reloaded = load_reward_model(str(tmp_path / "rm"), load_tokenizer(str(tmp_path / "rm"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_rewards(reloaded, input_ids, mask), expected.expand(2), atol=1e-6, rtol=0)


# -- training and metrics ------------------------------------------------------------------------------------


def marker_comparisons(n: int, seed: int) -> list[dict]:
    """A planted preference: of 2-3 random responses, the one containing '#' is best; the others tie."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))

    rows = []
    for _ in range(n):
        marked = word()
        position = rng.randint(0, len(marked))
        responses = [marked[:position] + "#" + marked[position:]] + [word() for _ in range(rng.randint(1, 2))]
        ranks = [0] + [1] * (len(responses) - 1)
        order = list(range(len(responses)))
        rng.shuffle(order)
        rows.append(
            {"prompt": f"Q: {word()}\n", "responses": [responses[i] for i in order], "ranks": [ranks[i] for i in order]}
        )
    return rows


def fit(module, datamodule, max_steps: int, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule)
    return trainer


def test_reward_model_learns_a_planted_preference_to_90_percent_held_out_accuracy(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", marker_comparisons(480, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", marker_comparisons(100, seed=1))
    data = ComparisonDataModule(train_path=train, val_path=val, tokenizer_name_or_path=tiny_model_dir, batch_size=16)
    module = tiny_module(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    before = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    start_accuracy = before.validate(module, data, verbose=False)[0]["val/accuracy"]
    trainer = fit(module, data, max_steps=100, val_check_interval=100, check_val_every_n_epoch=None)
    accuracy = trainer.callback_metrics["val/accuracy"].item()
    assert start_accuracy < 0.75 and accuracy >= 0.9, (start_accuracy, accuracy)
    assert trainer.callback_metrics["val/margin"] > 0.5


def empty_last_comparisons(n: int, seed: int) -> list[dict]:
    """Two random words in random order, ranked at random between themselves, and the empty response always last."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))

    rows = []
    for _ in range(n):
        ranks = [rng.randint(0, 1), 2, rng.randint(0, 1)]
        rows.append({"prompt": f"Q: {word()}\n", "responses": [word(), "", word()], "ranks": ranks})
    return rows


def test_a_reward_model_trained_with_empty_responses_ranked_worst_scores_prompt_plus_eos_lowest(
    tiny_model_dir, tmp_path
):
    """Comparisons whose empty response (EOS right after the prompt) is always ranked last train the reward model;
    then ``score``'s path (a ``{"prompt", "response": ""}`` record, tokenized as prompt + EOS) puts the empty response
    below both others on held-out prompts. Before training that holds for about a third of them (chance); a data
    layer that refused or dropped the empty responses would leave nothing to learn it from."""
    train = write_jsonl(tmp_path / "train.jsonl", empty_last_comparisons(320, seed=0))
    held_out = empty_last_comparisons(60, seed=1)
    data = ComparisonDataModule(train_path=train, val_fraction=0, tokenizer_name_or_path=tiny_model_dir, batch_size=16)
    module = tiny_module(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))

    def share_lowest() -> float:
        records = [Record("held out", {"prompt": r["prompt"], "response": x}) for r in held_out for x in r["responses"]]
        rewards = torch.tensor(score_records(module.model.eval(), TOKENIZER, records)).view(-1, 3)
        module.model.train()
        return (rewards[:, 1] < torch.minimum(rewards[:, 0], rewards[:, 2])).float().mean().item()

    before = share_lowest()
    fit(module, data, max_steps=40, limit_val_batches=0)
    after = share_lowest()
    assert before < 0.6 and after >= 0.95, (before, after)


def test_validation_metrics_equal_brute_force_over_the_whole_held_out_set(tiny_model_dir, tmp_path):
    """Accuracy and margin over all ordered pairs, mean and std over all responses, loss = mean over prompts:
    recomputed from each response scored alone (no padding), across batches of different K."""
    rows = marker_comparisons(11, seed=3) + [{"prompt": "Q: t\n", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    data = ComparisonDataModule(train_path=val, val_path=val, tokenizer_name_or_path=tiny_model_dir, batch_size=5)
    module = tiny_module(tiny_model_dir)
    torch.nn.init.normal_(module.model.score.weight, std=1.0)  # spread the rewards so the metrics differ
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, data, verbose=False)[0]

    data.setup("validate")
    collate = ComparisonCollator(TOKENIZER.pad_token_id)
    model = module.model.eval()
    all_rewards, margins, losses = [], [], []
    with torch.no_grad():
        for example in data.val_examples:
            alone = [collate([{**example, "response_ids": [r], "ranks": [0]}]) for r in example["response_ids"]]
            rewards = torch.cat([sequence_rewards(model, b["input_ids"], b["attention_mask"]) for b in alone])
            ranks = example["ranks"]
            all_rewards += rewards.tolist()
            margins += [
                rewards[i] - rewards[j] for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]
            ]
            losses.append(ranking_loss(rewards[None], torch.tensor([ranks])))
    all_rewards, margins = torch.tensor(all_rewards), torch.stack(margins)
    expected = {
        "val/accuracy": (margins > 0).float().mean(),
        "val/margin": margins.mean(),
        "val/reward_mean": all_rewards.mean(),
        "val/reward_std": all_rewards.std(correction=0),
        "val/loss": torch.stack(losses).mean(),
    }
    assert 0 < expected["val/accuracy"] < 1
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(metrics[name]), value.float(), atol=1e-5, rtol=0, msg=name)


# -- normalisation, export, scoring --------------------------------------------------------------------------


def test_normalisation_is_exported_and_makes_the_reference_set_average_zero(tiny_model_dir, tmp_path):
    reference = write_jsonl(
        tmp_path / "ref.jsonl", [{"prompt": f"Q: {w}\n", "response": w[::-1]} for w in ("ab", "xyz", "hello", "q")]
    )
    module = tiny_module(tiny_model_dir)
    torch.nn.init.normal_(module.model.score.weight, std=1.0)
    data = ComparisonDataModule(
        tokenizer_name_or_path=tiny_model_dir, normalize_path=reference, batch_size=3, val_fraction=0.0
    )
    data.setup("fit")
    offset = module.normalize(data.normalize_dataloader())  # two batches: 3 + 1 sequences
    assert abs(offset) > 1e-3
    export_pretrained(module.model, module.tokenizer, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["reward_offset"] == pytest.approx(offset)

    score_file(str(tmp_path / "rm"), reference, str(tmp_path / "scored.jsonl"))
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [s["response"] for s in scored] == ["ba", "zyx", "olleh", "q"]
    assert sum(s["reward"] for s in scored) / 4 == pytest.approx(0.0, abs=1e-5)
    score_file(str(tmp_path / "rm"), reference, str(tmp_path / "raw.jsonl"), raw=True)
    raw = [json.loads(line)["reward"] for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert raw == pytest.approx([s["reward"] + offset for s in scored], abs=1e-5)

    # A reward model export is also a starting point: its head is kept, its stale offset dropped.
    restarted = tiny_module(str(tmp_path / "rm"))
    assert torch.equal(restarted.model.score.weight, module.model.score.weight)
    assert restarted.model.config.reward_offset == 0.0
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert torch.equal(hf_model.score.weight, module.model.score.weight)


def test_score_replaces_the_output_atomically_and_names_bad_records(tiny_model_dir, tmp_path, monkeypatch):
    module = tiny_module(tiny_model_dir)
    export_pretrained(module.model, module.tokenizer, tmp_path / "rm")
    output = tmp_path / "out" / "scored.jsonl"
    output.parent.mkdir()
    output.write_text("previous results\n")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    with pytest.raises(RecordError, match=r"bad\.jsonl line 2: field 'response' is missing"):
        score_file(str(tmp_path / "rm"), bad, str(output))
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}])

    append = ResumableJsonl.append

    def append_then_fail(self, *args, **kwargs):  # the disk fills up after the first batch is written
        append(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ResumableJsonl, "append", append_then_fail)
    with pytest.raises(OSError, match="disk full"):
        score_file(str(tmp_path / "rm"), good, str(output))
    assert output.read_text() == "previous results\n"  # the old output stands; what was scored waits in .partial
    assert sorted(os.listdir(output.parent)) == ["scored.jsonl", "scored.jsonl.partial", "scored.jsonl.partial.json"]
    monkeypatch.setattr(ResumableJsonl, "append", append)
    score_file(str(tmp_path / "rm"), good, str(output))
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["p", "q"]
    assert os.listdir(output.parent) == ["scored.jsonl"]


# -- bad comparison records, through the DataModule ------------------------------------------------------------

BAD_COMPARISONS = {
    "all ranks tied": (
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]},
        r"field 'ranks' = \[1, 1, 1\]: all responses tie",
    ),
    "K = 1": ({"prompt": "p", "responses": ["a"], "ranks": [0]}, r"field 'responses' has 1 response"),
    "rank out of range": (
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 2]},
        r"field 'ranks' = \[0, 2\]: each rank must lie in 0\.\.1",
    ),
    "both spellings": (
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "chosen": "b", "rejected": "a"},
        r"fields \['responses', 'ranks'\] and \['chosen', 'rejected'\] are both present",
    ),
    "duplicate with two ranks": (
        {"prompt": "p", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]},
        r"field 'responses': the same response appears with ranks 0 and 2",
    ),
}
GOOD = {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}


@pytest.mark.parametrize("case", BAD_COMPARISONS, ids=list(BAD_COMPARISONS))
def test_bad_comparisons_are_a_clear_error_naming_file_line_and_field(case, tmp_path):
    record, message = BAD_COMPARISONS[case]
    path = write_jsonl(tmp_path / "ranks.jsonl", [GOOD, record])
    data = ComparisonDataModule(train_path=path, val_fraction=0)
    with pytest.raises(RecordError, match=r"ranks\.jsonl line 2: " + message):
        data.setup("fit")


def test_bad_comparisons_are_skipped_and_counted_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "ranks.jsonl", [GOOD, *(record for record, _ in BAD_COMPARISONS.values()), GOOD])
    records, report = read_records(path, "comparison", skip_invalid=True)
    assert (len(records), report.skipped) == (2, 5)
    assert [r.split(": ")[0] for r in report.reasons] == [f"{path} line {n}" for n in (2, 3, 4, 5, 6)]
    data = ComparisonDataModule(train_path=path, val_fraction=0, skip_invalid=True)
    data.setup("fit")
    assert len(data.train_examples) == 2


def test_the_toy_comparisons_are_ranked_by_the_gold_judge():
    from lightning_rlhf.toy.reverse import gold_score

    records, report = read_records(ComparisonDataModule.default_train_path, "comparison")
    assert len(records) == 2000 and report.skipped == 0
    ks = {len(r.fields["ranks"]) for r in records}
    assert ks == {3, 4}
    for record in records[:200]:
        scores = [gold_score(record.fields["prompt"], y) for y in record.fields["responses"]]
        for i, j in ((i, j) for i in range(len(scores)) for j in range(len(scores))):
            ranks = record.fields["ranks"]
            assert (ranks[i] < ranks[j]) == (scores[i] > scores[j] + 1e-6), record.location


# -- the CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rm_config_trains_from_an_sft_export_exports_and_scores_through_the_cli(tmp_path):
    sft_dir = make_tiny_export(tmp_path / "sft")
    demonstrations = REPO / "lightning_rlhf" / "toy" / "data" / "demonstrations.jsonl"
    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "rm.yaml"),
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=2",
        "--trainer.limit_val_batches=4",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.model_name_or_path={sft_dir}",
        f"--model.init_args.export_dir={tmp_path / 'rm'}",
        "--data.init_args.normalize_path=toy:demonstrations",
        "--data.init_args.normalize_max_records=40",
        cwd=tmp_path,
    )
    (events,) = (tmp_path / "tensorboard").glob("version_*/events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    stats = ("loss", "accuracy", "margin", "reward_mean", "reward_std")
    for tag in [f"{stage}/{stat}" for stage in ("train", "val") for stat in stats] + ["train/reward_offset"]:
        assert tag in tags, tags

    reference = write_jsonl(tmp_path / "ref.jsonl", demonstrations.read_text().splitlines()[:40])
    run_cli(
        "score",
        "--model",
        str(tmp_path / "rm"),
        "--input",
        reference,
        "--output",
        str(tmp_path / "s.jsonl"),
        cwd=tmp_path,
    )
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rewards) == 40 and sum(rewards) / 40 == pytest.approx(0.0, abs=1e-4)
    assert max(rewards) - min(rewards) > 1e-3
    trained = load_file(tmp_path / "rm" / "model.safetensors")
    initial = load_file(Path(sft_dir) / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])


def test_a_resume_mid_epoch_trains_on_the_batches_the_uninterrupted_run_trained_on(tiny_model_dir, tmp_path):
    """12 comparisons in batches of 4 (3 an epoch), checkpoint after step 2, 5 steps: the resumed run trains on the
    straight run's batches 3..5 with the same losses."""
    train = write_jsonl(tmp_path / "train.jsonl", marker_comparisons(12, seed=0))

    def fit(callbacks, ckpt_path):
        L.seed_everything(0)
        data = ComparisonDataModule(
            train_path=train, tokenizer_name_or_path=tiny_model_dir, batch_size=4, val_fraction=0
        )
        module = RewardModule(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
        L.Trainer(
            accelerator="cpu",
            max_steps=5,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=callbacks,
        ).fit(module, data, ckpt_path=ckpt_path)

    straight, resumed = straight_and_resumed(fit, ("train/loss",), 2, tmp_path)
    assert len(straight.batches) == 5 and straight.batches[3] != straight.batches[0]
    assert resumed.batches == straight.batches[2:]
    torch.testing.assert_close(resumed.metrics, straight.metrics[2:], atol=1e-5, rtol=0)


def test_score_skip_invalid_skips_an_over_long_prompt_and_says_so(tiny_model_dir, tmp_path, capsys):
    """max_length 8: "p" (1 token) fits, the 20-byte prompt does not; scoring without skipping names its line."""
    module = tiny_module(tiny_model_dir)
    export_pretrained(module.model, module.tokenizer, tmp_path / "rm")
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "x" * 20, "response": "r"}, {"prompt": "q", "response": "s"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(RecordError, match=r"in\.jsonl line 2: field 'prompt' is 20 tokens"):
        score_file(str(tmp_path / "rm"), path, str(tmp_path / "out.jsonl"), max_length=8)
    score_file(str(tmp_path / "rm"), path, str(tmp_path / "out.jsonl"), max_length=8, skip_invalid=True)
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in scored] == ["p", "q"]
    assert "1 records with prompts over max_length=8 skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "message"), [({"margin": -1.0}, r"margin=-1.0: must be >= 0"), ({"center_coef": -0.1}, r">= 0")]
)
def test_reward_module_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        RewardModule(**setting)
