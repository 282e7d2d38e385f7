"""The shared-prompt layout (each prompt once, then its responses, several prompts per padding-free row) gives each
response the log-probs, reward, losses and gradients of the padded layout, on RoPE (Llama) and learned absolute
positions (GPT-2), sdpa and eager; models it is not exact for are refused."""

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightning_rlhf import ComparisonDataModule, DPOModule, RewardModule
from lightning_rlhf.data.collate import ComparisonCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.shared_prompt import SharedPromptCollator, shared_attention_mask, shared_prompt_group
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.preference import dpo_loss, ranking_loss
from lightning_rlhf.models.causal_lm import load_causal_lm, sequence_logprobs
from lightning_rlhf.models.reward import OFFSET_KEY, load_reward_model, sequence_rewards
from lightning_rlhf.models.shared_forward import (
    MASK_FORMS,
    check_shared_prompt_attention,
    model_mask,
    shared_rewards,
    shared_sequence_logprobs,
)
from lightning_rlhf.modules.preference_batches import row_keys
from lightning_rlhf.toy.reverse import make_comparisons
from tests.helpers import StepRecorder, make_tiny_export, make_tiny_gpt2_export

# Rows of 40 tokens: the first two prompts' groups share a row, the third (longer) has a row of its own.
COMPARISONS = [
    ("Reverse: abc\n", ["cba", "abc", "cab"], [0, 2, 1]),
    ("Reverse: xy\n", ["yx", ""], [0, 1]),
    ("Reverse: hello world\n", ["dlrow olleh", "hello", "dlrow", "x"], [0, 3, 1, 1]),
]
ROW_LENGTH = 40


def comparisons(items=COMPARISONS, max_length=48):
    tokenizer = Tokenizer(load_tokenizer(None), max_length)
    records = [Record(f"test {i}", {"prompt": p, "responses": r, "ranks": k}) for i, (p, r, k) in enumerate(items)]
    return tokenizer.comparisons(records)


def test_shared_prompt_group_hand_worked():
    """Prompt [5, 6], responses [7, 8] and [9]: the row 5 6 7 8 9; positions 0 1 | 2 3 | 2 (the second response
    starts where the prompt ends, as if alone); branches 0 0 1 1 2; last tokens at columns 3 and 4. Token 7 is
    predicted from column 1 (the prompt's last), 8 from column 2 (7), and 9 from column 1 again, not from 8.
    Catches positions counted on through the row (4 for token 9) and a first token predicted from the sibling."""
    group = shared_prompt_group([5, 6], [[7, 8], [9]])
    assert group.input_ids == [5, 6, 7, 8, 9]
    assert group.position_ids == [0, 1, 2, 3, 2]
    assert group.branch == [0, 0, 1, 1, 2]
    assert group.last == [3, 4]
    assert (group.sources, group.targets, group.owners) == ([1, 2, 1], [7, 8, 9], [0, 0, 1])
    with pytest.raises(ValueError, match="at least one token in each response"):
        shared_prompt_group([5], [[7], []])


def visible(mask):
    """For each query column of each row, the key columns it sees."""
    return [[torch.nonzero(query).flatten().tolist() for query in row[0]] for row in mask]


def test_shared_collator_packs_groups_and_masks_siblings_hand_worked():
    """A: prompt [5, 6], responses [7, 8] (rank 1) and [9] (rank 0); B: prompt [1], responses [2] and [3, 4], tied.

    Rows of 9: A ⊕ B in one row 5 6 7 8 9 1 2 3 4, positions 0 1 2 3 2 | 0 1 1 2. Each token sees its group's prompt
    and its own earlier tokens: 9 (column 4) sees 0 1 4, not 7 8; B's 3 (column 7) sees 5 and itself, nothing of A.
    Rewards at A's 8 and 9 (columns 3, 4), B's 2 and 4 (6, 8). Log-prob sources: 7←1, 8←2, 9←1, 2←5, 3←5, 4←7. Flat
    responses A0 A1 B0 B1; the one pair: A1 better than A0, (1, 0).
    Rows of 5: B gets a row of its own, padded by one token that sees only itself (never nothing: NaN in sdpa).
    Catches a sibling or another group seen, padding seen, positions not restarted per group."""
    examples = [
        {"prompt_ids": [5, 6], "response_ids": [[7, 8], [9]], "ranks": [1, 0]},
        {"prompt_ids": [1], "response_ids": [[2], [3, 4]], "ranks": [0, 0]},
    ]
    batch = SharedPromptCollator(pad_token_id=0, row_length=9)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert visible(batch["attention_mask"]) == [
        [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [5], [5, 6], [5, 7], [5, 7, 8]]
    ]
    assert batch["reward_index"].tolist() == [3, 4, 6, 8]
    assert batch["logprob_index"].tolist() == [1, 2, 1, 5, 5, 7]
    assert batch["logprob_targets"].tolist() == [7, 8, 9, 2, 3, 4]
    assert batch["logprob_owner"].tolist() == [0, 0, 1, 2, 3, 3]
    assert batch["pairs"].tolist() == [[1, 0]]
    assert batch["response_index"].tolist() == [[0, 1], [2, 3]]

    batch = SharedPromptCollator(pad_token_id=0, row_length=5)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert visible(batch["attention_mask"])[1] == [[0], [0, 1], [0, 2], [0, 2, 3], [4]]
    assert batch["reward_index"].tolist() == [3, 4, 6, 8]  # B's flat indices: row 1 · 5 + columns 1, 3
    assert batch["logprob_index"].tolist() == [1, 2, 1, 5, 5, 7]


def test_shared_attention_mask_keeps_padding_to_itself():
    """One group of prompt [p] and responses [a] [b], then two padding columns: the padding sees earlier padding
    and itself, no real token sees padding, and b does not see a. Catches padding given no key at all."""
    mask = shared_attention_mask(torch.tensor([[0, 0, 0, -1, -1]]), torch.tensor([[0, 1, 2, 0, 0]]))
    assert visible(mask) == [[[0], [0, 1], [0, 2], [3], [3, 4]]]


def test_sequence_keys_match_the_padded_rows():
    """The shared collator's digest of each response equals ``row_keys`` of its padded row, so reference log-probs
    cached from either layout serve the other. Catches keys in another order or without the prompt. Every value of
    the batch is a tensor: catches keys handed over as ``bytes``, which Lightning's batch transfer walks byte by byte
    (12 ms of the reward model's 69 ms step on the toy)."""
    examples = comparisons()
    padded = ComparisonCollator(0)(examples)
    shared = SharedPromptCollator(0, ROW_LENGTH)(examples)
    assert row_keys(shared) == row_keys(padded)
    keys = row_keys(shared)
    assert len(set(keys)) == len(keys) == shared["sequence_keys"].size(0)
    assert all(isinstance(value, torch.Tensor) for value in shared.values())


ARCHITECTURES = {"llama": make_tiny_export, "gpt2": make_tiny_gpt2_export}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_prompt")
    return {name: make(root / name) for name, make in ARCHITECTURES.items()}


