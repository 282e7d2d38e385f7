"""What each rank will hold before step 1: parameters per model and dtype, gradients, AdamW state, and PPO's
generation (the policy gathered whole, the KV cache), from counts alone (``estimate_memory``, pure); with FSDP2's CPU
offload the parameters, gradients and AdamW state on the host instead (``offloaded_memory``). Logged at the end of
every stage's ``configure_model`` (``check_memory``), which refuses a run that cannot fit its device or its host.

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
    """How the run spreads the models: ``ranks`` processes, sharding (FSDP) or replicas (one process, DDP), and
    whether FSDP2 keeps the shards on the host (``strategies.FSDP2Strategy(cpu_offload=True)``)."""

    ranks: int = 1
    sharded: bool = False
    offload: bool = False


def model_state(models: list[ModelCount], layout: Layout) -> dict[str, int]:
    """Bytes of each rank's model state, wherever it lives: per model ``P`` parameters of ``b`` bytes, ``T`` of them
    trainable, over ``s`` shards (``layout.ranks`` when sharded, else 1): parameters ``P·b/s``, gradients ``T·b/s``,
    AdamW's two moments ``2·T·b/s``."""
    shards = layout.ranks if layout.sharded else 1
    state: dict[str, int] = {}
    for model in models:
        state[f"{model.name} parameters"] = model.parameters * model.bytes_per_parameter // shards
    trainable = sum(m.trainable * m.bytes_per_parameter for m in models) // shards
    if trainable:
        state["gradients"] = trainable
        state["AdamW state"] = 2 * trainable
    return state


def offloaded_memory(models: list[ModelCount], layout: Layout) -> dict[str, int]:
    """Bytes each rank holds in host memory for FSDP2's CPU offload: its whole ``model_state`` (parameter shards, their
    gradients, AdamW state); nothing without offload."""
    return model_state(models, layout) if layout.offload else {}


def estimate_memory(models: list[ModelCount], layout: Layout, generation: Generation | None = None) -> dict[str, int]:
    """Bytes each rank holds on its device, per component.

    The ``model_state`` (parameters, gradients, AdamW state), unless offloaded to the host (``offloaded_memory``:
    then the device holds only the units FSDP2 copies in for a forward or backward, not counted, like the gathered
    units without offload). Generation adds the KV cache ``2 (K and V) · layers · kv_heads · head_dim · rows · tokens ·
    bytes`` and, when sharded over several ranks, the whole policy gathered in the compute dtype
    (``strategies.gathered`` keeps it so across decode steps), offloaded or not.
    """
    shards = layout.ranks if layout.sharded else 1
    estimate = {} if layout.offload else model_state(models, layout)
    if generation is not None:
        g = generation
        estimate["generation KV cache"] = 2 * g.layers * g.kv_heads * g.head_dim * g.rows * g.tokens * g.bytes_per_value
        if shards > 1:
            estimate["policy gathered for generation"] = g.policy_parameters * g.bytes_per_value
    return estimate


def fit_options(
    models: list[ModelCount],
    layout: Layout,
    generation: Generation | None,
    capacity: int,
    host_per_rank: int | None = None,
) -> list[tuple[str, int]]:
    """What would bring the device total under ``capacity``: ``(option, estimated bytes)`` for each change that fits on
    its own. LoRA is counted as no trainable parameter at all: its adapters are a fraction of a percent of the model.
    CPU offload is offered when ``host_per_rank`` (host bytes free for each rank; ``None`` on a CPU, where offload
    moves nothing) holds the ``offloaded_memory`` it would put there."""
    bf16 = [dataclasses.replace(m, bytes_per_parameter=2) if m.bytes_per_parameter > 2 else m for m in models]
    frozen = [dataclasses.replace(m, trainable=0) for m in models]
    more = max(8, 2 * layout.ranks)
    candidates = [
        ("lora (only adapters trained: no full gradients or AdamW state)", frozen, layout, generation),
        ("dtype: bfloat16 (parameters stored in bf16)", bf16, layout, generation),
        (f"ModelParallelStrategy (FSDP2) over {more} ranks", models, Layout(more, True, layout.offload), generation),
    ]
    offloaded = Layout(layout.ranks, sharded=True, offload=True)
    host = sum(offloaded_memory(models, offloaded).values())
    if not layout.offload and host_per_rank is not None and host <= host_per_rank:
        name = f"cpu_offload (FSDP2Strategy: parameters, gradients, AdamW state on the host, {format_bytes(host)}/rank)"
        candidates.append((name, models, offloaded, generation))
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
    exceeds its CUDA device, or whose ranks on this host together exceed the host's memory (on CPU the device is the
    host; with CPU offload the host holds the ``offloaded_memory``), naming the options that would fit alone. Does
    nothing outside a trainer (``configure_model`` called by hand)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities import rank_zero_info

    trainer = module._trainer
    if trainer is None:
        return
    counts = [count_model(name, model) for name, model in models.items() if model is not None]
    if trainer.state.fn != "fit":  # validate / test / predict: no gradients, no optimiser state
        counts = [dataclasses.replace(count, trainable=0) for count in counts]
    strategy = trainer.strategy
    sharded = module.device_mesh is not None or isinstance(strategy, FSDPStrategy)
    offload = module.device_mesh is not None and bool(getattr(strategy, "cpu_offload", False))
    layout = Layout(trainer.world_size, sharded=sharded, offload=offload)
    estimate = estimate_memory(counts, layout, generation)
    offloaded = offloaded_memory(counts, layout)
    total, on_host = sum(estimate.values()), sum(offloaded.values())
    capacity = device_capacity(strategy.root_device)
    rank_zero_info(
        f"memory per rank, estimated before step 1 ({layout.ranks} rank(s), sharded={layout.sharded}, "
        f"cpu_offload={layout.offload}; activations and logits not counted):\n{describe(estimate)}\n  total "
        f"{format_bytes(total)}"
        + (f" of {strategy.root_device}'s {format_bytes(capacity)}" if capacity else "")
        + (f"\n  offloaded to host memory:\n{describe(offloaded)}\n  total {format_bytes(on_host)}" if offload else "")
    )
    local_ranks = max(1, trainer.num_devices)
    host = host_capacity()
    host_need = (on_host if capacity is not None else total + on_host) * local_ranks
    if capacity is not None and total > capacity:
        limit, where = capacity, f"{strategy.root_device}'s {format_bytes(capacity)}"
    elif host is not None and host_need > host:
        limit, where = host // local_ranks, f"the host's {format_bytes(host)} over {local_ranks} rank(s)"
        total = host_need // local_ranks
    else:
        return
    host_per_rank = host // local_ranks if capacity is not None and host is not None else None
    options = fit_options(counts, layout, generation, limit, host_per_rank)
    advice = "; ".join(f"{name} → {format_bytes(size)}" for name, size in options) or (
        "no one of LoRA, bf16, more ranks, CPU offload or fewer rows fits alone: combine them, or a bigger device"
    )
    parts = ", ".join(f"{component} {format_bytes(size)}" for component, size in {**estimate, **offloaded}.items())
    raise DoesNotFit(
        f"the models need at least {format_bytes(total)} per rank before any activation ({parts}), more than "
        f"{where}. What would fit: {advice}"
    )


def ppo_generation(module) -> Generation | None:
    """PPO's rollout as ``Generation``: the DataModule's prompts per batch × ``num_generations`` rows of its
    ``max_length`` + ``max_new_tokens`` tokens, the policy's attention shape, in the compute dtype."""
    from lightning_rlhf.models.lora import unwrap

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
