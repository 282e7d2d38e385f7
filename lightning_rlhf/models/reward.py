"""Reward models: a causal LM's backbone with a linear head to one scalar, read at the last real token.

Export format (``save_pretrained``, written by ``RewardModule``): a Hugging Face sequence-classification
checkpoint with ``num_labels = 1`` — the backbone's weights under the causal LM's own names, the head as
``score`` — with two extra config attributes:

- ``reward_offset`` (float, default 0): subtracted from every reward at scoring time, so that the rewards of a
  reference set (e.g. the demonstrations) average 0 (InstructGPT, appendix C.2);
- ``reward_token_id`` (int or absent): a token appended after the last real token, whose state is read.

Architectures that transformers gives a ``…ForSequenceClassification`` class load as that class (so other tools,
TRL included, read the export too). For the others the same layout (backbone under the architecture's own prefix
+ ``score``) is built from ``GenericForSequenceClassification``; ``load_reward_model`` reads both.

Rewards come from ``sequence_rewards``: it takes positions from the attention mask, so left- and right-padded rows
read the same. The HF classes' own pooling (the last token that is not the pad id) agrees with it on right-padded
rows, because the tokenizer pads with a token of its own, never EOS (``tokenizer.load_tokenizer``); their ``logits``
are the raw reward, before ``reward_offset``. PPO loads the reward model
with ``load_reward_model(path).eval().requires_grad_(False)`` and a value function initialised from it with
``load_reward_model(path)`` + ``token_values``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_layers import GenericForSequenceClassification

from lightning_rlhf.data.tokenizer import check_model_path
from lightning_rlhf.models.causal_lm import (
    default_model_config,
    fit_to_tokenizer,
    keep_float32_buffers,
    position_ids_from_mask,
    resolve_dtype,
)
from lightning_rlhf.models.lora import unwrap

OFFSET_KEY = "reward_offset"


TOKEN_KEY = "reward_token_id"


def _generic_reward_class(config) -> type[PreTrainedModel]:
    """``GenericForSequenceClassification`` on the architecture's own ``PreTrainedModel`` and prefix.

    The prefix matters: a causal LM stores its backbone under it (``model.``, ``transformer.``, …), so the
    backbone weights of its checkpoint load by name.
    """
    try:
        backbone_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no backbone (AutoModel) class for {type(config).__name__}") from None
    pretrained = next(c for c in backbone_class.__mro__[1:] if issubclass(c, PreTrainedModel))
    name = pretrained.__name__.removesuffix("PreTrainedModel") + "ForScalarReward"
    return type(
        name, (GenericForSequenceClassification, pretrained), {"base_model_prefix": pretrained.base_model_prefix}
    )


def _reward_class(config) -> type[PreTrainedModel]:
    native = AutoModelForSequenceClassification._model_mapping.get(type(config), None)
    # Only classes with a linear ``score`` head on the last hidden state fit; others (e.g. BART's) get the generic.
    if native is not None and issubclass(native, GenericForSequenceClassification):
        return native
    if native is not None and "self.score = nn.Linear" in inspect.getsource(native.__init__):
        return native
    return _generic_reward_class(config)


def load_reward_model(
    name_or_path: str | None,
    tokenizer=None,
    dtype: str | torch.dtype = "float32",
    model_config: dict[str, Any] | None = None,
    meta: bool = False,
) -> PreTrainedModel:
    """A scalar-reward model, in train mode, from a causal LM (fresh head) or a reward model export (its head).

    Args:
        name_or_path: local Hugging Face directory or hub name: a causal LM (e.g. the SFT export, whose
            unembedding is dropped and a freshly initialised ``score`` head added) or a sequence-classification
            checkpoint with one label (its head is kept). ``None`` builds the embedded default from its config.
        tokenizer: needed for the embedded default (vocabulary size, special tokens); when given, the model takes
            its pad id and grows its embeddings to special tokens added to it (``causal_lm.fit_to_tokenizer``).
        dtype: parameter dtype.
        model_config: overrides of the embedded default's config.
        meta: the architecture only, parameters on the meta device, no weight read (``causal_lm.load_causal_lm``).
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path is None:
        if tokenizer is None:
            raise ValueError("the embedded default reward model needs the tokenizer")
        config = default_model_config(tokenizer, model_config)
        config.num_labels = 1
    else:
        if model_config:
            raise ValueError(f"model_config={model_config} only applies to the embedded default, not {name_or_path}")
        check_model_path(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path, num_labels=1)
    if name_or_path is not None and not meta:
        model = _reward_class(config).from_pretrained(name_or_path, config=config, dtype=torch_dtype)
    else:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _reward_class(config)._from_config(config, dtype=torch_dtype)
    if tokenizer is not None:
        fit_to_tokenizer(model, tokenizer)
    setattr(model.config, OFFSET_KEY, float(getattr(model.config, OFFSET_KEY, 0.0) or 0.0))
    if not meta:
        keep_float32_buffers(model)
    return model.train()


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``(n,)`` column of the last real token of each row, whatever the padding side."""
    columns = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (columns * attention_mask.long()).argmax(-1)


def append_token(input_ids: Tensor, attention_mask: Tensor, token_id: int) -> tuple[Tensor, Tensor]:
    """Put ``token_id`` right after the last real token of each row (one column wider), ``(n, t + 1)``."""
    at = last_token_index(attention_mask)[:, None] + 1
    input_ids = torch.cat([input_ids, input_ids[:, -1:]], dim=1).scatter(1, at, token_id)
    attention_mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, -1:])], dim=1).scatter(1, at, 1)
    return input_ids, attention_mask


def _hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(n, t, h)`` last hidden states of the backbone, positions counted over real tokens only."""
    backbone = model.base_model
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in inspect.signature(backbone.forward).parameters:  # recurrent backbones have none
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return backbone(**kwargs).last_hidden_state


def reward_head(model: PreTrainedModel) -> nn.Linear:
    return model.score


def reward_offset(model: PreTrainedModel) -> float:
    return float(getattr(model.config, OFFSET_KEY, 0.0) or 0.0)


def read_rewards(model: PreTrainedModel, last: Tensor, subtract_offset: bool = True) -> Tensor:
    """``(n,)`` float32 rewards from ``last``, the ``(n, h)`` backbone state at each sequence's last token: the
    head's output, minus the stored ``reward_offset`` when ``subtract_offset`` (the default of every reward
    read-out; training passes ``False``: the ranking loss ignores it). The one read-out of both layouts
    (``sequence_rewards``, ``shared_forward.shared_rewards``)."""
    rewards = reward_head(model)(last).squeeze(-1).float()
    return rewards - reward_offset(model) if subtract_offset else rewards


def sequence_rewards(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, subtract_offset: bool = True
) -> Tensor:
    """``(n,)`` float32 reward of each prompt ⊕ response ⊕ EOS row, read at its last real token (``read_rewards``).

    With ``reward_token_id`` in the config that token is appended first and its state is read instead.
    ``subtract_offset`` applies the stored normalisation (training leaves it off: the ranking loss ignores it).
    A ``peft`` (LoRA) model is read through its adapted ``transformers`` model.
    """
    model = unwrap(model)
    token_id = getattr(model.config, TOKEN_KEY, None)
    if token_id is not None:
        input_ids, attention_mask = append_token(input_ids, attention_mask, token_id)
    hidden = _hidden_states(model, input_ids, attention_mask)  # (n, t, h)
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]  # (n, h)
    return read_rewards(model, last, subtract_offset)


def token_values(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(n, t)`` float32 head output at every position: a value function initialised from the reward model."""
    model = unwrap(model)
    return reward_head(model)(_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()
