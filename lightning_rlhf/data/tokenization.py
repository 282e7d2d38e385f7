"""Records -> token ids, keeping the prompt/response boundary.

Prompt and response are rendered (chat messages through the tokenizer's chat template) and tokenized
separately, then concatenated: the boundary is exact, so the prompt is masked from the loss token for token.

Records are tokenized a list at a time: one chat-template call per list of conversations and one tokenizer call per
list of texts (prompts, responses), then each record is assembled, checked and counted on its own, in order, with the
same ids, errors and counts as tokenizing it alone.

Every response ends with its end-of-turn token, the tokenizer's EOS, exactly once, so that models learn to stop
where generation stops (``generation.generate`` ends a response at its first EOS): a chat response ends at the first
EOS the template writes, and template text after it (ChatML's ``"<|im_end|>\n"`` newline) is no part of it; a
response without one (plain text, or a template that closes turns with ordinary text) gets EOS appended.

Truncation policy, for ``max_length`` = prompt + response tokens:
- a prompt is never cut: one that leaves no room for a single response token is an error
  (or skipped and counted when asked);
- a response longer than the room left is cut from its end (losing its EOS) and counted in ``truncated``;
- pretraining text (PPO-ptx) longer than ``max_length`` keeps its first ``max_length`` tokens, counted in
  ``texts_truncated``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.conversations import (
    Ids,
    Messages,
    NotPrefixStable,
    check_turn_end,
    prompt_and_response_ids,
    prompt_ids,
)
from lightning_rlhf.data.records import Record, RecordError
from lightning_rlhf.losses.tokens import IGNORE_INDEX

T = TypeVar("T")


@dataclass
class TokenizeReport:
    truncated: int = 0
    skipped: int = 0
    texts_truncated: int = 0

    def summary(self) -> str:
        texts = f", {self.texts_truncated} texts truncated" if self.texts_truncated else ""
        return (
            f"{self.truncated} responses truncated to fit max_length, {self.skipped} over-long prompts skipped{texts}"
        )

    def add(self, other: TokenizeReport) -> None:
        self.truncated += other.truncated
        self.skipped += other.skipped
        self.texts_truncated += other.texts_truncated


def _chat_texts(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], generation_prompt: bool
) -> list[str]:
    """The template's rendering of each conversation, in one call."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str | Messages]) -> list[str | RecordError]:
    """The text of each prompt (chat prompts with the template's generation prompt), or the error rendering it."""
    texts: list[str | RecordError] = list(prompts)
    chats = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if chats and tokenizer.chat_template is None:
        error = RecordError("field 'prompt' holds chat messages but the tokenizer has no chat template")
        chat_texts = [error] * len(chats)
    else:
        chat_texts = _chat_texts(tokenizer, [prompts[i] for i in chats], generation_prompt=True)
    for i, text in zip(chats, chat_texts, strict=True):
        texts[i] = text
    return texts


def render_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | Messages],
    prompt_texts: list[str | RecordError],
    responses: list[str | Messages],
) -> list[str | RecordError]:
    """The text of each response after its prompt (rendered by ``render_prompts``), or the error rendering it.

    A chat response is what the template adds after the prompt's text, so ``prompt_text + response_text`` is the
    template's rendering of the whole conversation.
    """
    texts: list[str | RecordError | None] = []
    conversations: dict[int, Messages] = {}  # position -> the whole conversation, for chat prompts
    for i, (prompt, prompt_text, response) in enumerate(zip(prompts, prompt_texts, responses, strict=True)):
        if isinstance(prompt, str) and isinstance(response, str):
            texts.append(response)
        elif isinstance(prompt, str):
            texts.append(RecordError("field 'response': chat messages need a prompt given as chat messages too"))
        elif isinstance(prompt_text, RecordError):
            texts.append(prompt_text)
        else:
            texts.append(None)  # the template's text, below
            reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            conversations[i] = prompt + reply
    full_texts = _chat_texts(tokenizer, list(conversations.values()), generation_prompt=False)
    for i, full_text in zip(conversations, full_texts, strict=True):
        prompt_text = prompt_texts[i]
        if full_text.startswith(prompt_text):
            texts[i] = full_text[len(prompt_text) :]
        else:
            texts[i] = RecordError(
                "field 'response': the chat template does not render the conversation as prompt + reply"
            )
    return texts


def is_conversation(fields: dict[str, Any]) -> bool:
    """A demonstration tokenized turn by turn (``conversations.py``): one that gives tools, or whose response is
    several messages (assistant turns with tool or user messages between them)."""
    response = fields["response"]
    return "tools" in fields or (isinstance(response, list) and len(response) > 1)


def _ok(value: T | RecordError) -> T:
    """A record's text or token ids, or raise the error found making them."""
    if isinstance(value, RecordError):
        raise value
    return value


class Tokenizer:
    """Tokenizes records of each kind under one truncation policy, counting what it cut or skipped."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        skip_invalid: bool = False,
        all_assistant_turns: bool = True,
    ):
        """
        Args:
            all_assistant_turns: a conversation's labels train every assistant turn; ``False``: the last one only.
        """
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token to end responses")
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id  # read once: a tokenizer's attribute lookup is slow
        self.max_length = max_length
        self.skip_invalid = skip_invalid
        self.all_assistant_turns = all_assistant_turns
        self.report = TokenizeReport()

    def _encode(self, texts: list[str | RecordError], add_special_tokens: bool) -> list[Ids | RecordError]:
        """The token ids of every text, in one tokenizer call; errors stay in their places."""
        positions = [i for i, text in enumerate(texts) if isinstance(text, str)]
        ids: list[Ids | RecordError] = list(texts)
        if positions:
            chosen = [texts[i] for i in positions]
            # Only the ids: building attention masks and type ids for every text took a third of the time.
            encoded = self.tokenizer(
                chosen, add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False
            )
            for i, row in zip(positions, encoded["input_ids"], strict=True):
                ids[i] = row
        return ids

    def _prompt_ids(self, prompts: list[str | Messages], texts: list[str | RecordError]) -> list[Ids | RecordError]:
        # A chat template writes its own special tokens (BOS included) into the text; plain text gets the tokenizer's.
        chat = [not isinstance(prompt, str) for prompt in prompts]
        plain_ids = self._encode([t for t, c in zip(texts, chat, strict=True) if not c], add_special_tokens=True)
        chat_ids = self._encode([t for t, c in zip(texts, chat, strict=True) if c], add_special_tokens=False)
        ids = {False: iter(plain_ids), True: iter(chat_ids)}
        return [next(ids[c]) for c in chat]

    def _fitting(self, prompt_ids: Ids, reserve: int = 1) -> Ids:
        if len(prompt_ids) + reserve > self.max_length:
            raise RecordError(
                f"field 'prompt' is {len(prompt_ids)} tokens, more than max_length={self.max_length} allows"
                f"{' with room for a response' if reserve else ''}; raise max_length, shorten the prompt, "
                "or set skip_invalid to skip such records"
            )
        return prompt_ids

    def _end_response(self, ids: Ids, room: int, chat: bool) -> tuple[Ids, int]:
        """The response's tokens up to and including its first EOS (appended when it has none), cut to ``room``; and
        1 when it was cut, else 0."""
        eos = self.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        else:
            if chat:
                check_turn_end(self.tokenizer, ids, self._special_ids)
            ids = ids + [eos]
        return ids[:room], int(len(ids) > room)

    @cached_property
    def _special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}

    def _guard(self, record: Record, build, *args) -> tuple[dict[str, Any] | None, TokenizeReport]:
        """``build(*args)`` for ``record``: its example and counts, or, when it raises a ``RecordError``, ``None`` and
        a count of one skipped (under ``skip_invalid``; else the error, naming the record)."""
        try:
            example, counts = build(*args)
        except RecordError as err:
            if not self.skip_invalid:
                raise RecordError(f"{record.location}: {err}") from None
            example, counts = None, TokenizeReport(skipped=1)
        self.report.add(counts)
        return example, counts

    def _demonstrations(self, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        """Conversations turn by turn (``_conversation``); single replies a list at a time, in their places."""
        replies = iter(self._replies([record for record in records if not is_conversation(record.fields)]))
        return [
            self._guard(record, self._conversation, record.fields) if is_conversation(record.fields) else next(replies)
            for record in records
        ]

    def _conversation(self, fields: dict[str, Any]) -> tuple[dict[str, Ids], TokenizeReport]:
        """A demonstration whose response is several messages (or that gives tools): ``prompt_and_response_ids``,
        cut to ``max_length`` from its end."""
        if self.tokenizer.chat_template is None:
            raise RecordError("field 'response' holds chat messages but the tokenizer has no chat template")
        prompt, response, tools = fields["prompt"], fields["response"], fields.get("tools")
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        self._fitting(prompt_ids(self.tokenizer, prompt, tools))
        try:
            input_ids, labels = prompt_and_response_ids(
                self.tokenizer, prompt, response, tools, self.all_assistant_turns
            )
        except NotPrefixStable as err:
            raise RecordError(f"field 'response': {err}") from None
        cut, labels = int(len(input_ids) > self.max_length), labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise RecordError(
                f"field 'response': its last assistant turn starts past max_length={self.max_length}; raise "
                "max_length, or train every turn (all_assistant_turns)"
            )
        return {"input_ids": input_ids[: self.max_length], "labels": labels}, TokenizeReport(truncated=cut)

    def _replies(self, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        prompts = [record.fields["prompt"] for record in records]
        prompt_texts = render_prompts(self.tokenizer, prompts)
        responses = [record.fields["response"] for record in records]
        response_texts = render_responses(self.tokenizer, prompts, prompt_texts, responses)
        prompt_ids = self._prompt_ids(prompts, prompt_texts)
        response_ids = self._encode(response_texts, add_special_tokens=False)
        rows = zip(records, prompts, prompt_ids, response_ids, strict=True)
        return [self._guard(record, self._demonstration, *row) for record, *row in rows]

    def _demonstration(
        self, prompt: str | Messages, prompt_ids: Ids | RecordError, response_ids: Ids | RecordError
    ) -> tuple[dict[str, Ids], TokenizeReport]:
        prompt_ids, response_ids = _ok(prompt_ids), _ok(response_ids)
        room = self.max_length - len(self._fitting(prompt_ids))
        response_ids, cut = self._end_response(response_ids, room, chat=not isinstance(prompt, str))
        example = {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}
        return example, TokenizeReport(truncated=cut)

    def _comparisons(self, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        prompts = [record.fields["prompt"] for record in records]
        prompt_texts = render_prompts(self.tokenizer, prompts)
        prompt_ids = self._prompt_ids(prompts, prompt_texts)
        # Every response of the list after its record's prompt: rendered and tokenized together, then regrouped.
        owners = [i for i, record in enumerate(records) for _ in record.fields["responses"]]
        responses = [response for record in records for response in record.fields["responses"]]
        texts = render_responses(
            self.tokenizer, [prompts[i] for i in owners], [prompt_texts[i] for i in owners], responses
        )
        flat_ids = iter(self._encode(texts, add_special_tokens=False))
        response_ids = [[next(flat_ids) for _ in record.fields["responses"]] for record in records]
        rows = zip(records, prompt_ids, response_ids, strict=True)
        return [self._guard(record, self._comparison, record, *row) for record, *row in rows]

    def _comparison(
        self, record: Record, prompt_ids: Ids | RecordError, response_ids: list[Ids | RecordError]
    ) -> tuple[dict[str, Any], TokenizeReport]:
        prompt_ids = self._fitting(_ok(prompt_ids))
        room, chat = self.max_length - len(prompt_ids), not isinstance(record.fields["prompt"], str)
        ended = [self._end_response(_ok(ids), room, chat) for ids in response_ids]
        # A comparison's ranks, or an unpaired record's desirable flags (``records.validate_unpaired``).
        marks = "ranks" if "ranks" in record.fields else "desirable"
        example = {
            "prompt_ids": prompt_ids,
            "response_ids": [ids for ids, _ in ended],
            marks: list(record.fields[marks]),
        }
        return example, TokenizeReport(truncated=sum(cut for _, cut in ended))

    def _prompts(self, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        prompts = [record.fields["prompt"] for record in records]
        prompt_ids = self._prompt_ids(prompts, render_prompts(self.tokenizer, prompts))
        return [self._guard(record, self._prompt, record, ids) for record, ids in zip(records, prompt_ids, strict=True)]

    def _prompt(self, record: Record, prompt_ids: Ids | RecordError) -> tuple[dict[str, Any], TokenizeReport]:
        """The prompt's ids and its record as JSON (``fields``: an environment resets from it, ``rl.episodes``)."""
        fields = json.dumps(record.fields, ensure_ascii=False)
        return {"input_ids": self._fitting(_ok(prompt_ids), reserve=0), "fields": fields}, TokenizeReport()

    def _texts(self, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        text_ids = self._encode([record.fields["text"] for record in records], add_special_tokens=True)
        return [self._guard(record, self._text, ids) for record, ids in zip(records, text_ids, strict=True)]

    def _text(self, text_ids: Ids) -> tuple[dict[str, Ids], TokenizeReport]:
        ids = text_ids + [self.eos_token_id]
        cut = int(len(ids) > self.max_length)
        ids = ids[: self.max_length]
        return {"input_ids": ids, "labels": list(ids)}, TokenizeReport(texts_truncated=cut)

    def examples(self, kind: str, records: list[Record]) -> list[tuple[dict[str, Any] | None, TokenizeReport]]:
        """Each of ``records`` of ``kind`` (``demonstration``, ``comparison``, ``unpaired``, ``prompt``, ``text``)
        tokenized, in order: its example, or ``None`` when it is skipped, and its own counts (added to ``report``
        as well)."""
        build = {
            "demonstration": self._demonstrations,
            "comparison": self._comparisons,
            "unpaired": self._comparisons,  # a prompt and its labelled completions, tokenized as a comparison's
            "prompt": self._prompts,
            "text": self._texts,
        }[kind]
        return build(records)

    def demonstrations(self, records: list[Record]) -> list[dict[str, Ids]]:
        return [example for example, _ in self._demonstrations(records) if example is not None]

    def comparisons(self, records: list[Record]) -> list[dict[str, Any]]:
        return [example for example, _ in self._comparisons(records) if example is not None]

    def prompts(self, records: list[Record]) -> list[dict[str, Ids]]:
        return [example for example, _ in self._prompts(records) if example is not None]

    def texts(self, records: list[Record]) -> list[dict[str, Ids]]:
        """Pretraining text: every token is a label (language-model loss on the whole text, ending in EOS)."""
        return [example for example, _ in self._texts(records)]
