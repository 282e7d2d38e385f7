"""Generation on left-padded prompts: responses masked after EOS, padding does not change what is generated."""

import pytest
import torch

from lightning_rlhf.data.collate import PromptCollator
from lightning_rlhf.models import load_causal_lm, load_tokenizer
from lightning_rlhf.rollout import decode_responses, generate, mask_after_eos


def test_mask_after_eos_keeps_the_first_eos_and_nothing_after():
    """EOS = 2. Row 0: a b EOS c EOS -> 1 1 1 0 0; row 1 has no EOS -> all kept; row 2 starts with EOS."""
    responses = torch.tensor([[7, 8, 2, 9, 2], [7, 8, 9, 9, 9], [2, 7, 7, 7, 7]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask_after_eos(responses, 2), expected)


def prompts_batch(tokenizer, texts):
    return PromptCollator(tokenizer.pad_token_id)([{"input_ids": tokenizer(t)["input_ids"]} for t in texts])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_generation_does_not_depend_on_left_padding(tiny_model_dir, device):
    """A short prompt generated alone and next to a much longer one (so left-padded by 20) decodes the same."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer).to(device)
    alone = {k: v.to(device) for k, v in prompts_batch(tokenizer, ["Reverse: ab\n"]).items()}
    padded = prompts_batch(tokenizer, ["Reverse: ab\n", "Reverse: " + "x" * 20 + "\n"])
    padded = {k: v.to(device) for k, v in padded.items()}
    first = generate(model, tokenizer, alone["input_ids"], alone["attention_mask"], max_new_tokens=12, temperature=0)
    second = generate(model, tokenizer, padded["input_ids"], padded["attention_mask"], max_new_tokens=12, temperature=0)
    assert decode_responses(tokenizer, first)[0] == decode_responses(tokenizer, second)[0]
    assert model.training  # restored after generation


def test_rollout_masks_and_pads_after_eos(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    batch = prompts_batch(tokenizer, ["Reverse: abc\n", "Reverse: hello\n"])
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=30)
    responses = rollout.responses
    assert rollout.sequences.shape[1] == batch["input_ids"].shape[1] + responses.shape[1]
    assert torch.equal(rollout.response_mask, mask_after_eos(responses, tokenizer.eos_token_id))
    assert (responses[~rollout.response_mask] == tokenizer.pad_token_id).all()
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length :], rollout.response_mask.long())
