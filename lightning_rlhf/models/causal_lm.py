"""Loading causal LMs, their forward (padded or packed), and sequence log-probs.

``model_name_or_path=None`` means the embedded default: a small Llama-style model built from a config
(random init, trained from scratch), fitted to the offline byte-level tokenizer (``data.tokenizer``), so nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_rlhf.data.tokenizer import check_model_path
from lightning_rlhf.losses.tokens import IGNORE_INDEX, masked_sum, token_logprobs
from lightning_rlhf.models.modes import evaluating

# The embedded default: 2 layers, width 64 (about 115k parameters with the byte vocabulary).
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``model`` use ``tokenizer``'s pad id and have an embedding row for each of its tokens.

    Ids beyond the model's embedding are allowed only for special tokens added to the tokenizer (``PAD_TOKEN``, a
    reward token); their new rows (input and output) start at the mean of the existing ones: deterministic, so a
    policy and its reference grown from one checkpoint stay identical.
    """
    size = model.get_input_embeddings().num_embeddings
    if size < len(tokenizer):
        added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        if not set(range(size, len(tokenizer))) <= added:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {size}: they do not belong "
                "together"
            )
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        output = model.get_output_embeddings()
        weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), output) if m is not None}
        with torch.no_grad():
            for weight in weights.values():
                weight[size:] = weight[:size].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_model_config(tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None = None) -> LlamaConfig:
    """The embedded default Llama config, sized to ``tokenizer``, with ``overrides`` applied."""
    return LlamaConfig(
        **{
            **DEFAULT_MODEL_CONFIG,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **(overrides or {}),
        }
    )


def load_causal_lm(
    name_or_path: str | None,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str | torch.dtype = "float32",
    model_config: dict[str, Any] | None = None,
    meta: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local Hugging Face directory or hub name, or the embedded default when ``None``.

    ``model_config`` overrides fields of the default config (e.g. ``{"num_hidden_layers": 4}``); it is an error
    with a pretrained model, whose architecture is fixed by its checkpoint. The model comes back in train mode, its
    parameters in ``dtype`` as they are read (a bf16 checkpoint is never upcast on the way unless ``dtype`` asks).
    ``meta=True``: the same architecture with its parameters on the meta device and no weight read (the ranks but
    the first under sharded loading, ``strategies.Rank0Load``); its buffers, too, wait for rank 0's.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path is None:
        config = default_model_config(tokenizer, model_config)
    elif model_config:
        raise ValueError(f"model_config={model_config} only applies to the embedded default, not {name_or_path}")
    else:
        check_model_path(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path) if meta else None
    if config is None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    else:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    fit_to_tokenizer(model, tokenizer)
    if not meta:
        keep_float32_buffers(model)
    return model.train()


# Buffers computed in float32 that a cast of the whole module must not round: RoPE's inverse frequencies. In bf16
# they are off by up to 4e-3 relative, 0.45 rad of rotation at position 1,024 (transformers #25681, #30709).
FLOAT32_BUFFERS = ("inv_freq", "original_inv_freq")


def keep_float32_buffers(model: torch.nn.Module) -> None:
    """Keep the ``FLOAT32_BUFFERS`` of ``model``'s submodules in float32 whatever the model is cast to.

    Lightning's ``bf16-true`` casts the whole module (``module.to(bfloat16)``) and FSDP1 casts buffers to its
    ``buffer_dtype``; a forward pre-hook puts the exact float32 values, kept aside now, back before each forward.
    """
    for module in model.modules():
        exact = {
            name: buffer.detach().float().clone()
            for name, buffer in module.named_buffers(recurse=False)
            if name in FLOAT32_BUFFERS and buffer.is_floating_point()
        }
        if exact:
            module.register_forward_pre_hook(partial(_restore_float32_buffers, exact))


def _restore_float32_buffers(exact: dict[str, Tensor], module: torch.nn.Module, args) -> None:
    for name, value in exact.items():
        current = getattr(module, name)
        if current.dtype != torch.float32:
            setattr(module, name, value.to(current.device))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count real tokens only, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0
) -> Tensor:
    """``(b, t, v)`` logits with padding-independent positions; ``(b, k, v)`` for the last ``logits_to_keep = k``
    columns only (the unembedding then runs over those alone: at a 128k vocabulary it dominates the memory)."""
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs).logits


