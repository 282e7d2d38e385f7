"""Padding-free packing for SFT: rows of several sequences with restarting positions give each sequence exactly the
log-probs, loss and metrics it has unpacked, on RoPE (Llama) and absolute-position (GPT-2) models."""

import json

import lightning as L
import pytest
import torch
import yaml
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightning_rlhf import DemonstrationDataModule, SFTModule
from lightning_rlhf.data.collate import DemonstrationCollator, PackedDemonstrationCollator, pack_rows
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import (
    check_packed_attention,
    forward_logits,
    load_causal_lm,
    packed_logits,
    shifted_logprobs,
)
from tests.helpers import (
    REPO,
    TINY_CONFIG,
    StepRecorder,
    fit_config,
    make_tiny_export,
    make_tiny_gpt2_export,
    straight_and_resumed,
)

PAIRS = [
    ("Reverse: abc\n", "cba"),
    ("Reverse: hello world\n", "dlrow olleh"),
    ("Reverse: xy\n", "yx"),
    ("Reverse: lightning rlhf\n", "fhlr gninthgil"),
    ("Reverse: q\n", "q"),
]
ROW_LENGTH = 48


def demonstrations(pairs=PAIRS, max_length=ROW_LENGTH):
    tokenizer = Tokenizer(load_tokenizer(None), max_length)
    records = [Record(f"test {i}", {"prompt": p, "response": r}) for i, (p, r) in enumerate(pairs)]
    return tokenizer.demonstrations(records)


def test_pack_rows_is_first_fit_longest_first():
    """Lengths 5, 3, 4, 2 into rows of 8, longest first: 5 opens row 0 (3 left); 4 does not fit, opens row 1 (4
    left); 3 fills row 0; 2 goes to row 1. Rows list their indices in order: [0, 1], [2, 3]."""
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="9 tokens does not fit a packed row of 8"):
        pack_rows([9], 8)


def test_packed_collator_restarts_positions_and_masks_each_sequence_start():
    """A (3 tokens, prompt of 1), B (2, every token labelled, as pretraining text is), C (4, prompt of 2), rows of 6.
    pack_rows([3, 2, 4], 6): C opens row 0 (2 left), A opens row 1 (3 left), B fits row 0 -> rows [1, 2], [0].
    Row 0 = B ⊕ C: positions 0 1 | 0 1 2 3; labels: B's first token (its label 20) becomes -100, as it would be
    predicted from nothing of B's. Row 1 = A and 3 padding tokens, their positions a new run 0 1 2, labels -100."""
    examples = [
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
        {"input_ids": [30, 31, 32, 33], "labels": [-100, -100, 32, 33]},
    ]
    batch = PackedDemonstrationCollator(pad_token_id=0, row_length=6)(examples)
    assert batch["input_ids"].tolist() == [[20, 21, 30, 31, 32, 33], [10, 11, 12, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 21, -100, -100, 32, 33], [-100, 11, 12, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]


def per_sequence_logprobs(logprobs, mask, rows):
    """The scored log-probs of each sequence in order, from ``(r, t-1)`` values and mask; ``rows``: for each row the
    lengths of the sequences it holds (unpacked: one each)."""
    out = []
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            # Column t scores token t + 1: a sequence at [start, start + n) scores columns [start, start + n - 1).
            columns = slice(start, start + n - 1)
            out.append(logprobs[r, columns][mask[r, columns]])
            assert not mask[r, start + n - 1 : start + n].any()  # nothing scored across the boundary
            start += n
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("make_export", [make_tiny_export, make_tiny_gpt2_export], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_log_probs_of_each_sequence_equal_unpacked(make_export, attn, device, tmp_path):
    """Every token after the first of each sequence scored (labels = input ids, as for pretraining text): the packed
    rows give each sequence the log-probs it has alone, to 1e-5. GPT-2's learned absolute positions make the
    restarting positions matter. Fails if positions do not restart, if the packed forward gets an attention mask or
    a cache (both turn transformers' packed-sequence detection off), or if a boundary label is left in (one more
    token scored)."""
    path = make_export(tmp_path / "model")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer).eval().to(device)
    model.set_attn_implementation(attn)
    examples = [{**ex, "labels": ex["input_ids"]} for ex in demonstrations()]
    padded = {k: v.to(device) for k, v in DemonstrationCollator(tokenizer.pad_token_id)(examples).items()}
    packed = PackedDemonstrationCollator(tokenizer.pad_token_id, ROW_LENGTH)(examples)
    packed = {k: v.to(device) for k, v in packed.items()}
    assert len(packed["input_ids"]) < len(examples)  # several sequences share a row
    with torch.no_grad():
        unpacked_lp, unpacked_mask = shifted_logprobs(
            forward_logits(model, padded["input_ids"], padded["attention_mask"]), padded["labels"]
        )
        packed_lp, packed_mask = shifted_logprobs(
            packed_logits(model, packed["input_ids"], packed["position_ids"]), packed["labels"]
        )
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows = pack_rows(lengths, ROW_LENGTH)
    alone = per_sequence_logprobs(unpacked_lp, unpacked_mask, [[n] for n in lengths])
    together = per_sequence_logprobs(packed_lp, packed_mask, [[lengths[i] for i in row] for row in rows])
    order = [i for row in rows for i in row]
    for got, i in zip(together, order, strict=True):
        assert len(got) == lengths[i] - 1
        torch.testing.assert_close(got, alone[i], atol=1e-5, rtol=0)
    assert packed_mask.sum() == unpacked_mask.sum() == sum(lengths) - len(lengths)


def tiny_sft(loss_on="response"):
    torch.manual_seed(0)
    module = SFTModule(model_config=TINY_CONFIG, loss_on=loss_on)
    module.configure_model()
    return module


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_sft_loss_of_a_packed_batch_equals_the_padded_one(loss_on):
    """SFTModule's loss and scored-token count on the same demonstrations, padded vs packed. With loss_on="all" it
    fails if a packed sequence's first token is scored (predicted from the sequence before it)."""
    module = tiny_sft(loss_on).eval()
    examples = demonstrations()
    padded = DemonstrationCollator(module.tokenizer.pad_token_id)(examples)
    packed = PackedDemonstrationCollator(module.tokenizer.pad_token_id, ROW_LENGTH)(examples)
    with torch.no_grad():
        padded_loss, padded_n = module._loss(padded)
        packed_loss, packed_n = module._loss(packed)
    assert packed_n == padded_n
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)