def batches(tokenizer, device="cpu"):
    examples = comparisons()
    padded = ComparisonCollator(tokenizer.pad_token_id)(examples)
    shared = SharedPromptCollator(tokenizer.pad_token_id, ROW_LENGTH)(examples)
    assert len(shared["input_ids"]) == 2  # two groups shared a row
    move = lambda batch: {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    return move(padded), move(shared)


def siblings_visible(batch):
    """The mutation: every token of a group sees all earlier tokens of its group, siblings included."""
    mask = batch["attention_mask"]
    causal = torch.ones(mask.shape[-2:], dtype=torch.bool).tril()
    first_seen = mask[:, 0].float().argmax(-1)  # (r, t) the first column each token sees: its group's start
    same_group = first_seen[:, :, None] == first_seen[:, None, :]
    return {**batch, "attention_mask": (same_group & causal)[:, None]}


def positions_from_zero(batch):
    """The mutation: positions counted on through each group (a response does not restart at the prompt's end)."""
    starts = batch["attention_mask"][:, 0].float().argmax(-1)  # (r, t) first column of each token's group
    columns = torch.arange(starts.size(-1)).expand_as(starts)
    return {**batch, "position_ids": columns - starts}


MUTATIONS = {"siblings_visible": siblings_visible, "positions_from_zero": positions_from_zero}


def parameter_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_rewards_ranking_loss_and_gradients_equal_the_padded_layout(exports, architecture, attn):
    """Each response's reward, the ranking loss and every parameter's gradient: shared layout = padded layout to
    1e-5. The mutations (siblings visible; positions not continuing from the prompt's end) must move the rewards by
    far more: they catch a mask or position bug, and the test could fail."""
    tokenizer = load_tokenizer(exports[architecture])
    model = load_reward_model(exports[architecture], tokenizer).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():  # a fresh head gives rewards of about 1e-2: made 100x larger, 1e-5 is a tighter bound
        model.score.weight *= 100
    check_shared_prompt_attention(model, torch.device("cpu"), hidden=True)
    padded, shared = batches(tokenizer)

    def loss_and_grads(rewards, batch):
        model.zero_grad()
        loss = ranking_loss(rewards[batch["response_index"].clamp(min=0)], batch["ranks"])
        loss.backward()
        return loss.detach(), parameter_grads(model)

    padded_rewards = sequence_rewards(model, padded["input_ids"], padded["attention_mask"], subtract_offset=False)
    shared_rewards_ = shared_rewards(model, shared, subtract_offset=False)
    torch.testing.assert_close(shared_rewards_, padded_rewards, atol=1e-5, rtol=0)
    padded_loss, padded_grads = loss_and_grads(padded_rewards, padded)
    shared_loss, shared_grads = loss_and_grads(shared_rewards_, shared)
    torch.testing.assert_close(shared_loss, padded_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grads, padded_grads, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for name, mutate in MUTATIONS.items():
            off = (shared_rewards(model, mutate(shared), subtract_offset=False) - padded_rewards).abs().max()
            assert off > 1e-4, name  # 10x the tolerance: the equality above would fail


def test_both_layouts_subtract_the_offset_alike_and_the_reward_module_ranks_raw_rewards(tiny_model_dir):
    """With ``reward_offset`` = 0.5 stored: read with no ``subtract_offset``, the padded and the shared-prompt
    read-outs both give raw - 0.5 (one default); with ``subtract_offset=False`` both give the raw rewards, and so
    does ``RewardModule._rewards`` (what the ranking loss sees) in either layout. Catches the two read-outs'
    defaults drifting apart again (the shared one defaulted to raw) and a module that ranks offset rewards in one
    layout only."""
    tokenizer = load_tokenizer(tiny_model_dir)
    module = RewardModule(tiny_model_dir)
    module.configure_model()
    module.model.eval()
    setattr(module.model.config, OFFSET_KEY, 0.5)
    padded, shared = batches(tokenizer)
    with torch.no_grad():
        raw = sequence_rewards(module.model, padded["input_ids"], padded["attention_mask"], subtract_offset=False)
        torch.testing.assert_close(shared_rewards(module.model, shared, subtract_offset=False), raw, atol=1e-5, rtol=0)
        by_default = sequence_rewards(module.model, padded["input_ids"], padded["attention_mask"])
        torch.testing.assert_close(by_default, raw - 0.5, atol=1e-6, rtol=0)
        torch.testing.assert_close(shared_rewards(module.model, shared), raw - 0.5, atol=1e-5, rtol=0)
        torch.testing.assert_close(module._rewards(padded), raw, atol=1e-6, rtol=0)
        torch.testing.assert_close(module._rewards(shared), raw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_log_probs_dpo_loss_and_gradients_equal_the_padded_layout(exports, architecture, attn):
    """Each response's summed log-prob and token count, a DPO loss over the batch's pairs and every parameter's
    gradient: shared = padded to 1e-5 (a fixed reference of zeros). The mutations must move the log-probs."""
    tokenizer = load_tokenizer(exports[architecture])
    model = load_causal_lm(exports[architecture], tokenizer).eval()
    model.set_attn_implementation(attn)
    check_shared_prompt_attention(model, torch.device("cpu"))
    padded, shared = batches(tokenizer)

    def loss_and_grads(logps, batch):
        model.zero_grad()
        chosen, rejected = batch["pairs"].unbind(-1)
        zeros = torch.zeros(len(chosen))
        loss = dpo_loss(logps[chosen], logps[rejected], zeros, zeros)[0].mean()
        loss.backward()
        return loss.detach(), parameter_grads(model)

    padded_logps, padded_counts = sequence_logprobs(
        model, padded["input_ids"], padded["attention_mask"], padded["labels"]
    )
    shared_logps, shared_counts = shared_sequence_logprobs(model, shared)
    assert shared_counts.tolist() == padded_counts.tolist()
    torch.testing.assert_close(shared_logps, padded_logps, atol=1e-5, rtol=0)
    padded_loss, padded_grads = loss_and_grads(padded_logps, padded)
    shared_loss, shared_grads = loss_and_grads(shared_logps, shared)
    torch.testing.assert_close(shared_loss, padded_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grads, padded_grads, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for name, mutate in MUTATIONS.items():
            off = (shared_sequence_logprobs(model, mutate(shared))[0] - padded_logps).abs().max()
            assert off > 1e-4, name  # 10x the tolerance: the equality above would fail


MASK_IGNORED = "sdpa_ignoring_the_mask"


def sdpa_ignoring_the_mask(module, query, key, value, attention_mask, **kwargs):
    """Plain causal attention whatever mask it is given, as kernels that take no custom mask do."""
    return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})


AttentionInterface.register(MASK_IGNORED, sdpa_ignoring_the_mask)


def test_models_the_layout_is_not_exact_for_are_refused(exports, monkeypatch):
    """An attention implementation that cannot take the mask is refused by name (flash attention); one that takes
    it but ignores it fails the numerical check. Catches the check skipped or always passing."""
    tokenizer = load_tokenizer(exports["llama"])
    model = load_causal_lm(exports["llama"], tokenizer).eval()
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"), dtype=torch.float32)
    with pytest.raises(ValueError, match="'flash_attention_2' cannot take the shared-prompt mask"):
        model_mask(flash, torch.ones(1, 1, 2, 2, dtype=torch.bool))  # not installed here: the name alone is refused
    model.set_attn_implementation(MASK_IGNORED)
    monkeypatch.setitem(MASK_FORMS, MASK_IGNORED, MASK_FORMS["sdpa"])
    with pytest.raises(ValueError, match="is not exact in the shared-prompt layout"):
        check_shared_prompt_attention(model, torch.device("cpu"))


def comparisons_file(tmp_path, n=12):
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in make_comparisons(n)))
    return str(path)


