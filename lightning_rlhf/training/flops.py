"""Model FLOPs of a training step, for model-FLOPs utilisation (MFU = model FLOPs per second / the card's peak).

Counted as in PaLM (Chowdhery et al. 2022, appendix B): a forward pass costs 2 FLOPs (a multiply and an add) per
parameter that multiplies activations per token, plus the attention scores and their weighted sum; a backward pass
costs two forwards. Tokens are real tokens (padding excluded) and attention is charged at each sequence's real
length, so neither padding nor a generous ``max_length`` inflates the figure.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Forward-pass equivalents per trained token: forward + backward (2 forwards) = 3, i.e. 6N; DPO adds the frozen
# reference's forward, 4 in all (8N).
FORWARD_PASSES = {"sft": 3, "rm": 3, "dpo": 4}


# Dense peak TFLOPS from NVIDIA's data sheets, (bf16, tf32, fp32), matched by the first name contained in the
# device's name (so "H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
}


def matmul_params(model: nn.Module) -> int:
    """Parameters that multiply activations: all but the input embedding (a lookup, no FLOPs); a tied unembedding
    still is a matmul, so its shared weight counts once."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is embedding
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())


def forward_flops(n_params: int, layers: int, attention_width: int, lengths: Iterable[int]) -> float:
    """FLOPs of one forward pass over sequences of the given real lengths.

    Per token: ``2 · n_params`` for the matmuls, and per layer ``2 · 2 · s · attention_width`` for ``QKᵀ`` and for
    the attention-weighted sum of ``V`` over the ``s`` positions of its sequence (``attention_width`` = heads ×
    head size; every position counted, as PaLM counts them).
    """
    return float(sum(2 * n_params * s + 4 * layers * attention_width * s * s for s in lengths))


def peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The card's dense peak for the dtype the matmuls run in (float32 as TF32 when ``tf32``); ``None`` if unknown."""
    for name, (bf16, tf32_peak, fp32) in PEAK_TFLOPS.items():
        if name in device_name:
            if dtype in (torch.bfloat16, torch.float16):
                return bf16
            return tf32_peak if tf32 else fp32
    return None