MASK_IGNORED = "sdpa_without_mask"


def sdpa_without_mask(module, query, key, value, attention_mask, **kwargs):
    """Plain causal attention whatever mask it is given, as some attention kernels outside masking_utils do."""
    return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})


AttentionInterface.register(MASK_IGNORED, sdpa_without_mask)


def test_a_model_that_attends_across_packed_sequences_is_refused():
    """A model whose attention ignores packed positions is refused at the first packed batch, before any loss; the
    same model with sdpa passes. Fails if the check is skipped or always passes."""
    module = tiny_sft()
    check_packed_attention(module.model, torch.device("cpu"))
    module.model.set_attn_implementation(MASK_IGNORED)
    batch = PackedDemonstrationCollator(module.tokenizer.pad_token_id, ROW_LENGTH)(demonstrations())
    with pytest.raises(ValueError, match=f"attn_implementation='{MASK_IGNORED}' attends across packed sequences"):
        module._loss(batch)


def demonstrations_file(tmp_path):
    words = ["abc", "hello", "xyz", "lightning", "rlhf", "qwerty", "moon", "sun", "a", "packing", "io", "rows"]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Reverse: {w}\n", "response": w[::-1]}) + "\n" for w in words))
    return str(path)


def test_packed_training_matches_padded_and_resumes_mid_epoch(tmp_path):
    """The same 6 steps (2 epochs of 3 batches of 4) padded and packed log the same losses step by step; a packed run
    resumed from its step-2 checkpoint (mid-epoch) trains on the same batches and logs the same losses."""

    def fit(packing, root):
        def run(callbacks, ckpt_path):
            L.seed_everything(0)
            module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
            data = DemonstrationDataModule(
                train_path=demonstrations_file(tmp_path), val_fraction=0, batch_size=4, max_length=48, packing=packing
            )
            L.Trainer(
                accelerator="cpu",
                max_steps=6,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
                callbacks=callbacks,
            ).fit(module, data, ckpt_path=ckpt_path)

        return run

    metrics = ("train/loss", "train/scored_tokens")
    packed, resumed = straight_and_resumed(fit(True, tmp_path / "packed"), metrics, 2, tmp_path / "packed")
    padded = StepRecorder(metrics)
    fit(False, tmp_path / "padded")([padded], None)
    assert len(packed.metrics) == 6 and any(len(rows) < 4 for rows in packed.batches)  # rows were shared
    torch.testing.assert_close(torch.tensor(packed.metrics), torch.tensor(padded.metrics), atol=1e-5, rtol=0)
    assert resumed.batches == packed.batches[2:]
    torch.testing.assert_close(torch.tensor(resumed.metrics), torch.tensor(packed.metrics[2:]), atol=1e-5, rtol=0)


def test_sft_packed_config_is_the_sft_config_with_packing():
    """configs/sft_packed.yaml is configs/sft.yaml with packing on and its outputs elsewhere, nothing else."""
    packed, unpacked = (
        yaml.safe_load((REPO / "configs" / name).read_text()) for name in ("sft_packed.yaml", "sft.yaml")
    )
    assert packed["data"]["init_args"].pop("packing") is True
    assert json.loads(json.dumps(packed).replace("outputs/sft_packed", "outputs/sft")) == unpacked


@pytest.mark.slow
def test_sft_packed_config_runs_and_logs_as_the_unpacked_config(tmp_path):
    """configs/sft_packed.yaml and configs/sft.yaml, 4 steps each with validation after 2 and 4: the same metric
    names, the same losses step by step (the same batches, packed or not) and the same validation losses."""
    overrides = ("--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2")
    (tmp_path / "packed").mkdir()
    (tmp_path / "padded").mkdir()
    packed = fit_config("sft_packed.yaml", tmp_path / "packed", *overrides)
    padded = fit_config("sft.yaml", tmp_path / "padded", *overrides)
    assert sorted(packed.Tags()["scalars"]) == sorted(padded.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "val/loss", "val/ppl"} <= set(packed.Tags()["scalars"])
    for tag in ("train/loss", "val/loss"):
        values = [torch.tensor([event.value for event in events.Scalars(tag)]) for events in (packed, padded)]
        assert len(values[0]) == (4 if tag == "train/loss" else 2)
        torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
