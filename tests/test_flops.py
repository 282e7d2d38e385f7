"""FLOP counts for MFU against hand counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_rlhf.training.flops import FORWARD_PASSES, forward_flops, matmul_params, peak_tflops


def test_forward_flops_hand_computed():
    """N = 100, 2 layers, attention width 8, sequences of 3 and 5 real tokens:
    matmuls 2 · 100 · (3 + 5) = 1600; attention 4 · 2 · 8 · (3² + 5²) = 64 · 34 = 2176; total 3776. Training is 3
    forwards (11,328 = 6N per token + 3 × attention), DPO 4 (15,104: policy trained plus the reference's forward)."""
    assert forward_flops(100, 2, 8, [3, 5]) == 3776
    assert FORWARD_PASSES["sft"] * forward_flops(100, 2, 8, [3, 5]) == 11_328
    assert FORWARD_PASSES["dpo"] * forward_flops(100, 2, 8, [3, 5]) == 15_104


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_leave_out_the_embedding_lookup_hand_computed(tied):
    """Llama, width 4, MLP 8, one layer, 2 heads of 2, 1 KV head, vocabulary 10: q 4·4 = 16, k 4·2 = 8, v 8, o 16,
    MLP 3 · 4 · 8 = 96, norms 3 · 4 = 12, unembedding 10 · 4 = 40: 196 multiply activations; the embedding's 40 are
    a lookup. Tied, the shared weight is still the unembedding's matmul: 196 as well."""
    config = LlamaConfig(
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
        tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == (196 if tied else 236)
    assert matmul_params(model) == 196


def test_peak_is_the_one_of_the_dtype_the_matmuls_run_in():
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9  # not the bf16 peak, 15x higher
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494.7
    assert peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert peak_tflops("NVIDIA H200", torch.bfloat16) == 989.4
    assert peak_tflops("cpu", torch.float32) is None
