"""Run by tests/test_distributed.py: SFT and DPO with LoRA fitted with DDP (default: on 2 CPU processes), each
exporting the merged model and the adapter.

    python tests/ddp_lora_script.py OUT.json ROOT_DIR SFT_EXPORT COMPARISONS.jsonl DEMONSTRATIONS.jsonl [cpu|cuda]
        [DEVICES]

Writes ROOT_DIR/{sft,dpo}_ddp (3 steps each) and, from the same start, ROOT_DIR/{sft,dpo}_fsdp2 with FSDP2
(``ModelParallelStrategy``); rank 0 writes, per stage, what every DDP rank holds: whether its adapters equal rank 0's,
whether its frozen base is bit for bit the SFT export, and how many exports it wrote; and whether FSDP2 sharded an
adapter and a base weight.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, DPOModule, SFTModule, lora
from lightning_rlhf.lora import LoraOptions, unwrap
from tests.helpers import finish

EXPORTS = []
export_pretrained = lora.export_pretrained
lora.export_pretrained = lambda *args, **kwargs: EXPORTS.append(args[2]) or export_pretrained(*args, **kwargs)


def lora_stage(stage: str, sft_dir: str, comparisons: str, demonstrations: str, export: str, batch_size: int):
    """The module and data of ``stage`` with rank-4 LoRA: DPO's reference is the adapter-off policy."""

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2)

    options = LoraOptions(r=4, alpha=8)
    if stage == "sft":
        return (
            SFTModule(sft_dir, lora=options, optimizer=adamw, export_dir=export),
            DemonstrationDataModule(train_path=demonstrations, tokenizer_name_or_path=sft_dir, batch_size=batch_size,
                                    max_length=48, val_fraction=0),
        )  # fmt: skip
    return (
        DPOModule(sft_dir, lora=options, optimizer=adamw, export_dir=export),
        ComparisonDataModule(train_path=comparisons, tokenizer_name_or_path=sft_dir, batch_size=batch_size,
                             max_length=48, val_fraction=0),
    )  # fmt: skip


def fit(module, data, root: str, accelerator: str, devices: int, strategy) -> L.Trainer:
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def main(out_path: str, root: str, sft_dir: str, comparisons: str, demonstrations: str, accelerator: str = "cpu",
         devices: str = "2") -> None:  # fmt: skip
    start = load_file(f"{sft_dir}/model.safetensors")
    report = {}
    for stage in ("sft", "dpo"):
        L.seed_everything(0)
        EXPORTS.clear()
        module, data = lora_stage(stage, sft_dir, comparisons, demonstrations, f"{root}/{stage}_ddp", batch_size=4)
        trainer = fit(module, data, root, accelerator, int(devices), "ddp")
        adapters = torch.cat([p.detach().flatten() for n, p in module.model.named_parameters() if "lora_" in n])
        gathered = module.all_gather(adapters)  # [world, n]
        base = unwrap(module.model)
        frozen = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if not p.requires_grad}
        base_unchanged = frozen.keys() == start.keys() and all(torch.equal(p, start[n]) for n, p in frozen.items())
        report[stage] = {
            "adapters_equal_rank0": [bool(torch.equal(row, gathered[0])) for row in gathered],
            "base_unchanged": module.all_gather(torch.tensor(base_unchanged)).flatten().tolist(),
            "exports": module.all_gather(torch.tensor(len(EXPORTS))).flatten().tolist(),
        }
        # FSDP2 from the same start: the gathered export must match DDP's.
        L.seed_everything(0)
        module, data = lora_stage(stage, sft_dir, comparisons, demonstrations, f"{root}/{stage}_fsdp2", batch_size=4)
        n = int(devices)
        fit(module, data, root, accelerator, n, ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1))
        names = ("layers.0.self_attn.q_proj.lora_A.default.weight", "layers.0.self_attn.q_proj.base_layer.weight")
        shards = [p for name, p in module.model.named_parameters() if name.endswith(names)]
        report[stage]["fsdp2_sharded"] = [isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in shards]
    finish(trainer, out_path, {**report, "world_size": trainer.world_size})


if __name__ == "__main__":
    main(*sys.argv[1:])