def packed_logits(model: PreTrainedModel, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """``(r, t, v)`` logits of packed rows: several sequences per row, ``position_ids`` restarting at 0 at each.

    Given ``position_ids`` and no attention mask or cache, transformers keeps attention inside each sequence
    (``masking_utils.find_packed_sequence_indices``): a block-causal mask for sdpa, eager and flex attention, varlen
    kernels over the sequence lengths for flash attention, which detects packing in a single row only, so there the
    rows go in as one. ``use_cache=False``: the cache a training forward would otherwise build turns the detection
    off. Models that do not honour it are refused by ``check_packed_attention``.
    """
    shape = input_ids.shape
    if model.config._attn_implementation.startswith("flash"):
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return logits.view(*shape, -1)


def check_packed_attention(model: PreTrainedModel, device: torch.device) -> None:
    """Refuse a model that would attend across packed sequences.

    Two 4-token sequences packed in one row through ``packed_logits``: the second's logits must be those it has
    alone, much closer to them than to its logits when it follows the first without a restart (attending to it).
    Some model classes or attention implementations (ones outside ``masking_utils``) ignore packed positions.
    """
    tokens = torch.arange(3, 11, device=device)[None]
    positions = torch.arange(4, device=device).repeat(2)[None]
    with evaluating(model), torch.no_grad():  # no dropout
        packed = packed_logits(model, tokens, positions)[0, 4:].float()
        alone = packed_logits(model, tokens[:, 4:], positions[:, 4:])[0].float()
        crossed = model(input_ids=tokens, use_cache=False).logits[0, 4:].float()
    leak, crossing = (packed - alone).abs().max(), (crossed - alone).abs().max()
    if not leak < 0.1 * crossing:
        raise ValueError(
            f"packing: {type(model).__name__} with attn_implementation={model.config._attn_implementation!r} attends "
            f"across packed sequences (logits of a packed sequence off by {float(leak):.3g} from the sequence alone). "
            "Set the DataModule's packing: false, or use a model built on transformers' masking_utils with sdpa, "
            "eager, flex or flash attention."
        )


def next_tokens(labels: Tensor) -> Tensor:
    """``(b, t)`` labels shifted left by one, ``IGNORE_INDEX`` in the last column: column ``t`` holds the token that
    ``logits[:, t]`` predicts. Shifting the labels, not the logits, keeps ``logits[:, :-1]`` from being copied (and
    saved for backward)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token log-probs of ``labels`` under ``logits``: ``(b, t-1)`` values and the mask of scored tokens.

    ``logits[:, t]`` predicts token ``t + 1``; label ``IGNORE_INDEX`` (prompt, padding) is not scored.
    """
    targets = next_tokens(labels)
    return token_logprobs(logits, targets)[:, :-1], (targets != IGNORE_INDEX)[:, :-1]


def sequence_logprobs(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the labelled tokens of each sequence, ``(b,)``, and their count, ``(b,)``."""
    logprobs, mask = shifted_logprobs(forward_logits(model, input_ids, attention_mask), labels)
    return masked_sum(logprobs, mask, dim=-1), mask.sum(-1)


def keep_out_of_checkpoints(module: torch.nn.Module, *attributes: str) -> None:
    """Leave the weights of ``module.<attribute>`` (frozen models rebuilt from their paths in ``configure_model``)
    out of ``module``'s state dict, and let a state dict without them load.

    Not under FSDP1 (``FSDPStrategy``): its root module asserts that every parameter it manages is in the state
    dict, so there they stay in (the export takes only the trained model's weights anyway).
    """
    prefixes = tuple(f"{name}." for name in attributes)

    def drop(module, state_dict, prefix, local_metadata) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(getattr(getattr(module, "_trainer", None), "strategy", None), FSDPStrategy):
            return
        for key in [k for k in state_dict if k[len(prefix) :].startswith(prefixes)]:
            del state_dict[key]

    def allow_missing(module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not any(k.startswith(p) or f".{p}" in k for p in prefixes)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(allow_missing)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so repeated forwards of the same tokens agree exactly."""
    # Some architectures keep a probability as a float attribute and call the functional dropout (Llama's attention).
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop")
    for submodule in [*model.modules(), model.config]:
        if isinstance(submodule, torch.nn.Dropout):
            submodule.p = 0.0
        for name in names:
            if isinstance(getattr(submodule, name, None), float):
                setattr(submodule, name, 0.0)
