"""Conversations as one token stream: the renderer SFT on whole conversations and RL episodes share.

A conversation (system/user messages, assistant turns, tool results) is rendered by the tokenizer's chat template
and cut into pieces, each tokenized on its own::

    prompt_ids(messages before the first assistant turn)            the prompt, with the generation prompt
    assistant_turn_ids(history, assistant message)[0]               trained: the turn's tokens through its EOS
    observation_ids(history, the environment's messages)            not trained: the rest of the template's turn
                                                                    end, the new messages, the next generation prompt
    assistant_turn_ids(...)[0]  ...

``conversation_ids`` is built from exactly these calls, so an RL episode built turn by turn from them (the policy
writes each assistant turn, up to and including EOS; the environment answers with ``observation_ids``) is the token
stream SFT trains on for the same conversation. Every piece is a difference of two renderings (``render(history +
new)`` after ``render(history)``), so a template must render a longer conversation as an extension of the shorter
one: one that rewrites earlier turns (e.g. drops their reasoning once a later turn exists) raises
``NotPrefixStable``.

An assistant turn ends at the first EOS its template writes (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) and
what the template writes after it (ChatML's ``"\\n"``) opens the next observation; a template that closes turns with
plain text (``tokenizer.BYTE_CHAT_TEMPLATE``) gets EOS appended to the turn, as generation writes it.

For the RL side: the policy's turn is decoded (``tokenizer.decode(ids, skip_special_tokens=True)``) into the assistant
message's ``content`` before the template renders the history again; the episode keeps the sampled ids, and the
pieces after it depend only on the template's text around the content, never on the content itself. (ChatML and
Llama 3 decode a turn back to its content exactly; a template that adds text after the content, as
``BYTE_CHAT_TEMPLATE``'s newline, decodes it into the content too.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_rlhf.losses.tokens import IGNORE_INDEX

Messages = list[dict[str, Any]]  # {"role", "content", optional "tool_calls", "name", ...}: given to the template as is
Ids = list[int]


class NotPrefixStable(ValueError):
    """The chat template renders a longer conversation as something other than the shorter one's text extended."""


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, tools: list[dict] | None, generation_prompt: bool
) -> str:
    """The chat template's text of ``messages`` (with the next assistant turn's generation prompt when asked)."""
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = False) -> Ids:
    return tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


def _extension(shorter: str, longer: str, what: str) -> str:
    """The text ``longer`` adds after ``shorter``, or ``NotPrefixStable`` when it does not start with it."""
    if not longer.startswith(shorter):
        raise NotPrefixStable(
            f"the chat template does not render {what} as an extension of the conversation before it (it rewrites "
            "earlier turns, e.g. drops their reasoning): conversations need a template whose rendering of each "
            "conversation starts with that of every shorter one"
        )
    return longer[len(shorter) :]


def _role(message: Mapping[str, Any]) -> Any:
    return message.get("role")


def check_turn_end(tokenizer: PreTrainedTokenizerBase, turn_ids: Ids, special_ids: set[int] | None = None) -> None:
    """Refuse a chat template that closes the assistant's turn with a special token other than EOS: EOS after it
    would end every turn twice, and generation, which stops at EOS, would run past the turn's end.

    ``special_ids``: the tokenizer's special token ids, when the caller keeps them (reading them is slow)."""
    if special_ids is None:
        special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    closing = [i for i in turn_ids if i in special_ids]
    if closing:
        token, eos = tokenizer.convert_ids_to_tokens(closing[-1]), tokenizer.eos_token
        raise ValueError(
            f"the chat template ends a turn with {token!r} but the tokenizer's EOS is {eos!r}: set the tokenizer's "
            f"eos_token to {token!r} (tokenizer.eos_token = {token!r}; tokenizer.save_pretrained(...))"
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, tools: list[dict] | None = None) -> Ids:
    """The prompt's tokens: plain text with the tokenizer's special tokens (BOS), chat messages rendered with the
    generation prompt (the template writes its own special tokens, BOS included)."""
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, add_special_tokens=True)
    return encode(tokenizer, render(tokenizer, prompt, tools, generation_prompt=True))


def assistant_turn_ids(
    tokenizer: PreTrainedTokenizerBase, history: Messages, message: dict[str, Any], tools: list[dict] | None = None
) -> tuple[Ids, str]:
    """The trained tokens of the assistant ``message`` after ``history`` (which ends with a user, tool or system
    message), and the template's text after the turn's EOS.

    With ``D`` the text the message adds to the history's generation prompt: the tokens of ``D`` up to and including
    the first EOS, and the rest of ``D`` (ChatML's ``"\\n"``); a template writing no EOS: the tokens of ``D`` and EOS
    appended, and ``""``.

    Raises:
        ValueError: ``history`` is empty or ends with an assistant message; the template closes the turn with another
            special token than EOS; ``NotPrefixStable``.
    """
    if not history or _role(history[-1]) == "assistant":
        raise ValueError("an assistant turn follows a user, tool or system message: history must end with one")
    before = render(tokenizer, history, tools, generation_prompt=True)
    turn = _extension(before, render(tokenizer, [*history, message], tools, generation_prompt=False), "a turn")
    end = turn.find(tokenizer.eos_token)
    if end >= 0:
        end += len(tokenizer.eos_token)
        return encode(tokenizer, turn[:end]), turn[end:]
    ids = encode(tokenizer, turn)
    check_turn_end(tokenizer, ids)
    return ids + [tokenizer.eos_token_id], ""


def _observation_ids(
    tokenizer: PreTrainedTokenizerBase, history: Messages, new: Messages, tools: list[dict] | None, remainder: str
) -> Ids:
    if not new or any(_role(message) == "assistant" for message in new):
        raise ValueError("an observation is the environment's messages (tool or user), at least one and no assistant's")
    before = render(tokenizer, history, tools, generation_prompt=False)
    after = render(tokenizer, [*history, *new], tools, generation_prompt=True)
    return encode(tokenizer, remainder + _extension(before, after, "new messages"))


