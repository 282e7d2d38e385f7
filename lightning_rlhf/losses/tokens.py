"""Log-probabilities of tokens, and the masked reductions every loss is built from.

Shapes: ``b`` batch, ``t`` time, ``v`` vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token] in float32, one chunk of rows at a time, forward and backward.

    ``torch.log_softmax(logits.float())`` would hold a float32 copy of the whole ``(b, t, v)`` tensor, and
    autograd would keep it for backward. Here each chunk is normalised by a fused kernel that upcasts as it reads
    (``dtype=torch.float32``), only the picked log-prob is kept, and backward recomputes the softmax chunk by chunk,
    so the extra memory is one float32 chunk.
    """

    @staticmethod
    def _scaled(chunk: Tensor, temperature: float) -> Tensor:
        # At temperature 1 the kernels upcast as they read; otherwise one float32 chunk is divided.
        return chunk if temperature == 1.0 else chunk.float() / temperature  # a new tensor: never in place

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, chunk_rows: int, temperature: float) -> Tensor:  # (n, v) -> (n,)
        picked = [
            torch.log_softmax(_TokenLogprobs._scaled(chunk, temperature), dim=-1, dtype=torch.float32)
            .gather(-1, chunk_tokens[:, None])
            .squeeze(-1)
            for chunk, chunk_tokens in zip(logits.split(chunk_rows), tokens.split(chunk_rows), strict=True)
        ]
        ctx.save_for_backward(logits, tokens)
        ctx.chunk_rows, ctx.temperature = chunk_rows, temperature
        return torch.cat(picked)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, tokens = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            scale = grad_out[rows, None] / ctx.temperature
            # d/dlogits [log softmax(logits / T)_y] = (onehot(y) - softmax(logits / T)) / T, in float32
            probs = torch.softmax(_TokenLogprobs._scaled(logits[rows], ctx.temperature), dim=-1, dtype=torch.float32)
            grad_logits[rows] = probs.mul_(-scale).scatter_add_(-1, tokens[rows, None], scale)
        return grad_logits, None, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_rows: int = 1024, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under its own logits (divided by ``temperature``), no shift inside.

    ``logits[:, t]`` scores ``tokens[:, t]``: to score next tokens, callers pass ``logits[:, :-1]`` and
    ``tokens[:, 1:]``. Positions whose token is negative (``IGNORE_INDEX``) get 0.

    Args:
        logits: ``(b, t, v)`` in any float dtype (bf16 included).
        tokens: ``(b, t)`` token ids.
        chunk_rows: rows of ``b * t`` normalised at once in float32; bounds the extra memory.
        temperature: scores under ``softmax(logits / temperature)``, the distribution sampled at that temperature,
            without a tempered copy of the whole ``logits``.

    Returns:
        ``(b, t)`` float32 log-probabilities, exact in float32 for the given logits.
    """
    valid = tokens >= 0
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    flat = _TokenLogprobs.apply(
        logits.reshape(-1, logits.size(-1)), tokens.clamp(min=0).reshape(-1), chunk_rows, float(temperature)
    )
    return flat.view(tokens.shape) * valid


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is true (over ``dim``, or everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true, over ``dim`` or everything. An empty mask gives 0."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``values`` (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of ``values`` to unit variance (and zero mean unless ``shift_mean=False``).

    The statistics use the masked entries only (unbiased variance); entries past the mask come out 0.
    Used to whiten PPO advantages (Schulman et al. 2017 implementations; Ziegler et al. 2019).
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
