"""Records -> token ids, keeping the prompt/response boundary.

Prompt and response are rendered (chat messages through the tokenizer's chat template) and tokenized
separately, then concatenated: the boundary is exact, so the prompt is masked from the loss token for token.

Every response ends with its end-of-turn token, the tokenizer's EOS, exactly once, so that models learn to stop
where generation stops (``rollout.generate`` ends a response at its first EOS): a chat response ends at the first
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

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.records import Record, RecordError
from lightning_rlhf.losses import IGNORE_INDEX

Messages = list[dict[str, str]]


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


def render(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, response: str | Messages | None = None):
    """Text of the prompt and of the response that follows it.

    Chat prompts get the template's generation prompt; the response text is what the template adds after it,
    so ``prompt_text + response_text`` is the template's rendering of the whole conversation.
    """
    if isinstance(prompt, str):
        if response is not None and not isinstance(response, str):
            raise RecordError("field 'response': chat messages need a prompt given as chat messages too")
        return prompt, response
    if tokenizer.chat_template is None:
        raise RecordError("field 'prompt' holds chat messages but the tokenizer has no chat template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if response is None:
        return prompt_text, None
    response_messages = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    full_text = tokenizer.apply_chat_template(prompt + response_messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise RecordError("field 'response': the chat template does not render the conversation as prompt + reply")
    return prompt_text, full_text[len(prompt_text) :]


class Tokenizer:
    """Tokenizes records of each kind under one truncation policy, counting what it cut or skipped."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, skip_invalid: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token to end responses")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.skip_invalid = skip_invalid
        self.report = TokenizeReport()

    def _prompt_ids(self, text: str, chat: bool) -> list[int]:
        # A chat template writes its own special tokens (BOS included) into the text.
        return self.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def _response_ids(self, text: str, room: int, chat: bool) -> list[int]:
        """The response's tokens up to and including its first EOS (appended when it has none), cut to ``room``."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        else:
            if chat:
                self._check_turn_end(ids)
            ids = ids + [eos]
        if len(ids) > room:
            self.report.truncated += 1
            ids = ids[:room]
        return ids

    def _check_turn_end(self, response_ids: list[int]) -> None:
        """Refuse a chat template that closes the assistant's turn with a special token other than EOS: EOS after
        it would end every response twice, and generation, which stops at EOS, would run past the turn's end."""
        special = {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        closing = [i for i in response_ids if i in special]
        if closing:
            token, eos = self.tokenizer.convert_ids_to_tokens(closing[-1]), self.tokenizer.eos_token
            raise ValueError(
                f"the chat template ends a turn with {token!r} but the tokenizer's EOS is {eos!r}: set the tokenizer's "
                f"eos_token to {token!r} (tokenizer.eos_token = {token!r}; tokenizer.save_pretrained(...))"
            )

    def _prompt(self, record: Record, response: Any = None, reserve: int = 1) -> tuple[list[int], str | None]:
        prompt = record.fields["prompt"]
        prompt_text, response_text = render(self.tokenizer, prompt, response)
        ids = self._prompt_ids(prompt_text, chat=not isinstance(prompt, str))
        if len(ids) + reserve > self.max_length:
            raise RecordError(
                f"field 'prompt' is {len(ids)} tokens, more than max_length={self.max_length} allows"
                f"{' with room for a response' if reserve else ''}; raise max_length, shorten the prompt, "
                "or set skip_invalid to skip such records"
            )
        return ids, response_text

    def _guard(self, record: Record, build):
        try:
            return build(record)
        except RecordError as err:
            if not self.skip_invalid:
                raise RecordError(f"{record.location}: {err}") from None
            self.report.skipped += 1
            return None

    def _demonstration(self, record: Record) -> dict[str, list[int]]:
        prompt_ids, response_text = self._prompt(record, record.fields["response"])
        chat = not isinstance(record.fields["prompt"], str)
        response_ids = self._response_ids(response_text, self.max_length - len(prompt_ids), chat)
        return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}

    def _comparison(self, record: Record) -> dict[str, Any]:
        responses = record.fields["responses"]
        # Render each response after the same prompt; the prompt ids are shared.
        prompt_ids, _ = self._prompt(record)
        room, prompt = self.max_length - len(prompt_ids), record.fields["prompt"]
        chat = not isinstance(prompt, str)
        response_ids = [self._response_ids(render(self.tokenizer, prompt, r)[1], room, chat) for r in responses]
        return {"prompt_ids": prompt_ids, "response_ids": response_ids, "ranks": list(record.fields["ranks"])}

    def _prompt_only(self, record: Record) -> dict[str, list[int]]:
        return {"input_ids": self._prompt(record, reserve=0)[0]}

    def _text(self, record: Record) -> dict[str, list[int]]:
        ids = self.tokenizer(record.fields["text"])["input_ids"] + [self.tokenizer.eos_token_id]
        if len(ids) > self.max_length:
            self.report.texts_truncated += 1
            ids = ids[: self.max_length]
        return {"input_ids": ids, "labels": list(ids)}

    def example(self, kind: str, record: Record) -> dict[str, Any] | None:
        """``record`` of ``kind`` (``demonstration``, ``comparison``, ``prompt``, ``text``) tokenized, or ``None`` when
        it is skipped (counted in ``report``)."""
        build = {
            "demonstration": self._demonstration,
            "comparison": self._comparison,
            "prompt": self._prompt_only,
            "text": self._text,
        }[kind]
        return self._guard(record, build)

    def demonstrations(self, records: list[Record]) -> list[dict[str, list[int]]]:
        return [ex for ex in (self._guard(r, self._demonstration) for r in records) if ex is not None]

    def comparisons(self, records: list[Record]) -> list[dict[str, Any]]:
        return [ex for ex in (self._guard(r, self._comparison) for r in records) if ex is not None]

    def prompts(self, records: list[Record]) -> list[dict[str, list[int]]]:
        return [ex for ex in (self._guard(r, self._prompt_only) for r in records) if ex is not None]

    def texts(self, records: list[Record]) -> list[dict[str, list[int]]]:
        """Pretraining text: every token is a label (language-model loss on the whole text, ending in EOS)."""
        return [self._text(r) for r in records]
