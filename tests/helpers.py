"""Tiny models for tests: built from a config, saved in Hugging Face format, loaded back for real."""

from __future__ import annotations

import torch

from lightning_rlhf.models import export_pretrained, load_causal_lm, load_tokenizer

# 2 layers, width 32: about 30k parameters with the 259-token byte vocabulary.
TINY_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def make_tiny_export(directory, seed: int = 0) -> str:
    """A tiny Llama with the byte-level tokenizer, exported in Hugging Face format to ``directory``."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None, tokenizer, "float32", TINY_CONFIG)
    return str(export_pretrained(model, tokenizer, directory))


def end_distributed() -> None:
    """End a multi-process test script cleanly: left to interpreter exit, gloo's threads can abort the process
    ("terminate called without an active exception"), seen now and then in CI."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