STAGES = {
    "rm": (lambda path: RewardModule(path, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)), "val/accuracy"),
    "dpo": (lambda path: DPOModule(path, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)), "val/rewards/accuracies"),
    "dpo_precomputed": (
        lambda path: DPOModule(path, precompute_ref_logprobs=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)),
        "val/rewards/accuracies",
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_training_is_the_same_step_by_step_in_either_layout(tiny_model_dir, tmp_path, stage):
    """Four optimiser steps (two epochs of two batches of 4 prompts with 3-4 responses each) from the same weights,
    padded vs shared-prompt: the same losses step by step and the same validation loss and accuracy, to 1e-5; the
    reference log-probs precomputed in the shared layout serve its batches (their keys match). Catches a response
    read or scored out of order, a pair weighed differently, a cache keyed by row."""
    train = comparisons_file(tmp_path)
    make_module, accuracy = STAGES[stage]

    def fit(shared):
        L.seed_everything(0)
        module = make_module(tiny_model_dir)
        data = ComparisonDataModule(
            train_path=train,
            tokenizer_name_or_path=tiny_model_dir,
            val_fraction=0.25,
            batch_size=4,
            max_length=48,
            shared_prompt=shared,
            row_length=64,
        )
        recorder = StepRecorder(("train/loss",))
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[recorder],
            default_root_dir=tmp_path / str(shared),
        )
        trainer.fit(module, data)
        return recorder, [float(trainer.callback_metrics[name]) for name in ("val/loss", accuracy)]

    (padded, padded_val), (shared, shared_val) = fit(False), fit(True)
    assert len(padded.metrics) == 4
    assert all(len(rows) < 4 * 3 for rows in shared.batches)  # each prompt once: fewer rows than responses
    torch.testing.assert_close(torch.tensor(shared.metrics), torch.tensor(padded.metrics), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(shared_val), torch.tensor(padded_val), atol=1e-5, rtol=0)