def observation_ids(
    tokenizer: PreTrainedTokenizerBase, history: Messages, new: Messages, tools: list[dict] | None = None
) -> Ids:
    """The tokens between the last assistant turn of ``history`` (whose trained ids end with EOS) and the next
    assistant turn: the template's text after that turn's EOS, the environment's messages ``new`` (role ``tool`` or
    ``user``) and the generation prompt.

    Raises:
        ValueError: ``history`` does not end with an assistant message; ``new`` is empty or holds one;
            ``NotPrefixStable``.
    """
    if not history or _role(history[-1]) != "assistant":
        raise ValueError("an observation follows an assistant turn: history must end with the assistant's message")
    _, remainder = assistant_turn_ids(tokenizer, history[:-1], history[-1], tools)
    return _observation_ids(tokenizer, history, new, tools, remainder)


def observation_text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> Ids:
    """The tokens of an environment's plain-text answer in a plain-text episode (no template, no special tokens)."""
    return encode(tokenizer, text)


TOOL_CALL = "{'type': 'function', 'function': {'name': str, 'arguments': {...}}}"


def checked_messages(messages: list) -> Messages:
    """Chat messages as the template gets them: every key but those holding null (a Parquet or ``datasets`` column of
    messages fills the keys a message lacks with null); null content beside ``tool_calls`` becomes ``""``.

    Raises:
        ValueError: naming the message that is not an object with a ``role`` string and a ``content`` string, or whose
            ``tool_calls`` are not a list of ``TOOL_CALL``.
    """
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be an object with a 'role' string, got {message!r:.80}")
        message = {key: value for key, value in message.items() if value is not None}
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(
                isinstance(call, Mapping) and isinstance(call.get("function"), Mapping) and "name" in call["function"]
                for call in calls
            ):
                raise ValueError(f"message {i}: 'tool_calls' must be a list of {TOOL_CALL}, got {calls!r:.80}")
            message.setdefault("content", "")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {i} has role {message['role']!r} but no 'content' string (\"\" where it only calls tools)"
            )
        checked.append(message)
    return checked


def check_turns(messages: Messages, response: bool = False) -> None:
    """Refuse messages that are no conversation to train on: one opens with messages that are not the assistant's
    (the prompt; a ``response`` opens with the assistant's instead), holds an assistant message, never two in a row,
    and ends with the assistant's (what follows the last turn teaches nothing).

    Raises:
        ValueError: naming the message at fault.
    """
    roles = [_role(message) for message in messages]
    if response and roles[0] != "assistant":
        raise ValueError(f"message 0 has role {roles[0]!r}: a response opens with the assistant's message")
    if "assistant" not in roles:
        raise ValueError("no message has role 'assistant': there is nothing to train on")
    if roles[0] == "assistant" and not response:
        raise ValueError(
            "message 0 has role 'assistant': a conversation opens with a user (or system) message, and its prompt is "
            "every message before the first assistant one"
        )
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1] == "assistant":
            raise ValueError(
                f"message {i} has role 'assistant' right after another assistant message: merge the two, or put the "
                "user's or tool's message between them"
            )
    if roles[-1] != "assistant":
        raise ValueError(
            f"message {len(roles) - 1} has role {roles[-1]!r} after the last assistant message: a demonstration ends "
            "with the assistant's turn (what follows it teaches nothing); drop the messages after it"
        )


def prompt_and_response_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Messages,
    response: Messages,
    tools: list[dict] | None = None,
    all_assistant_turns: bool = True,
) -> tuple[Ids, Ids]:
    """``(input_ids, labels)`` of ``prompt`` (chat messages, which may hold earlier assistant turns, e.g. few-shot
    examples: never trained) and ``response`` (assistant turns, with the environment's messages between them): the
    prompt's ids, then each assistant turn's and the observation's after it, as the module's docstring lays out.

    ``labels`` are the ids of each assistant turn's trained tokens (content through EOS) and ``IGNORE_INDEX``
    elsewhere; with ``all_assistant_turns=False``, of the last assistant turn only.

    Raises:
        ValueError: ``response`` is no conversation to train on (``check_turns``), or as ``assistant_turn_ids``.
    """
    check_turns(response, response=True)
    messages = [*prompt, *response]
    turns = [len(prompt) + i for i, message in enumerate(response) if _role(message) == "assistant"]
    input_ids = prompt_ids(tokenizer, prompt, tools)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, next_turn in zip(turns, [*turns[1:], None], strict=True):
        ids, remainder = assistant_turn_ids(tokenizer, messages[:turn], messages[turn], tools)
        trained = all_assistant_turns or next_turn is None
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if next_turn is not None:
            ids = _observation_ids(tokenizer, messages[: turn + 1], messages[turn + 1 : next_turn], tools, remainder)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    tools: list[dict] | None = None,
    all_assistant_turns: bool = True,
) -> tuple[Ids, Ids]:
    """``(input_ids, labels)`` of a whole conversation: ``prompt_and_response_ids`` with every message before the
    first assistant one for the prompt. ``labels`` train every assistant turn (TRL's ``assistant_only_loss``), or with
    ``all_assistant_turns=False`` the last one only.

    Raises:
        ValueError: ``messages`` is no conversation to train on (``check_turns``), or as ``assistant_turn_ids``.
    """
    check_turns(messages)
    first = next(i for i, message in enumerate(messages) if _role(message) == "assistant")
    return prompt_and_response_ids(tokenizer, messages[:first], messages[first:], tools, all_assistant_turns)
