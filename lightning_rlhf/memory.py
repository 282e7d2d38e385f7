"""What each rank will hold before step 1: parameters per model and dtype, gradients, AdamW state, and PPO's
generation (the policy gathered whole, the KV cache), from counts alone (``estimate_memory``, pure); logged at the
end of every stage's ``configure_model`` (``check_memory``), which refuses a run that cannot fit its device.

Not counted: activations (they scale with rows × tokens per forward; ``gradient_checkpointing`` keeps one block's),
the logits of a forward (rows × tokens × vocabulary), FSDP's gathered units during a forward or backward (one or two
blocks in the compute dtype), the allocator's fragmentation and the CUDA context. The
estimate is a floor: a run over it cannot fit, a run under it may still not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30


class DoesNotFit(ValueError):
    """A run whose models cannot fit its device (a user error: the CLI prints it as one line)."""


@dataclass(frozen=True)
class ModelCount:
    """One model's parameters as ``estimate_memory`` needs them."""

    name: str
    parameters: int
    """All parameters (whole-model count, not a shard's)."""
    trainable: int
    """Parameters the optimiser steps (LoRA: the adapters and ``modules_to_save``; frozen models: 0)."""
    bytes_per_parameter: int
    """Storage dtype's size: 4 for float32 (the master weights of ``bf16-mixed`` too), 2 for bf16 / fp16."""


@dataclass(frozen=True)
class Generation:
    """What sampling a rollout holds on each rank (PPO)."""

    rows: int
    """Sequences sampled at once per rank: prompts per batch × ``num_generations``."""
    tokens: int
    """Longest sequence: prompt ``max_length`` + ``max_new_tokens``."""
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int
    """The compute dtype's size (2 under ``bf16-mixed``)."""
    policy_parameters: int
    """Gathered whole for the decode steps under FSDP2 (``strategies.gathered``), in the compute dtype."""


@dataclass(frozen=True)
class Layout:
    """How the run spreads the models: ``ranks`` processes, sharding (FSDP) or replicas (one process, DDP)."""

    ranks: int = 1
    sharded: bool = False


def estimate_memory(models: list[ModelCount], layout: Layout, generation: Generation | None = None) -> dict[str, int]:
    """Bytes each rank holds on its device, per component.

    Per model ``P`` parameters of ``b`` bytes, ``T`` of them trainable, over ``s`` shards (``layout.ranks`` when
    sharded, else 1): parameters ``P·b/s``, gradients ``T·b/s``, AdamW's two moments ``2·T·b/s``. Generation adds
    the KV cache ``2 (K and V) · layers · kv_heads · head_dim · rows · tokens · bytes`` and, when sharded over several
    ranks, the whole policy gathered in the compute dtype (``strategies.gathered`` keeps it so across decode steps).
    """
    shards = layout.ranks if layout.sharded else 1
    estimate: dict[str, int] = {}
    for model in models:
        estimate[f"{model.name} parameters"] = model.parameters * model.bytes_per_parameter // shards
    trainable = sum(m.trainable * m.bytes_per_parameter for m in models) // shards
    if trainable:
        estimate["gradients"] = trainable
        estimate["AdamW state"] = 2 * trainable
    if generation is not None:
        g = generation
        estimate["generation KV cache"] = 2 * g.layers * g.kv_heads * g.head_dim * g.rows * g.tokens * g.bytes_per_value
        if shards > 1:
            estimate["policy gathered for generation"] = g.policy_parameters * g.bytes_per_value
    return estimate


