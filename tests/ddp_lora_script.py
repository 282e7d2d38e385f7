"""Run by tests/test_distributed.py: every stage with LoRA fitted with DDP (default: on 2 CPU processes), then from the
same start with FSDP2 (``ModelParallelStrategy``), each exporting the merged model and the adapter.

    python tests/ddp_lora_script.py OUT.json ROOT_DIR SFT_EXPORT RM_EXPORT COMPARISONS.jsonl DEMONSTRATIONS.jsonl
        [cpu|cuda] [DEVICES]

Writes ROOT_DIR/{sft,rm,dpo,ppo}_{ddp,fsdp2} (3 steps each; PPO 3 rollouts); rank 0 writes, per stage, what every
DDP rank holds: whether its adapters equal rank 0's, whether its frozen base is bit for bit the SFT export's, and how
many exports it wrote; and whether FSDP2 sharded an adapter and a base weight.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, DPOModule, RewardModule, SFTModule
from lightning_rlhf.models import lora
from lightning_rlhf.models.lora import LoraOptions, unwrap
from lightning_rlhf.training import strategies
from tests import ddp_ppo_script
from tests.helpers import finish

EXPORTS = []
export_pretrained = lora.export_pretrained
lora.export_pretrained = lambda *args, **kwargs: EXPORTS.append(args[2]) or export_pretrained(*args, **kwargs)
LORA = LoraOptions(r=4, alpha=8)


def lora_stage(stage: str, sft_dir: str, comparisons: str, demonstrations: str, export: str, batch_size: int):
    """The module and data of ``stage`` (sft, rm or dpo) with rank-4 LoRA: DPO's reference is the adapter-off
    policy; the reward model is normalised on the demonstrations."""

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2)

    def comparison_data(**kwargs):
        return ComparisonDataModule(
            train_path=comparisons,
            tokenizer_name_or_path=sft_dir,
            batch_size=batch_size,
            max_length=48,
            val_fraction=0,
            **kwargs,
        )

    if stage == "sft":
        return (
            SFTModule(sft_dir, lora=LORA, optimizer=adamw, export_dir=export),
            DemonstrationDataModule(
                train_path=demonstrations,
                tokenizer_name_or_path=sft_dir,
                batch_size=batch_size,
                max_length=48,
                val_fraction=0,
            ),
        )
    if stage == "rm":
        return (
            RewardModule(sft_dir, lora=LORA, optimizer=adamw, export_dir=export),
            comparison_data(normalize_path=demonstrations),
        )
    return DPOModule(sft_dir, lora=LORA, optimizer=adamw, export_dir=export), comparison_data()


def fit(module, data, root: str, accelerator: str, devices: int, strategy) -> L.Trainer:
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    return trainer


def ddp_report(module, start: dict[str, torch.Tensor]) -> dict[str, list]:
    """What each DDP rank holds after a LoRA fit, gathered."""
    adapters = torch.cat([p.detach().flatten() for n, p in module.model.named_parameters() if "lora_" in n])
    gathered = module.all_gather(adapters)  # [world, n]
    frozen = {
        n.replace(".base_layer", ""): p for n, p in unwrap(module.model).named_parameters() if not p.requires_grad
    }
    # Every SFT weight but a reward model's missing lm_head; its new head's frozen original is not in the SFT export.
    checked = [n for n in frozen if n in start]
    base_unchanged = len(checked) >= len(start) - 1 and all(torch.equal(frozen[n], start[n]) for n in checked)
    return {
        "adapters_equal_rank0": [bool(torch.equal(row, gathered[0])) for row in gathered],
        "base_unchanged": module.all_gather(torch.tensor(base_unchanged)).flatten().tolist(),
        "exports": module.all_gather(torch.tensor(len(EXPORTS))).flatten().tolist(),
    }


def fsdp2_sharded(module) -> list[bool]:
    """Whether an adapter and a base weight of the first block are DTensor shards smaller than the whole."""
    names = ("layers.0.self_attn.q_proj.lora_A.default.weight", "layers.0.self_attn.q_proj.base_layer.weight")
    shards = [p for name, p in module.model.named_parameters() if name.endswith(names)]
    return [isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in shards]


def sharding_around_generation(module) -> list[bool]:
    """Whether a block's base weight is a DTensor shard during two forwards inside ``strategies.gathered`` (as in
    PPO's generation) and after it."""
    weight = lambda: unwrap(module.model).model.layers[0].mlp.up_proj.base_layer.weight  # noqa: E731
    ids = torch.tensor([[5, 6, 7]], device=module.device)
    with strategies.gathered(module.model), torch.no_grad():
        module.model(ids)
        module.model(ids)
        inside = isinstance(weight(), DTensor)
    return [inside, isinstance(weight(), DTensor)]


def main(
    out_path: str,
    root: str,
    sft_dir: str,
    rm_dir: str,
    comparisons: str,
    demonstrations: str,
    accelerator: str = "cpu",
    devices: str = "2",
) -> None:
    start = load_file(f"{sft_dir}/model.safetensors")
    n = int(devices)

    def fsdp2():
        return ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1)

    report = {}
    for stage in ("sft", "rm", "dpo"):
        L.seed_everything(0)
        EXPORTS.clear()
        module, data = lora_stage(stage, sft_dir, comparisons, demonstrations, f"{root}/{stage}_ddp", batch_size=4)
        trainer = fit(module, data, root, accelerator, n, "ddp")
        report[stage] = ddp_report(module, start)
        L.seed_everything(0)
        module, data = lora_stage(stage, sft_dir, comparisons, demonstrations, f"{root}/{stage}_fsdp2", batch_size=4)
        fit(module, data, root, accelerator, n, fsdp2())
        report[stage]["fsdp2_sharded"] = fsdp2_sharded(module)

    # PPO: generation through the transformers model inside the PeftModel, the reference with the adapter off.
    EXPORTS.clear()
    _, module = ddp_ppo_script.fit("ddp", root, sft_dir, rm_dir, "ppo_ddp", accelerator, n, lora=LORA)
    report["ppo"] = ddp_report(module, start)
    _, module = ddp_ppo_script.fit(fsdp2(), root, sft_dir, rm_dir, "ppo_fsdp2", accelerator, n, lora=LORA)
    report["ppo"]["fsdp2_sharded"] = fsdp2_sharded(module)
    report["ppo"]["sharded_inside_outside_gathered"] = sharding_around_generation(module)
    finish(trainer, out_path, {**report, "world_size": trainer.world_size})


if __name__ == "__main__":
    main(*sys.argv[1:])
