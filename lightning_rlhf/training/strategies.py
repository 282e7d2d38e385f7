"""What the stage modules need from Lightning's sharding strategies (the sharding itself is Lightning's)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric


def clip_gradients(
    module: L.LightningModule, optimizer: Optimizer, clip_val: float | None, algorithm: str | None
) -> None:
    """Gradient clipping that also works under ``FSDPStrategy``.

    FSDP's precision plugin refuses norm clipping, because the norm must be reduced over the shards: the root
    FSDP module's ``clip_grad_norm_`` does that. Every other strategy uses Lightning's own clipping.
    """
    if not clip_val:
        return
    if isinstance(module.trainer.strategy, FSDPStrategy) and algorithm in (None, "norm"):
        module.trainer.strategy.model.clip_grad_norm_(clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)


def has_tied_embeddings(model: nn.Module) -> bool:
    """Whether the model's unembedding (``lm_head``) shares its weight with the input embedding."""
    get_output, get_input = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    output = get_output() if get_output is not None else None
    return output is not None and get_input is not None and output.weight is get_input().weight


def mixed_precision_policy(precision: str):
    """FSDP2's mixed precision for a Lightning ``precision`` flag: with ``bf16-mixed`` (``16-mixed``) the parameters,
    gradients and optimiser state stay in the model's dtype (float32 master weights) while each unit is gathered and
    computed in bf16 (fp16), and gradients are reduced in float32. Pure-bf16 weights barely move at RLHF learning
    rates: an AdamW step smaller than a weight's bf16 spacing rounds away. Other flags: FSDP2's default (no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if compute is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def fully_shard_model(model: nn.Module, mesh, mp_policy=None, offload_policy=None) -> None:
    """FSDP2 (``fully_shard``) for ``ModelParallelStrategy``: each transformer block, the backbone and a scalar head
    are units of their own, then the whole model.

    Backbone and head get their own units because reward and value models call them directly
    (``reward.sequence_rewards``), bypassing the root module's forward that would gather its parameters.
    A causal LM whose ``lm_head`` is tied to the embedding (Llama-3.2 1B/3B, small Qwen2.5, Gemma) keeps its
    backbone in the root unit: one parameter cannot belong to two units, and a causal LM is only called whole.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from lightning_rlhf.models.lora import unwrap

    offload = offload_policy or OffloadPolicy()  # the base class: no offload
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "offload_policy": offload}
    inner = unwrap(model)  # a PeftModel's transformers model
    block_classes = set(getattr(inner, "_no_split_modules", None) or [])
    for module in inner.modules():
        if type(module).__name__ in block_classes:
            fully_shard(module, **kwargs)
    if getattr(inner, "base_model", inner) is not inner and not has_tied_embeddings(inner):
        fully_shard(inner.base_model, **kwargs)
    if isinstance(getattr(inner, "score", None), nn.Module):
        fully_shard(inner.score, **kwargs)
    # A PeftModel holds no parameter of its own: the transformers model inside is the root unit, so PPO's generate,
    # which calls it directly, gathers as the PeftModel's forward does.
    fully_shard(inner, **kwargs)


