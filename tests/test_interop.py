"""Exports read the same in plain transformers: a reward model's logits are our rewards, and exported tokenizers
pad with a token of their own, never EOS. Checkpoints as real ones ship: a BPE tokenizer with a chat template and no
pad token, the vocabulary exactly as large as the embedding (so the added pad token grows it)."""

import json

import lightning as L
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    LlamaConfig,
)

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, RewardModule, SFTModule
from lightning_rlhf.data.records import read_records
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import PAD_TOKEN, load_tokenizer
from lightning_rlhf.evaluation.judges import score_records
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.reward import load_reward_model
from tests.helpers import TINY_CONFIG, bpe_tokenizer

USER = [{"role": "user", "content": "Reverse: abcde"}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chatml_checkpoint(directory, architecture: str = "llama") -> str:
    """A tiny causal LM saved with ``save_pretrained`` beside a ChatML BPE tokenizer without a pad token."""
    tokenizer = bpe_tokenizer("chatml")
    specials = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    if architecture == "llama":
        config = LlamaConfig(**TINY_CONFIG, **specials)
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **specials)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def fit_briefly(module, data, tmp_path, steps: int = 2) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)


def demonstrations(tmp_path) -> str:
    rows = [
        {"prompt": USER, "response": "edcba"},
        {"prompt": USER, "response": "ab"},
        {"prompt": "Reverse: xyz\n", "response": "zyx"},
        {"prompt": [{"role": "user", "content": "the quick brown fox"}], "response": "xof nworb kciuq eht"},
    ]
    return write_jsonl(tmp_path / "demonstrations.jsonl", rows)


def test_loading_adds_a_pad_token_of_its_own_and_grows_the_embedding_to_it(tmp_path):
    """The checkpoint has 303 tokens and 303 embedding rows; the pad token is the 304th. Its new rows are the mean of
    the old ones, so two loads of one checkpoint (a policy and its reference) agree exactly."""
    checkpoint = chatml_checkpoint(tmp_path / "base")
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == len(tokenizer) - 1 == 303
    policy, reference = load_causal_lm(checkpoint, tokenizer), load_causal_lm(checkpoint, tokenizer)
    embedding = policy.get_input_embeddings().weight
    assert embedding.shape[0] == 304 and policy.config.pad_token_id == 303
    torch.testing.assert_close(embedding[303], embedding[:303].mean(0))
    torch.testing.assert_close(policy.get_output_embeddings().weight[303], policy.lm_head.weight[:303].mean(0))
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters(), strict=True))


def test_an_exported_tokenizer_pads_with_its_own_token_so_eos_labels_survive_transformers_collator(tmp_path):
    """A user who keeps fine-tuning the SFT export with ``DataCollatorForLanguageModeling(mlm=False)`` gets labels
    = input ids with padding masked: with pad = EOS every EOS label would be masked and the model never learn to
    stop. Two rows, 4 and 2 tokens, each ending in EOS: labels keep both EOS, the 2 padding columns are -100."""
    checkpoint = chatml_checkpoint(tmp_path / "base")
    data = DemonstrationDataModule(
        train_path=demonstrations(tmp_path),
        tokenizer_name_or_path=checkpoint,
        val_fraction=0,
        batch_size=2,
        max_length=64,
    )
    fit_briefly(SFTModule(checkpoint, export_dir=str(tmp_path / "sft")), data, tmp_path, steps=1)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad is not None and pad != eos and model.config.pad_token_id == pad
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    rows = [[5, 6, 7, eos], [8, eos]]
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": row} for row in rows])
    assert batch["labels"].tolist() == [[5, 6, 7, eos], [8, eos, -100, -100]]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_an_exported_reward_model_gives_the_same_reward_in_plain_transformers(tmp_path, architecture):
    """``AutoModelForSequenceClassification`` pools at the last token that is not the pad id; with a pad token of
    its own that is the end-of-turn token where ``score`` reads. Its logits are the raw reward: ``score`` subtracts
    the stored ``reward_offset`` (the demonstrations' mean raw reward, nonzero here) unless ``--raw``."""
    checkpoint = chatml_checkpoint(tmp_path / "base", architecture)
    comparisons = [
        {"prompt": USER, "responses": ["edcba", "abcde", "ab"], "ranks": [0, 1, 2]},
        {"prompt": "Reverse: xyz\n", "chosen": "zyx", "rejected": "xyz"},
    ]
    data = ComparisonDataModule(
        train_path=write_jsonl(tmp_path / "comparisons.jsonl", comparisons),
        tokenizer_name_or_path=checkpoint,
        val_fraction=0,
        batch_size=2,
        max_length=64,
        normalize_path=demonstrations(tmp_path),
    )
    module = RewardModule(checkpoint, export_dir=str(tmp_path / "rm"))
    fit_briefly(module, data, tmp_path)

    export = tmp_path / "rm"
    records, _ = read_records(demonstrations(tmp_path), "demonstration")
    tokenizer = load_tokenizer(str(export))
    ours = load_reward_model(str(export), tokenizer).eval()
    raw = torch.tensor(score_records(ours, tokenizer, records, subtract_offset=False))
    scored = torch.tensor(score_records(ours, tokenizer, records))

    hf_tokenizer = AutoTokenizer.from_pretrained(export)
    hf_model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    examples = Tokenizer(hf_tokenizer, max_length=64).demonstrations(records)  # prompt ⊕ response ⊕ end of turn
    batch = hf_tokenizer.pad([{"input_ids": ex["input_ids"]} for ex in examples], return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is there to be skipped
    with torch.no_grad():
        logits = hf_model(**batch).logits.squeeze(-1)
    offset = hf_model.config.reward_offset
    assert abs(offset) > 1e-4
    torch.testing.assert_close(logits, raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits - offset, scored, atol=1e-5, rtol=0)
