"""Multi-turn SFT (``data/conversations.py``): a conversation with tool calls is tokenized turn by turn, its labels
train each assistant turn's content through its EOS and mask the prompt, the template's text between turns and the
tool's answer; an RL episode built from the same pieces is the same token stream."""

import json

import pytest

from lightning_rlhf.data.conversations import (
    NotPrefixStable,
    assistant_turn_ids,
    conversation_ids,
    encode,
    observation_ids,
    prompt_ids,
    render,
)
from lightning_rlhf.data.datamodules import DemonstrationDataModule
from lightning_rlhf.data.records import Record, RecordError, validate_demonstration
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.losses.tokens import IGNORE_INDEX
from tests.helpers import bpe_tokenizer

STYLES = ["chatml", "llama3"]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

USER = {"role": "user", "content": "Reverse: abcde"}
CALL_TEXT = "reverse(abcde)"
CALL = {
    "role": "assistant",
    "content": CALL_TEXT,
    "tool_calls": [{"type": "function", "function": {"name": "reverse", "arguments": {"text": "abcde"}}}],
}
TOOL = {"role": "tool", "name": "reverse", "content": "edcba"}
ANSWER_TEXT = "the fox: edcba"
ANSWER = {"role": "assistant", "content": ANSWER_TEXT}
CONVERSATION = [USER, CALL, TOOL, ANSWER]