class Rank0Load:
    """Sharded loading for ``configure_model`` under FSDP2 on several ranks: global rank 0 loads each model as on one
    device (``from_pretrained``, streaming the safetensors in the requested dtype; a fresh reward head, LoRA's ``A``
    and the rows ``fit_to_tokenizer`` adds drawn from its RNG as today), while every other rank builds the same
    architecture with ``meta=True`` (parameters on the meta device: nothing read, nothing held). ``fully_shard_models``
    then shards, and ``set_model_state_dict(broadcast_from_rank0=True)`` sends rank 0's weights one tensor at a time,
    each rank keeping its shard. Rank 0 holds one whole copy while loading; the others never do.

    Elsewhere (one process, DDP, FSDP1) ``meta`` is False and every rank loads the whole model as before. FSDP1
    (``FSDPStrategy``) is not done: Lightning wraps the module after ``configure_model`` with
    ``sync_module_states=False`` and no ``param_init_fn`` hook of ours, and FSDP1's flat parameters would need its own
    state-dict path; use ``ModelParallelStrategy`` for models that do not fit one process whole.
    """

    def __init__(self, module: L.LightningModule) -> None:
        import torch.distributed as dist

        mesh = module.device_mesh
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        self.active = mesh is not None and ranks > 1 and mesh["data_parallel"].size() == ranks
        self.meta = self.active and dist.get_rank() != 0
        # Rank 0's loads draw from its RNG (a fresh head, LoRA's A); meta builds draw nothing. ``finish`` hands rank
        # 0's state after the loads to every rank that started where it did, as if each had loaded for itself.
        self.rng_before = torch.get_rng_state()

    def fill(self, model: nn.Module, full_state: dict[str, Tensor], persistent: set[str], device: torch.device) -> None:
        """Fill ``model``, ``fully_shard``-ed, with rank 0's ``full_state`` (``{}`` on the other ranks). Buffers
        outside the state dict (RoPE's ``inv_freq``) come from rank 0 too, then ``keep_float32_buffers`` keeps them."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from lightning_rlhf.models.causal_lm import keep_float32_buffers
        from lightning_rlhf.models.lora import unwrap

        if self.meta:
            model.to_empty(device=device)  # keeps tied weights tied (a load with assign=True would untie them)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        for name, buffer in model.named_buffers():
            if name not in persistent:
                dist.broadcast(buffer, src=0)
        inner = unwrap(model)  # a PeftModel's transformers model
        generation = [getattr(inner, "generation_config", None)]
        dist.broadcast_object_list(generation, src=0)  # what from_pretrained reads beside the weights
        if generation[0] is not None:
            inner.generation_config = generation[0]
        if self.meta:
            keep_float32_buffers(model)

    def finish(self) -> None:
        import torch.distributed as dist

        states = [self.rng_before, torch.get_rng_state()]
        dist.broadcast_object_list(states, src=0)
        if torch.equal(states[0], self.rng_before):
            torch.set_rng_state(states[1])


def fully_shard_models(module: L.LightningModule, *models: nn.Module | None, load: Rank0Load | None = None) -> None:
    """Under ``ModelParallelStrategy`` (``module.device_mesh`` is set): FSDP2 for each model over the data-parallel
    mesh, with the trainer's mixed precision (``mixed_precision_policy``) and, under
    ``FSDP2Strategy(cpu_offload=True)``, every shard on the host (``offload_policy``). Called at the end of
    ``configure_model``; does nothing under other strategies. With ``load`` (a ``Rank0Load`` made before the models
    were loaded) the models of the ranks but the first are empty until rank 0's weights fill their shards here (on
    the host when offloaded)."""
    if module.device_mesh is None:
        return
    mesh = module.device_mesh["data_parallel"]
    strategy = module.trainer.strategy
    policy = mixed_precision_policy(str(module.trainer.precision))
    offload = offload_policy(strategy)
    shard_device = torch.device("cpu") if offload is not None else strategy.root_device
    for model in models:
        if model is None:
            continue
        full_state = model.state_dict()  # on rank 0 its weights (not copies), kept whole until its shards are filled
        persistent = set(full_state)
        fully_shard_model(model, mesh, policy, offload)
        if load is not None and load.active:
            load.fill(model, full_state if not load.meta else {}, persistent, shard_device)
        del full_state
    if load is not None and load.active:
        load.finish()


def offload_policy(strategy):
    """FSDP2's ``CPUOffloadPolicy`` when ``strategy`` is an ``FSDP2Strategy(cpu_offload=True)``, else ``None``. Host
    memory is pinned for the copies to a GPU; on a CPU there is nothing to pin (torch refuses without an accelerator)
    and the policy changes nothing but where FSDP2 says the shards live."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if not getattr(strategy, "cpu_offload", False):
        return None
    return CPUOffloadPolicy(pin_memory=strategy.root_device.type == "cuda")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (every argument of it) with one more: ``cpu_offload``.

    Args:
        cpu_offload: keep every model's parameter shards, their gradients and the optimiser's state in host memory
            (FSDP2's ``CPUOffloadPolicy``, applied by ``fully_shard_models`` to every model each stage shards:
            policy, reference, reward and value models). Each unit's shards are copied to the GPU for its forward and
            backward and its reduced gradient copied back; AdamW steps on the CPU. The GPU then holds the units in
            use, activations, logits and PPO's generation (KV cache, gathered policy) only. It costs two copies per
            unit per step over PCIe and a CPU optimiser step, and host memory of ``memory.offloaded_memory`` per rank.

    Why a strategy argument, not a module's: placing the model is the strategy's job, and Lightning's own
    ``ModelParallelStrategy.model_to_device`` moves every parameter to the GPU after ``configure_model``, which FSDP2
    refuses for offloaded shards at the first forward ("FSDP parameters should be materialized on CPU") after a
    transient copy of every shard on the GPU, which is what offload must avoid. Here ``model_to_device`` moves
    everything else (buffers such as RoPE's ``inv_freq``, metric states) and leaves the shards (``DTensor``
    parameters) on the host, so the optimiser Lightning builds next is built over host parameters. Lightning's FSDP1
    ``FSDPStrategy`` has an argument of the same name. Offloaded gradients are reduced for clipping, and ``Rank0Load``
    broadcasts into host shards, as CPU tensors: on CUDA the process group is ``cpu:gloo,cuda:nccl`` unless
    ``process_group_backend`` names another.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        cpu_offload: bool = False,
    ) -> None:
        super().__init__(
            data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout
        )
        self.cpu_offload = cpu_offload

    def _get_process_group_backend(self) -> str:
        if self.cpu_offload and self._process_group_backend is None and self.root_device.type == "cuda":
            return "cpu:gloo,cuda:nccl"
        return super()._get_process_group_backend()

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        from lightning.fabric.utilities.device_dtype_mixin import _update_properties
        from torch.distributed.tensor import DTensor

        shards = [p for p in self.model.parameters() if isinstance(p, DTensor)]
        if not shards:
            raise ValueError(
                "FSDP2Strategy(cpu_offload=True) found no fully_shard-ed parameter after configure_model: offload is "
                "FSDP2's, so configure_model must shard the models (lightning_rlhf.training.strategies."
                "fully_shard_models, as every stage module does); or set cpu_offload: false"
            )
        device = self.root_device
        self.model._apply(lambda tensor: tensor if isinstance(tensor, DTensor) else tensor.to(device))
        _update_properties(self.model, device=device)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint the activations of every decoder block of a transformers model (each stage's
    ``gradient_checkpointing``, for every model it trains): a block keeps only its input, and its forward runs again
    in backward. transformers' non-reentrant ``torch.utils.checkpoint`` around each block, so the recomputation gets
    the same arguments (attention mask, position ids, RoPE's cos/sin; ``tests/test_activation_checkpointing.py``) and
    LoRA's frozen embeddings need no gradient at their output.

    Called before ``fully_shard`` (the order does not matter to transformers' per-block flag). transformers 5.x
    checkpoints a block's ``forward``, inside the module's hooks: FSDP2's gather and reshard hooks run once per
    forward, and the recomputation runs after the block's pre-backward hook has gathered it for its backward. Older
    releases checkpoint ``__call__``, FSDP2's hooks inside; FSDP2 handles that nesting too (``AC(fully_shard(m))``).
    Under FSDP2, SFT with it matches DDP without it (``tests/sharded_script.py``).
    """
    from lightning_rlhf.models.lora import unwrap

    inner = unwrap(model)
    # Newer transformers name it activation_checkpointing_enable (the old name warns); both take the checkpoint's
    # keyword arguments first.
    enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
    enable({"use_reentrant": False})


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model's parameters gathered across the forwards inside (the decode steps of ``generate``)
    instead of all-gathering every block at every step; reshard on exit. Does nothing to an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    from lightning_rlhf.models.lora import unwrap

    model = unwrap(model)  # a PeftModel's root unit is the transformers model inside
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's own setting for the root
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def reset_float32(metrics: Iterable[Metric]) -> None:
    """Reset torchmetrics states, in float32 whatever the module was cast to.

    ``precision="bf16-true"`` casts the whole LightningModule, metric states included (torchmetrics ignores
    ``.bfloat16()`` but not ``.to(dtype)``): sums of losses and token counts were then kept in bf16, where a count
    stops growing at 2^18 and every addition rounds to 8 significant bits.
    """
    for metric in metrics:
        metric.set_dtype(torch.float32)
        metric.reset()
