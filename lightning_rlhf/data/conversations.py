"""STAND-IN (replaced by wt-conv's): the token stream of a conversation, shared by SFT and RL episodes."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, Any]]


def _render(tokenizer, messages, tools, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _encode(tokenizer, _render(tokenizer, prompt, tools, True))


def _assistant_text(tokenizer, history, message, tools) -> str:
    before = _render(tokenizer, history, tools, True)
    full = _render(tokenizer, history + [message], tools, False)
    if not full.startswith(before):
        raise ValueError("the chat template does not render the conversation prefix by prefix")
    return full[len(before) :]


def assistant_turn_ids(tokenizer, history: Messages, message: dict, tools=None) -> tuple[list[int], str]:
    text, eos = _assistant_text(tokenizer, history, message, tools), tokenizer.eos_token
    if eos in text:
        cut = text.index(eos) + len(eos)
        return _encode(tokenizer, text[:cut]), text[cut:]
    return _encode(tokenizer, text) + [tokenizer.eos_token_id], ""


def observation_ids(tokenizer, history: Messages, new: Messages, tools=None) -> list[int]:
    _, remainder = assistant_turn_ids(tokenizer, history[:-1], history[-1], tools)
    before = _render(tokenizer, history, tools, False)
    after = _render(tokenizer, history + new, tools, True)
    if not after.startswith(before):
        raise ValueError("the chat template does not render the conversation prefix by prefix")
    return _encode(tokenizer, remainder + after[len(before) :])


def observation_text_ids(tokenizer, text: str) -> list[int]:
    return _encode(tokenizer, text)