# The text each template writes around the messages (tests/helpers.py's CHAT_STYLES), spelled out by hand.
UNTRAINED = {
    "chatml": "<|im_start|>user\nReverse: abcde<|im_end|>\n<|im_start|>assistant\n"
    "\n<|im_start|>tool\nedcba<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nReverse: abcde<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "<|start_header_id|>tool<|end_header_id|>\n\nedcba<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


def split_by_labels(tokenizer, input_ids, labels) -> tuple[str, str]:
    """The decoded text of the labelled tokens and that of the unlabelled ones, each in stream order."""
    assert len(input_ids) == len(labels)
    for token, label in zip(input_ids, labels, strict=True):
        assert label in (IGNORE_INDEX, token)  # a label is the token itself or masked, never another token
    trained = [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    untrained = [t for t, label in zip(input_ids, labels, strict=True) if label == IGNORE_INDEX]
    return tokenizer.decode(trained), tokenizer.decode(untrained)


@pytest.mark.parametrize("style", STYLES)
def test_every_assistant_turn_is_trained_and_the_tool_turn_is_masked(style):
    """[user, assistant (tool call), tool, assistant]: ChatML renders
    '<|im_start|>user\\nReverse: abcde<|im_end|>\\n<|im_start|>assistant\\nreverse(abcde)<|im_end|>\\n<|im_start|>tool
    \\nedcba<|im_end|>\\n<|im_start|>assistant\\nthe fox: edcba<|im_end|>\\n'. The labelled tokens decode to exactly
    'reverse(abcde)<|im_end|>' + 'the fox: edcba<|im_end|>' (Llama 3: with <|eot_id|>); everything else (the prompt
    and generation prompt, ChatML's '\\n' after a turn's <|im_end|>, the tool's turn, the next generation prompt) is
    masked. The stream is the template's tokens of the whole conversation, without ChatML's final '\\n' (the last turn
    ends at its EOS).

    Catches: training the tool's answer or the prompt; the turn's EOS left out of the labels or the '\\n' after it
    put in; a piece of the stream missing or written twice (e.g. the remainder '\\n' dropped, or the generation prompt
    repeated)."""
    tokenizer = bpe_tokenizer(style)
    eot = END_OF_TURN[style]
    assert tokenizer.eos_token == eot
    input_ids, labels = conversation_ids(tokenizer, CONVERSATION)
    trained, untrained = split_by_labels(tokenizer, input_ids, labels)
    assert trained == CALL_TEXT + eot + ANSWER_TEXT + eot
    assert untrained == UNTRAINED[style]
    assert input_ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert input_ids.count(tokenizer.eos_token_id) == 4  # user, call, tool, answer: each turn ends once

    whole = render(tokenizer, CONVERSATION, None, generation_prompt=False)
    expected_text = whole.removesuffix("\n") if style == "chatml" else whole  # ChatML writes '\n' after the last EOS
    assert whole.endswith(eot + ("\n" if style == "chatml" else ""))
    assert tokenizer.decode(input_ids) == expected_text
    assert input_ids == encode(tokenizer, expected_text)


@pytest.mark.parametrize("style", STYLES)
def test_only_the_last_assistant_turn_is_trained_when_asked(style):
    """``all_assistant_turns=False``: the same stream as with every turn trained, but the labels hold only
    'the fox: edcba' + EOS; the tool call 'reverse(abcde)' + EOS is masked like the prompt.

    Catches: the option ignored (both turns trained), or applied to the wrong turn (the first trained instead), or
    changing the input ids rather than only the labels."""
    tokenizer = bpe_tokenizer(style)
    eot = END_OF_TURN[style]
    all_ids, all_labels = conversation_ids(tokenizer, CONVERSATION)
    input_ids, labels = conversation_ids(tokenizer, CONVERSATION, all_assistant_turns=False)
    assert input_ids == all_ids
    trained, untrained = split_by_labels(tokenizer, input_ids, labels)
    assert trained == ANSWER_TEXT + eot
    # Masked: everything the template writes before the last turn, the first turn's call and its EOS included.
    whole = render(tokenizer, CONVERSATION, None, generation_prompt=False)
    assert untrained + trained == (whole.removesuffix("\n") if style == "chatml" else whole)
    assert CALL_TEXT + eot in untrained
    # The labelled positions are a subset of those trained with every turn: the answer's, at the stream's end.
    answer_len = len(encode(tokenizer, ANSWER_TEXT + eot))
    assert [label != IGNORE_INDEX for label in labels] == [False] * (len(labels) - answer_len) + [True] * answer_len
    assert sum(label != IGNORE_INDEX for label in all_labels) > answer_len


@pytest.mark.parametrize("style", STYLES)
def test_an_episode_built_turn_by_turn_is_the_stream_sft_trains_on(style):
    """The RL episode (``rl/episodes.py``): the prompt's ids with the generation prompt, the policy's turn through its
    EOS (what ``assistant_turn_ids`` trains), the environment's answer as ``observation_ids(history, [tool])`` (which
    opens with the template's text after the turn's EOS, ChatML's '\\n'), then the last turn. Concatenated, they are
    ``conversation_ids``' input ids, and the policy's pieces are exactly its labelled positions.

    Catches: an observation that drops the remainder after EOS (ChatML's stream would lack its '\\n') or repeats the
    EOS, or SFT building its stream from other pieces than the episode does."""
    tokenizer = bpe_tokenizer(style)
    prompt = prompt_ids(tokenizer, [USER])
    first = assistant_turn_ids(tokenizer, [USER], CALL)[0]
    # The episode keeps the history as the decoded turn's content (the env reads it; tool_calls are not kept).
    content = tokenizer.decode(first, skip_special_tokens=True)
    assert content == CALL_TEXT
    history = [USER, {"role": "assistant", "content": content}]
    observation = observation_ids(tokenizer, history, [TOOL])
    last = assistant_turn_ids(tokenizer, [*history, TOOL], ANSWER)[0]
    assert first[-1] == last[-1] == tokenizer.eos_token_id
    if style == "chatml":
        assert tokenizer.decode(observation).startswith("\n<|im_start|>tool\n")

    input_ids, labels = conversation_ids(tokenizer, CONVERSATION)
    assert prompt + first + observation + last == input_ids
    policy = [False] * len(prompt) + [True] * len(first) + [False] * len(observation) + [True] * len(last)
    assert [label != IGNORE_INDEX for label in labels] == policy


# Renders an earlier assistant turn as '[...]' once a later message exists (as templates that drop earlier turns'
# reasoning do): the rendering of [user, assistant, tool] does not start with that of [user, assistant].
REWRITING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '[...]' }}{% else %}{{ message['content'] }}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """With REWRITING_TEMPLATE the first turn renders as 'reverse(abcde)' while it is last and as '[...]' once the
    tool answers: the observation is no extension of the history, so ``conversation_ids`` raises ``NotPrefixStable``
    (instead of silently training on a stream no template rendering matches), and ``Tokenizer.demonstrations`` turns
    it into the ``RecordError`` naming the record and field 'response'.

    Catches: ``_extension`` not checking the prefix (slicing a rewritten text), or the error escaping the tokenizer
    as a bare ``NotPrefixStable`` without the record's location."""
    tokenizer = bpe_tokenizer("chatml")
    tokenizer.chat_template = REWRITING_TEMPLATE
    # The template itself is fine on a single turn: only the longer conversation breaks the prefix.
    assistant_turn_ids(tokenizer, [USER], CALL)
    with pytest.raises(NotPrefixStable, match="does not render new messages as an extension"):
        conversation_ids(tokenizer, CONVERSATION)

    record = Record("data.jsonl line 3", {"prompt": [USER], "response": [CALL, TOOL, ANSWER]})
    with pytest.raises(RecordError, match=r"^data\.jsonl line 3: field 'response': the chat template does not") as err:
        Tokenizer(tokenizer, max_length=256).demonstrations([record])
    assert not isinstance(err.value, NotPrefixStable)


