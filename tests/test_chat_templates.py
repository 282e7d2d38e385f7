"""Real checkpoints' tokenizers (byte-level BPE, a chat template, no pad token): a response ends at its end-of-turn
token exactly once, in SFT labels, comparisons, DPO's log-probs, the reward model's read-out and PPO's rollouts."""

import pytest
import torch

from lightning_rlhf.data.collate import ComparisonCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import IGNORE_INDEX
from lightning_rlhf.models.causal_lm import load_causal_lm, sequence_logprobs
from lightning_rlhf.models.reward import load_reward_model, sequence_rewards
from lightning_rlhf.rl.generation import generate
from tests.helpers import TINY_CONFIG, bpe_tokenizer

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
PROMPT = [{"role": "user", "content": "Reverse: abcde"}]


def saved_tokenizer(tmp_path, style: str, **specials: str):
    """The BPE tokenizer as a checkpoint ships it, loaded back through the package's own path."""
    bpe_tokenizer(style, **specials).save_pretrained(tmp_path / style)
    return load_tokenizer(str(tmp_path / style))


def scored_tokens(example) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_a_chat_response_ends_at_its_end_of_turn_token_exactly_once(tmp_path, style):
    """ChatML renders the reply as 'edcba<|im_end|>\\n': the labels are 'edcba<|im_end|>' (the trailing newline is
    template text after the turn's end), not 'edcba<|im_end|>\\n<|im_end|>' with EOS appended once more."""
    tokenizer = saved_tokenizer(tmp_path, style)
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == END_OF_TURN[style]
    record = Record("line 1", {"prompt": PROMPT, "response": "edcba"})
    (example,) = Tokenizer(tokenizer, max_length=64).demonstrations([record])
    assert tokenizer.decode(scored_tokens(example)) == "edcba" + END_OF_TURN[style]
    assert example["input_ids"][-1] == eos and example["input_ids"].count(eos) == 2  # the user's turn and the reply
    whole = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": "edcba"}], tokenize=False)
    assert whole.startswith(tokenizer.decode(example["input_ids"]))  # a prefix of the template's rendering


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_comparison_responses_and_their_dpo_logprobs_end_at_the_end_of_turn(tmp_path, style):
    """Each ranked response is scored up to and including its one end-of-turn token: 'ab<|im_end|>' counts the
    tokens of 'ab' plus 1 in DPO's summed log-probs, whatever the longer response beside it."""
    tokenizer = saved_tokenizer(tmp_path, style)
    record = Record("line 1", {"prompt": PROMPT, "responses": ["edcba", "ab"], "ranks": [0, 1]})
    (example,) = Tokenizer(tokenizer, max_length=64).comparisons([record])
    for text, response_ids in zip(["edcba", "ab"], example["response_ids"], strict=True):
        assert tokenizer.decode(response_ids) == text + END_OF_TURN[style]
    batch = ComparisonCollator(tokenizer.pad_token_id)([example])
    model = load_causal_lm(None, tokenizer, model_config=TINY_CONFIG)
    _, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = [len(tokenizer("edcba", add_special_tokens=False)["input_ids"]) + 1]
    expected.append(len(tokenizer("ab", add_special_tokens=False)["input_ids"]) + 1)
    assert counts.tolist() == expected


def test_plain_text_responses_still_get_eos_appended(tmp_path):
    tokenizer = saved_tokenizer(tmp_path, "chatml")
    record = Record("line 1", {"prompt": "p", "response": "ab"})
    (example,) = Tokenizer(tokenizer, max_length=64).demonstrations([record])
    assert scored_tokens(example) == tokenizer("ab", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_a_template_that_ends_turns_with_another_token_than_eos_is_refused(tmp_path):
    """A Llama-3 template closes turns with <|eot_id|>; with EOS <|end_of_text|> a response would end in both and
    generation (stopping at EOS) would run past the turn: an error says which token to make EOS."""
    tokenizer = saved_tokenizer(tmp_path, "llama3", eos_token="<|end_of_text|>")
    record = Record("line 1", {"prompt": PROMPT, "response": "edcba"})
    with pytest.raises(ValueError, match=r"ends a turn with '<\|eot_id\|>' but the tokenizer's EOS is '<\|end_of_te"):
        Tokenizer(tokenizer, max_length=64).demonstrations([record])


def test_the_reward_model_reads_rollouts_where_it_was_trained(tmp_path, monkeypatch):
    """PPO's rollout ends at the first <|im_end|> the policy samples (what follows is masked); the reward model was
    trained and normalised on comparison rows ending at their end-of-turn token. Both rows must read the same state,
    so the reward of a rollout equals the reward of the same response as a training row."""
    tokenizer = saved_tokenizer(tmp_path, "chatml")
    torch.manual_seed(0)
    reward_model = load_reward_model(None, tokenizer, model_config=TINY_CONFIG).eval()
    record = Record("line 1", {"prompt": PROMPT, "responses": ["edcba", "ab"], "ranks": [0, 1]})
    (example,) = Tokenizer(tokenizer, max_length=64).comparisons([record])
    batch = ComparisonCollator(tokenizer.pad_token_id)([example])
    trained_rewards = sequence_rewards(reward_model, batch["input_ids"], batch["attention_mask"])

    # The policy samples each reply, its <|im_end|>, then template text and more tokens, which the rollout masks.
    prompt, eos = example["prompt_ids"], tokenizer.eos_token_id
    after_the_turn = tokenizer("\nthe fox", add_special_tokens=False)["input_ids"]
    replies = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in ("edcba", "ab")]
    width = max(map(len, replies)) + len(after_the_turn)
    sampled = torch.tensor([prompt + (r + after_the_turn + [eos] * width)[:width] for r in replies])
    policy = load_causal_lm(None, tokenizer, model_config=TINY_CONFIG)
    monkeypatch.setattr(policy, "generate", lambda **kwargs: sampled.clone())
    prompts = torch.tensor([prompt, prompt])
    rollout = generate(policy, tokenizer, prompts, torch.ones_like(prompts), max_new_tokens=width)
    rollout_rewards = sequence_rewards(reward_model, rollout.sequences, rollout.attention_mask)
    torch.testing.assert_close(rollout_rewards, trained_rewards)