def fit_options(
    models: list[ModelCount], layout: Layout, generation: Generation | None, capacity: int
) -> list[tuple[str, int]]:
    """What would bring the total under ``capacity``: ``(option, estimated bytes)`` for each change that fits on its
    own. LoRA is counted as no trainable parameter at all: its adapters are a fraction of a percent of the model."""
    bf16 = [dataclasses.replace(m, bytes_per_parameter=2) if m.bytes_per_parameter > 2 else m for m in models]
    frozen = [dataclasses.replace(m, trainable=0) for m in models]
    more = max(8, 2 * layout.ranks)
    candidates = [
        ("lora (only adapters trained: no full gradients or AdamW state)", frozen, layout, generation),
        ("dtype: bfloat16 (parameters stored in bf16)", bf16, layout, generation),
        (f"ModelParallelStrategy (FSDP2) over {more} ranks", models, Layout(more, True), generation),
    ]
    if generation is not None:
        fewer = dataclasses.replace(generation, rows=max(1, generation.rows // 4))
        candidates.append(("a quarter of the rows per rollout (data batch_size)", models, layout, fewer))
    options = []
    for name, option_models, option_layout, option_generation in candidates:
        total = sum(estimate_memory(option_models, option_layout, option_generation).values())
        if total <= capacity:
            options.append((name, total))
    return options


def count_model(name: str, model: nn.Module) -> ModelCount:
    """A model's ``ModelCount``: whole-model counts (an FSDP2 ``DTensor`` reports its global shape)."""
    params = list(model.parameters())
    return ModelCount(
        name=name,
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        bytes_per_parameter=max((p.element_size() for p in params), default=4),
    )


def device_capacity(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; ``None`` elsewhere (CPU: the host's memory is shared by the ranks)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def host_capacity() -> int | None:
    """Physical host memory in bytes (Linux ``/proc/meminfo``), or ``None``."""
    try:
        with open("/proc/meminfo") as meminfo:
            return int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def format_bytes(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.2f} MiB"


def describe(estimate: dict[str, int]) -> str:
    return "\n".join(f"  {component:31} {format_bytes(size):>12}" for component, size in estimate.items())


def check_memory(module, models: dict[str, nn.Module | None], generation: Generation | None = None) -> None:
    """Log the per-rank estimate at the end of ``configure_model`` and refuse (``DoesNotFit``) a run whose total
    exceeds its CUDA device, or, on CPU, whose ranks on this host together exceed the host's memory, naming the
    options that would fit alone. Does nothing outside a trainer (``configure_model`` called by hand)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities import rank_zero_info

    trainer = module._trainer
    if trainer is None:
        return
    counts = [count_model(name, model) for name, model in models.items() if model is not None]
    if trainer.state.fn != "fit":  # validate / test / predict: no gradients, no optimiser state
        counts = [dataclasses.replace(count, trainable=0) for count in counts]
    strategy = trainer.strategy
    layout = Layout(trainer.world_size, sharded=module.device_mesh is not None or isinstance(strategy, FSDPStrategy))
    estimate = estimate_memory(counts, layout, generation)
    total = sum(estimate.values())
    capacity = device_capacity(strategy.root_device)
    rank_zero_info(
        f"memory per rank, estimated before step 1 ({layout.ranks} rank(s), sharded={layout.sharded}; activations "
        f"and logits not counted):\n{describe(estimate)}\n  total {format_bytes(total)}"
        + (f" of {strategy.root_device}'s {format_bytes(capacity)}" if capacity else "")
    )
    local_ranks = max(1, trainer.num_devices)
    host = host_capacity() if capacity is None else None
    if capacity is not None and total > capacity:
        limit, where = capacity, f"{strategy.root_device}'s {format_bytes(capacity)}"
    elif host is not None and total * local_ranks > host:
        limit, where = host // local_ranks, f"the host's {format_bytes(host)} over {local_ranks} rank(s)"
    else:
        return
    options = fit_options(counts, layout, generation, limit)
    advice = "; ".join(f"{name} → {format_bytes(size)}" for name, size in options) or (
        "no one of LoRA, bf16, more ranks or fewer rows fits alone: combine them, or a bigger device"
    )
    parts = ", ".join(f"{component} {format_bytes(size)}" for component, size in estimate.items())
    raise DoesNotFit(
        f"the models need at least {format_bytes(total)} per rank before any activation ({parts}), more than "
        f"{where}. What would fit: {advice}"
    )


def ppo_generation(module) -> Generation | None:
    """PPO's rollout as ``Generation``: the DataModule's prompts per batch × ``num_generations`` rows of its
    ``max_length`` + ``max_new_tokens`` tokens, the policy's attention shape, in the compute dtype."""
    from lightning_rlhf.lora import unwrap

    hp, trainer = module.hparams, module._trainer
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    if data is None or not hasattr(data, "hparams"):
        return None
    config = unwrap(module.model).config
    heads = config.num_attention_heads
    precision = str(trainer.precision)
    compute = 2 if precision.startswith(("bf16", "16")) else next(module.model.parameters()).element_size()
    return Generation(
        rows=data.hparams.get("batch_size", 1) * hp.num_generations,
        tokens=data.hparams.get("max_length", 0) + hp.max_new_tokens,
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        bytes_per_value=compute,
        policy_parameters=sum(p.numel() for p in module.model.parameters()),
    )