def test_a_prefix_stable_template_is_not_refused():
    """The control for the test above: the same template without the rewrite (CHAT_STYLES' ChatML) tokenizes the same
    record, so the refusal comes from the rewrite, not from the tool message or tool_calls."""
    tokenizer = bpe_tokenizer("chatml")
    record = Record("data.jsonl line 3", {"prompt": [USER], "response": [CALL, TOOL, ANSWER]})
    (example,) = Tokenizer(tokenizer, max_length=256).demonstrations([record])
    assert (example["input_ids"], example["labels"]) == conversation_ids(tokenizer, CONVERSATION)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        pytest.param(
            [USER, CALL, TOOL],
            r"^field 'messages': message 2 has role 'tool' after the last assistant message",
            id="ends-with-tool",
        ),
        pytest.param(
            [USER, CALL, ANSWER],
            r"^field 'messages': message 2 has role 'assistant' right after another assistant message",
            id="two-assistants-in-a-row",
        ),
        pytest.param(
            [USER, TOOL],
            r"^field 'messages': no message has role 'assistant': there is nothing to train on",
            id="no-assistant",
        ),
    ],
)
def test_a_conversation_that_is_no_demonstration_is_refused(messages, match):
    """A ``{"messages"}`` record must end with the assistant's turn, never hold two assistant messages in a row, and
    hold one at all; the error names the field and the message at fault (message 2: the tool's, the second
    assistant's).

    Catches: such a record read as a demonstration (training on a trailing tool message, or on nothing), or an error
    that does not say which message is wrong."""
    with pytest.raises(RecordError, match=match):
        validate_demonstration({"messages": messages})


def test_a_valid_conversation_is_split_at_its_first_assistant_message():
    """The control: [user, call, tool, answer] is the prompt [user] and the response [call, tool, answer]."""
    fields = validate_demonstration({"messages": CONVERSATION})
    assert fields["prompt"] == [USER] and fields["response"] == [CALL, TOOL, ANSWER]


def test_the_datamodule_masks_the_tool_turn_in_its_batches(tmp_path):
    """A ``{"messages"}`` JSONL record through ``DemonstrationDataModule`` with a ChatML checkpoint's tokenizer: the
    batch's labels decode to the two assistant turns with their <|im_end|> only, the tool's 'edcba' turn masked.

    Catches: the DataModule tokenizing a conversation as one reply (e.g. training the tool's turn, or only the last
    turn when every one was asked for)."""
    bpe_tokenizer("chatml").save_pretrained(tmp_path / "tok")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    dm = DemonstrationDataModule(
        train_path=str(path),
        tokenizer_name_or_path=str(tmp_path / "tok"),
        val_fraction=0,
        batch_size=1,
        max_length=256,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tokenizer = dm.tokenizer
    mask = batch["attention_mask"][0].bool()
    input_ids, labels = batch["input_ids"][0][mask].tolist(), batch["labels"][0][mask].tolist()
    trained, untrained = split_by_labels(tokenizer, input_ids, labels)
    assert trained == CALL_TEXT + "<|im_end|>" + ANSWER_TEXT + "<|im_end|>"
    assert "<|im_start|>tool\nedcba<|im_end|>" in untrained
    assert untrained == UNTRAINED["chatml"]
