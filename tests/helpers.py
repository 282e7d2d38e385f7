"""Tiny models for tests: built from a config, saved in Hugging Face format, loaded back for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import Cache, PreTrainedTokenizerFast

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained

REPO = Path(__file__).resolve().parents[1]

# 2 layers, width 32: about 30k parameters with the 259-token byte vocabulary.
TINY_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


# Where the multi-process tests run: 2 CPU processes (gloo) always; on CUDA (NCCL) with 1 and with 2 devices, marked
# ``gpu`` so CPU CI skips them.
ACCELERATORS = [
    pytest.param("cpu", 2, id="cpu-2"),
    pytest.param("cuda", 1, id="cuda-1", marks=pytest.mark.gpu),
    pytest.param(
        "cuda",
        2,
        id="cuda-2",
        marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")],
    ),
]


def make_tiny_export(directory, seed: int = 0, tied: bool = False) -> str:
    """A tiny Llama with the byte-level tokenizer, exported in Hugging Face format to ``directory``; ``tied``: its
    ``lm_head`` shares the embedding's weight (as in Llama-3.2 1B/3B, small Qwen2.5, Gemma)."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None, tokenizer, "float32", {**TINY_CONFIG, "tie_word_embeddings": tied})
    return str(export_pretrained(model, tokenizer, directory))


# Real checkpoints' chat templates: ChatML (Qwen2-style; each turn closed by "<|im_end|>\n") and Llama-3-style (turns
# closed by "<|eot_id|>", BOS written by the template).
CHAT_STYLES = {
    "chatml": {
        "template": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "specials": {"eos_token": "<|im_end|>"},
        "extra": ["<|im_start|>"],
    },
    "llama3": {
        "template": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "specials": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
}


def bpe_tokenizer(style: str, **specials: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a few strings, with ``style``'s chat template and special tokens
    (``specials`` override them) and no pad token, as real checkpoints ship them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chat = CHAT_STYLES[style]
    vocabulary_specials = [*chat["specials"].values(), *chat["extra"], *specials.values()]
    specials = {**chat["specials"], **specials}
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(dict.fromkeys(vocabulary_specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["Reverse: abcde\nedcba", "the quick brown fox jumps over the lazy dog"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = chat["template"]
    return tokenizer


def end_distributed() -> None:
    """End a multi-process test script cleanly: left to interpreter exit, gloo's threads can abort the process
    ("terminate called without an active exception"), seen now and then in CI."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_python(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess with this repository importable; fails the test, with its stderr, unless it
    exits 0."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lightning-rlhf ARGS`` (as ``python -m lightning_rlhf``), through ``run_python``."""
    return run_python("-m", "lightning_rlhf", *args, cwd=cwd, timeout=timeout)


def fit_config(config: str, tmp_path: Path, *overrides: str):
    """``lightning-rlhf fit --config configs/CONFIG`` with every output under ``tmp_path``, logging each step; returns
    the run's TensorBoard events, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / config),
        *overrides,
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / 'hf'}",
        cwd=tmp_path,
    )
    (events,) = (tmp_path / "tensorboard").glob("version_*/events.out.tfevents.*")
    return EventAccumulator(str(events)).Reload()


def finish(trainer, out_path: str, report: dict) -> None:
    """End a multi-process test script: global rank 0 writes ``report`` as JSON, then every rank leaves the group."""
    if trainer.is_global_zero:
        with open(out_path, "w") as out:
            json.dump(report, out)
    end_distributed()


class StepRecorder(L.Callback):
    """The input ids of every training batch and the named logged metrics after it."""

    def __init__(self, metrics: tuple[str, ...]):
        self.names, self.batches, self.metrics = metrics, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch["input_ids"].tolist())
        self.metrics.append([float(trainer.callback_metrics[name]) for name in self.names])


def straight_and_resumed(fit, metrics: tuple[str, ...], every: int, root: Path) -> tuple[StepRecorder, StepRecorder]:
    """Run ``fit(callbacks, ckpt_path)`` once straight, writing a checkpoint every ``every`` optimiser steps, and once
    resumed from the first of them: what each run trained on and logged, step by step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight, resumed = StepRecorder(metrics), StepRecorder(metrics)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1, filename="{step}")
    fit([straight, checkpoints], None)
    fit([resumed], str(root / "ckpt" / f"step={every}.ckpt"))
    return straight, resumed


class HoldAfter(L.Callback):
    """Before each batch from optimiser step ``step`` on (so after that step's checkpoint is written), touch
    ``ROOT/holding`` and sleep: a test can then kill the run at a known point."""

    def __init__(self, step: int, root: str):
        self.step, self.root = step, Path(root)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            (self.root / "holding").touch()
            time.sleep(600)


def make_tiny_gpt2_export(directory, seed: int = 0) -> str:
    """A tiny GPT-2 (learned absolute positions, unlike RoPE's shift-invariant ones) with the byte tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = load_tokenizer(None)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        vocab_size=len(tokenizer),
        **ids,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return str(export_pretrained(AutoModelForCausalLM.from_config(config), tokenizer, directory))


def caches_seen(model: torch.nn.Module) -> list[type]:
    """A list that records the type of the KV cache each forward of ``model`` receives from now on."""
    seen: list[type] = []

    def record(module, args, kwargs):
        seen.extend(type(value) for value in kwargs.values() if isinstance(value, Cache))

    model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def offloaded_parameters(module: torch.nn.Module) -> dict[str, list[int]]:
    """For each model attribute of a stage module (``model``, ``value_model``, ``value_head``, ``ref_model``,
    ``reward_model``): ``[parameters, FSDP2 shards offloaded to the host, of those on the CPU with their gradient and
    optimiser state there too]`` as FSDP2 records them (its per-parameter ``offload_to_cpu``)."""
    from torch.distributed.fsdp import FSDPModule

    report = {}
    optimizer = module.trainer.optimizers[0] if module.trainer.optimizers else None
    for name in ("model", "value_model", "value_head", "ref_model", "reward_model"):
        model = getattr(module, name, None)
        if model is None:
            continue
        offloaded = [
            fsdp_param.sharded_param
            for unit in model.modules()
            if isinstance(unit, FSDPModule)
            for group in unit._get_fsdp_state()._fsdp_param_groups
            for fsdp_param in group.fsdp_params
            if fsdp_param.offload_to_cpu
        ]
        on_host = [
            p
            for p in offloaded
            if p.device.type == "cpu"
            and (p.grad is None or p.grad.device.type == "cpu")
            and all(s.device.type == "cpu" for s in (optimizer.state.get(p, {}).values() if optimizer else ()))
        ]
        report[name] = [sum(1 for _ in model.parameters()), len(offloaded), len(on_host)]
    return report
