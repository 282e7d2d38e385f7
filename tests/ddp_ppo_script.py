"""Run by tests/test_distributed.py: PPO fitted with DDP (default: on 2 CPU processes), then again from the same start
with FSDP2 (``ModelParallelStrategy``; the run without a value head with CPU offload,
``FSDP2Strategy(cpu_offload=True)``), adaptive β on.

    python tests/ddp_ppo_script.py OUT.json ROOT_DIR SFT_EXPORT REWARD_MODEL_EXPORT [cpu|cuda] [DEVICES]

Rank 0 writes what every rank held after the DDP run's 3 rollouts (weight checksums, β, the first prompt each rank
met), β after the FSDP2 run and what each of its models had offloaded (``tests.helpers.offloaded_parameters``); both
runs export their policy to ROOT_DIR/ddp and ROOT_DIR/fsdp2, and the same two runs with ``value_head=True`` to
ROOT_DIR/ddp_head and ROOT_DIR/fsdp2_head.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.training import strategies
from tests.helpers import finish, offloaded_parameters


def checksum(model) -> float:
    return sum(p.double().sum().item() for p in model.parameters())


class RecordingPPO(PPOModule):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.first_prompt = batch["input_ids"][0].float().sum()
        return super().training_step(batch, batch_idx)


def sharding_around_generation(module: PPOModule) -> list[bool]:
    """Whether a block's weight is a DTensor shard during two forwards inside ``strategies.gathered`` and after it."""
    from torch.distributed.tensor import DTensor

    weight = lambda: module.model.model.layers[0].mlp.up_proj.weight  # noqa: E731
    ids = torch.tensor([[5, 6, 7]], device=module.device)
    with strategies.gathered(module.model), torch.no_grad():
        module.model(ids)
        module.model(ids)
        inside = isinstance(weight(), DTensor)
    return [inside, isinstance(weight(), DTensor)]


def fit(
    strategy, root: str, sft_dir: str, rm_dir: str, export: str, accelerator: str, devices: int, **kwargs
) -> tuple[L.Trainer, RecordingPPO]:
    L.seed_everything(0)
    module = RecordingPPO(
        sft_dir,
        rm_dir,
        max_new_tokens=6,
        ppo_epochs=1,
        num_mini_batches=2,
        kl_estimator="k3",
        target_kl=0.01,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        export_dir=f"{root}/{export}",
        **kwargs,
    )
    data = PromptDataModule(tokenizer_name_or_path=sft_dir, batch_size=4, max_length=32, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    return trainer, module


def main(out_path: str, root: str, sft_dir: str, rm_dir: str, accelerator: str = "cpu", devices: str = "2") -> None:
    n = int(devices)
    trainer, module = fit("ddp", root, sft_dir, rm_dir, "ddp", accelerator, n)

    def gathered(value: float) -> list[float]:
        return module.all_gather(torch.tensor([value], dtype=torch.float64)).flatten().tolist()

    report = {
        "world_size": trainer.world_size,
        "policy_checksums": gathered(checksum(module.model)),
        "value_checksums": gathered(checksum(module.value_model)),
        "reference_checksums": gathered(checksum(module.ref_model)),
        "kl_coefs": gathered(module.kl_coef),
        "first_prompts": gathered(float(module.first_prompt)),
    }

    def fsdp2():
        return ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1)

    offload = strategies.FSDP2Strategy(data_parallel_size=n, tensor_parallel_size=1, cpu_offload=True)
    _, sharded = fit(offload, root, sft_dir, rm_dir, "fsdp2", accelerator, n)
    report["fsdp2_kl_coefs"] = gathered(sharded.kl_coef)
    report["offloaded"] = offloaded_parameters(sharded)
    report["sharded_inside_outside_gathered"] = sharding_around_generation(sharded)
    # The value function as a head on the policy, both ways.
    fit("ddp", root, sft_dir, rm_dir, "ddp_head", accelerator, n, value_head=True)
    fit(fsdp2(), root, sft_dir, rm_dir, "fsdp2_head", accelerator, n, value_head=True)
    finish(trainer, out_path, report)


if __name__ == "__main__":
    main(*sys.argv[1:])
