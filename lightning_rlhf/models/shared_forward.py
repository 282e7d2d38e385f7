"""Forwards over shared-prompt batches (``data.shared_prompt``): per-response log-probs and rewards.

The batch's boolean ``(r, 1, t, t)`` mask goes to the model explicitly, never left out: given ``position_ids`` and no
mask, transformers infers packed sequences from the positions (``masking_utils.find_packed_sequence_indices``) and
would misread this layout (sdpa splits at any jump, flash attention only at position 0). transformers 5 hands a 4D
mask to the attention function as it is (``masking_utils._preprocess_mask_arguments``): sdpa takes it boolean, eager
adds it to the scores, so there it becomes 0 / the dtype's minimum. Other implementations (flash attention's varlen
kernels cannot express "one prompt, several mutually invisible responses"; flex attention wants a ``BlockMask``) are
refused, as is any model the layout turns out not to be exact for (``check_shared_prompt_attention``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.losses.tokens import token_logprobs
from lightning_rlhf.models.causal_lm import sequence_logprobs
from lightning_rlhf.models.lora import unwrap
from lightning_rlhf.models.modes import evaluating
from lightning_rlhf.models.reward import TOKEN_KEY, read_rewards


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# How each attention implementation takes the layout's boolean mask (True: attend), given the model's float dtype.
MASK_FORMS: dict[str, Callable[[Tensor, torch.dtype], Tensor]] = {
    "sdpa": lambda mask, dtype: mask,
    "eager": _additive,
}


def model_mask(model: PreTrainedModel, mask: Tensor) -> Tensor:
    """The layout's boolean mask in the form ``model``'s attention implementation takes."""
    model = unwrap(model)
    implementation = model.config._attn_implementation
    if implementation not in MASK_FORMS:
        raise ValueError(
            f"shared_prompt: attn_implementation={implementation!r} cannot take the shared-prompt mask (one prompt, "
            f"several responses that do not see each other); use one of {sorted(MASK_FORMS)}, or set the "
            "DataModule's shared_prompt: false"
        )
    return MASK_FORMS[implementation](mask, model.dtype)


def token_outputs(model: PreTrainedModel, batch: dict[str, Tensor], hidden: bool = False) -> Tensor:
    """``(r, t, v)`` logits of the rows (``hidden``: the backbone's ``(r, t, h)`` last hidden states, as a reward or
    value model reads them) given ``input_ids``, ``position_ids`` and the mask: the layout's 4D boolean one
    (handed over in ``model_mask``'s form) or a 2D padding mask."""
    model = unwrap(model)  # a peft model's adapters live inside the transformers model
    module = model.base_model if hidden else model
    if "position_ids" not in inspect.signature(module.forward).parameters:
        raise ValueError(f"shared_prompt: {type(module).__name__} takes no position_ids; set shared_prompt: false")
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        mask = model_mask(model, mask)
    out = module(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hidden else out.logits


def shared_sequence_logprobs(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each response's tokens, ``(n,)``, and their count, ``(n,)``: ``causal_lm.sequence_logprobs``
    of the padded layout. Only the ``m`` predicting columns' logits are gathered (``(m, v)``), each once per token it
    predicts: the prompt's last column predicts every response's first token."""
    logits = token_outputs(model, batch)
    predicting = logits.flatten(0, 1)[batch["logprob_index"]]  # (m, v)
    logprobs = token_logprobs(predicting[None], batch["logprob_targets"][None])[0]  # (m,)
    owner, n = batch["logprob_owner"], len(batch["reward_index"])
    sums = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add(0, owner, logprobs)
    return sums, torch.bincount(owner, minlength=n)


def response_logprobs(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(n,)`` summed log-probs and token counts of a comparison batch's responses, whichever its layout."""
    if "logprob_index" in batch:
        return shared_sequence_logprobs(model, batch)
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def shared_rewards(model: PreTrainedModel, batch: dict[str, Tensor], subtract_offset: bool = True) -> Tensor:
    """``(n,)`` float32 reward of each response of a shared-prompt batch, read at its last token: as
    ``reward.sequence_rewards`` reads it in the padded layout, the offset subtracted unless ``subtract_offset``
    is ``False`` (``reward.read_rewards``)."""
    model = unwrap(model)
    if getattr(model.config, TOKEN_KEY, None) is not None:
        raise ValueError(
            "shared_prompt: a reward model with a reward_token reads a token appended after each response, which "
            "the shared-prompt layout does not hold; set the DataModule's shared_prompt: false"
        )
    last = token_outputs(model, batch, hidden=True).flatten(0, 1)[batch["reward_index"]]  # (n, h)
    return read_rewards(model, last, subtract_offset)


def check_shared_prompt_attention(model: PreTrainedModel, device: torch.device, hidden: bool = False) -> None:
    """Refuse a model the shared-prompt layout is not exact for, at its first batch (``hidden``: as a reward model).

    A prompt of 3 tokens and two responses of 2: the second response's outputs in the layout must be those of
    prompt ⊕ response alone (a padded row), much closer to them than when it sees its sibling (as if the mask were
    ignored) or when its positions do not continue from the prompt's end.
    """
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9]], device=device)
    continued = torch.tensor([[0, 1, 2, 3, 4, 3, 4]], device=device)
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2]], device=device)
    causal = torch.ones(7, 7, dtype=torch.bool, device=device).tril()[None, None]
    shared = causal & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))[:, None]
    variants = {
        "layout": (continued, shared),
        "siblings_visible": (continued, causal),
        "positions_from_zero": (torch.arange(7, device=device)[None], shared),
    }
    alone = {
        "input_ids": torch.tensor([[3, 4, 5, 8, 9]], device=device),
        "position_ids": torch.arange(5, device=device)[None],
        "attention_mask": torch.ones(1, 5, dtype=torch.long, device=device),
    }
    with evaluating(model), torch.no_grad():  # no dropout
        expected = token_outputs(model, alone, hidden)[0, 3:].float()
        errors = {
            name: float((token_outputs(model, batch, hidden)[0, 5:].float() - expected).abs().max())
            for name, batch in (
                (name, {"input_ids": tokens, "position_ids": positions, "attention_mask": mask})
                for name, (positions, mask) in variants.items()
            )
        }
    if not errors["layout"] < 0.1 * min(errors["siblings_visible"], errors["positions_from_zero"]):
        raise ValueError(
            f"shared_prompt: {type(unwrap(model)).__name__} with attn_implementation="
            f"{unwrap(model).config._attn_implementation!r} is not exact in the shared-prompt layout (a response's "
            f"outputs off by {errors['layout']:.3g} from the response alone; {errors}). Set the DataModule's "
            "shared_prompt: false, or use a model built on transformers' masking_utils with sdpa or eager attention."
        )
