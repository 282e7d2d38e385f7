"""Tokenizers: a local Hugging Face directory's, or the embedded default's offline byte-level one (with a chat
template), so nothing is downloaded. The DataModules load it from a model path; the models are fitted to it."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

BYTE_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


# Added to a tokenizer that has no pad token of its own (or uses EOS as one).
PAD_TOKEN = "<|pad|>"


# A minimal chat template for the byte tokenizer, so chat-message records work without a hub tokenizer.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer: one token per UTF-8 byte plus <pad>, <s>, </s> (259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = list(BYTE_SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **BYTE_SPECIAL_TOKENS)
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


STAGES = ("sft", "rm", "ppo", "dpo")  # configs/<stage>.yaml exports outputs/<stage>/hf


def check_model_path(name_or_path: str) -> None:
    """A clear error for a local model path that does not exist, instead of transformers' attempt to read it as a
    hub repository id. A name that could be a hub id (``org/name``, no leading ``.``, ``/`` or ``~``) passes."""
    path = Path(name_or_path).expanduser()
    local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if path.exists() or not local:
        return
    stage = next((part for part in reversed(path.parts) if part in STAGES), None)
    hint = f" (lightning-rlhf fit --config configs/{stage}.yaml)" if stage else ""
    raise FileNotFoundError(f"the path {name_or_path} does not exist: run the stage that exports it first{hint}")


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model (local directory or hub name), or the byte-level default.

    A tokenizer without a pad token, or whose pad token is its EOS, gets a pad token of its own (``PAD_TOKEN``,
    added as a special token; the loaders grow the model's embeddings to match). Exports carry it, so tools that find
    padding by its id (transformers' sequence-classification pooling, ``DataCollatorForLanguageModeling``'s label
    masking) never take the end-of-turn token for padding.
    """
    if name_or_path is not None:
        check_model_path(name_or_path)
    tokenizer = byte_level_tokenizer() if name_or_path is None else AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer
