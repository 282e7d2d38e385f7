"""The per-rank memory estimate (``lightning_rlhf.training.memory``): components worked out by hand, the options it
offers, and the refusal of a run that cannot fit before its first step."""

import logging

import lightning as L
import pytest
import torch
from torch import nn

from lightning_rlhf import DemonstrationDataModule, SFTModule
from lightning_rlhf.training import memory
from lightning_rlhf.training.memory import (
    Generation,
    Layout,
    ModelCount,
    count_model,
    estimate_memory,
    fit_options,
    offloaded_memory,
)

# A float32 policy (1,000 parameters, all trained), its frozen float32 reference, a bf16 value model (500, trained).
MODELS = [
    ModelCount("policy", 1000, 1000, 4),
    ModelCount("reference", 1000, 0, 4),
    ModelCount("value model", 500, 500, 2),
]
# 4 rows of 10 tokens, 2 layers × 2 KV heads × 8 dims, bf16; the policy gathered in bf16.
GENERATION = Generation(rows=4, tokens=10, layers=2, kv_heads=2, head_dim=8, bytes_per_value=2, policy_parameters=1000)


def test_estimate_memory_counts_each_component_by_hand():
    """Over 2 shards: policy 1000·4/2 = 2000, reference 2000, value 500·2/2 = 500; trainable bytes
    (1000·4 + 500·2)/2 = 2500 → gradients 2500, AdamW (two moments) 5000; KV cache 2·2·2·8·4·10·2 = 5120; the policy
    gathered in bf16 1000·2 = 2000. Total 19,120. Replicated (DDP, 2 ranks): no division, no gather: 4000 + 4000 +
    1000 + 5000 + 10000 + 5120 = 29,120. A frozen model alone: its parameters only.

    Mutations caught: AdamW counted once (one moment) or not sharded; K and V not both counted; the gathered policy
    counted when replicated; frozen parameters given gradients."""
    assert estimate_memory(MODELS, Layout(ranks=2, sharded=True), GENERATION) == {
        "policy parameters": 2000,
        "reference parameters": 2000,
        "value model parameters": 500,
        "gradients": 2500,
        "AdamW state": 5000,
        "generation KV cache": 5120,
        "policy gathered for generation": 2000,
    }
    replicated = estimate_memory(MODELS, Layout(ranks=2, sharded=False), GENERATION)
    assert sum(replicated.values()) == 29120
    assert "policy gathered for generation" not in replicated
    assert estimate_memory([ModelCount("reference", 1000, 0, 4)], Layout()) == {"reference parameters": 4000}


def test_fit_options_lists_only_the_changes_that_fit_alone():
    """Against the 19,120 above: LoRA (no trainable state) 2000 + 2000 + 500 + 5120 + 2000 = 11,620; bf16 storage
    1000 + 1000 + 500 + 1500 + 3000 + 5120 + 2000 = 14,120; 8 ranks 500 + 500 + 125 + 625 + 1250 + 5120 + 2000 =
    10,120; a quarter of the rows (1 row: KV 1,280) 15,280. Capacity 10,200: 8 ranks alone; 12,000: LoRA too;
    10,000: nothing.

    Mutation caught: an option offered whatever its total, or its total computed on the unchanged run."""
    layout = Layout(ranks=2, sharded=True)

    def offered(capacity: int) -> list[tuple[str, int]]:
        return [(name.split()[0], total) for name, total in fit_options(MODELS, layout, GENERATION, capacity)]

    assert offered(10200) == [("ModelParallelStrategy", 10120)]
    assert offered(12000) == [("lora", 11620), ("ModelParallelStrategy", 10120)]
    assert offered(10000) == []
    assert offered(15280) == [("lora", 11620), ("dtype:", 14120), ("ModelParallelStrategy", 10120), ("a", 15280)]


def test_cpu_offload_moves_parameters_gradients_and_adamw_state_to_the_host():
    """The 2-shard run above with FSDP2's CPU offload: the device keeps the KV cache 5120 and the policy gathered for
    generation 2000 (7,120); the host holds per rank what the device held, policy 2000 + reference 2000 + value 500 +
    gradients 2500 + AdamW 5000 = 12,000. Without offload the host holds none of it.

    Mutations caught: the model state counted on both (device 19,120); gradients or AdamW state left on the device;
    the gathered policy dropped with offload (FSDP2 gathers it onto the device all the same)."""
    offloaded = Layout(ranks=2, sharded=True, offload=True)
    assert estimate_memory(MODELS, offloaded, GENERATION) == {
        "generation KV cache": 5120,
        "policy gathered for generation": 2000,
    }
    assert offloaded_memory(MODELS, offloaded) == {
        "policy parameters": 2000,
        "reference parameters": 2000,
        "value model parameters": 500,
        "gradients": 2500,
        "AdamW state": 5000,
    }
    assert offloaded_memory(MODELS, Layout(ranks=2, sharded=True)) == {}


def test_fit_options_offers_cpu_offload_only_where_the_host_holds_it():
    """The 2-shard run (device 19,120) against a device of 8,000: no other option fits alone (LoRA 11,620, bf16
    14,120, 8 ranks 10,120, a quarter of the rows 15,280), offload does (7,120 on the device) when each rank has the
    12,000 it puts on the host: offered with 12,000 free per rank, not with 11,999, nor on a CPU (``None``: offload
    there moves nothing). Replicated (DDP, 2 ranks, device 29,120), offload means FSDP2 over the same 2 ranks: the
    same 7,120 and 12,000.

    Mutations caught: offload offered without checking the host; its total computed without moving the model state."""
    sharded, replicated = Layout(ranks=2, sharded=True), Layout(ranks=2, sharded=False)
    [(name, total)] = fit_options(MODELS, sharded, GENERATION, 8000, host_per_rank=12000)
    assert name.startswith("cpu_offload") and total == 7120
    assert fit_options(MODELS, sharded, GENERATION, 8000, host_per_rank=11999) == []
    assert fit_options(MODELS, sharded, GENERATION, 8000) == []
    assert [total for _, total in fit_options(MODELS, replicated, GENERATION, 8000, host_per_rank=12000)] == [7120]


def test_count_model_counts_whole_trainable_and_storage_bytes():
    """A 4→3 linear (15 parameters) frozen beside a trained 3→2 one (8): 23 parameters, 8 trainable, 4 bytes;
    the same in bf16: 2 bytes. Mutation caught: counting frozen parameters as trainable."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert count_model("m", model) == ModelCount("m", 23, 8, 4)
    assert count_model("m", model.to(torch.bfloat16)).bytes_per_parameter == 2


@pytest.mark.parametrize("refused", [False, True])
def test_a_run_that_cannot_fit_the_host_is_logged_then_refused_before_step_1(
    tiny_model_dir, tmp_path, monkeypatch, caplog, refused
):
    """SFT of the tiny model on 1 CPU process logs its estimate (policy parameters P·4 bytes, gradients P·4, AdamW
    2·P·4: 16·P in all). With the host's memory set to 10·P bytes the run stops before its first step with a
    one-line error naming what fits alone (LoRA 4·P, bf16 8·P, 8 ranks 2·P). Mutation caught: the check after training
    starts (a step runs), or no refusal on the host."""
    module = SFTModule(tiny_model_dir)
    module.configure_model()  # outside a trainer: no estimate, no check
    parameters = sum(p.numel() for p in module.model.parameters())
    monkeypatch.setattr(memory, "host_capacity", lambda: 10 * parameters if refused else 10**12)
    steps = []
    module = SFTModule(tiny_model_dir)
    module.on_train_batch_start = lambda *args: steps.append(1)
    data = DemonstrationDataModule(tokenizer_name_or_path=tiny_model_dir, batch_size=2, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO):
        if refused:
            with pytest.raises(memory.DoesNotFit) as error:
                trainer.fit(module, data)
            message = str(error.value)
            assert "lora" in message and "bfloat16" in message and "8 ranks" in message and "\n" not in message
            assert steps == []
        else:
            trainer.fit(module, data)
            assert steps == [1]
    assert "memory per rank" in caplog.text
    assert f"policy parameters {memory.format_bytes(parameters * 4)}" in " ".join(caplog.text.split())


@pytest.mark.parametrize("host_parameters", [100, 15])
def test_a_run_over_its_gpu_is_offered_cpu_offload_when_the_host_holds_the_model_state(
    tiny_model_dir, tmp_path, monkeypatch, host_parameters
):
    """SFT (16·P bytes: parameters, gradients, AdamW) against a GPU of 10·P bytes (``device_capacity`` stands in for a
    CUDA device on this CPU run): refused before step 1. With a host of 100·P bytes the advice names CPU offload,
    with nothing left on the device (0 bytes) and 16·P on the host; with a host of 15·P it does not (the state would
    not fit there). Mutations caught: offload offered whatever the host holds; the host never consulted."""
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    parameters = sum(p.numel() for p in module.model.parameters())
    monkeypatch.setattr(memory, "device_capacity", lambda device: 10 * parameters)
    monkeypatch.setattr(memory, "host_capacity", lambda: host_parameters * parameters)
    data = DemonstrationDataModule(tokenizer_name_or_path=tiny_model_dir, batch_size=2, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(memory.DoesNotFit) as error:
        trainer.fit(SFTModule(tiny_model_dir), data)
    offload = "cpu_offload (FSDP2Strategy: parameters, gradients, AdamW state on the host, "
    offload += f"{memory.format_bytes(16 * parameters)}/rank) → 0.00 MiB"
    assert (offload in str(error.value)) == (host_parameters == 100), str(error.value)


def test_validation_alone_is_estimated_without_gradients_or_optimiser_state(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """``trainer.validate`` allocates no gradient and no AdamW state: with the host set to 10·P bytes, the 4·P of
    parameters fit and validation runs. Mutation caught: the training state counted whatever the trainer does (16·P:
    refused)."""
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    parameters = sum(p.numel() for p in module.model.parameters())
    monkeypatch.setattr(memory, "host_capacity", lambda: 10 * parameters)
    data = DemonstrationDataModule(tokenizer_name_or_path=tiny_model_dir, batch_size=2, val_fraction=0.1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO):
        trainer.validate(SFTModule(tiny_model_dir), data, verbose=False)
    assert "memory per rank" in caplog.text and "gradients" not in caplog.text
