"""Run by tests/test_distributed.py: SFT, reward model and DPO fitted with DDP, then from the same start with FSDP2
(``ModelParallelStrategy``) and with FSDP1 (``FSDPStrategy``), each exporting its model.

    python tests/sharded_script.py ROOT_DIR SFT_EXPORT COMPARISONS.jsonl DEMONSTRATIONS.jsonl [cpu|cuda] [DEVICES]

Writes ROOT_DIR/{sft,rm,dpo}_{ddp,fsdp2,fsdp2_offload,fsdp1}: 3 steps each, gradient norm clipped at 1, the
reward model normalised on the demonstrations; FSDP2's SFT with activation checkpointing; ``fsdp2_offload`` is FSDP2
with ``FSDP2Strategy(cpu_offload=True)``, and ROOT_DIR/offload.json what each stage's models had offloaded
(``tests.helpers.offloaded_parameters``). Defaults: 2 CPU processes (gloo).
"""

import json
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, DPOModule, RewardModule, SFTModule
from lightning_rlhf.training.strategies import FSDP2Strategy
from tests.helpers import end_distributed, offloaded_parameters


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP1 on CPU processes (gloo). Lightning refuses ``FSDPStrategy`` itself with a CPU accelerator, but torch's
    FSDP shards on CPU, which is enough to test what only shows with real shards: the flat parameters outside the
    wrapped blocks exist whole only inside the root module's forward. Lightning passes FSDP no device on CPU, and
    FSDP then looks for an accelerator: this wraps the module as Lightning does, with the CPU as device."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def lightning_module_state_dict(self):
        # Lightning gathers with offload_to_cpu=True, which on CPU shards frees the storage it returns (a segfault).
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
            return self.model.state_dict()


def main(
    root: str, sft_dir: str, comparisons: str, demonstrations: str, accelerator: str = "cpu", devices: str = "2"
) -> None:
    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2)

    stages = {
        # FSDP2's SFT checkpoints each block's activations too: recomputed in backward, the same numbers as DDP's.
        "sft": lambda export: (
            SFTModule(sft_dir, optimizer=adamw, export_dir=export, gradient_checkpointing=export.endswith("fsdp2")),
            DemonstrationDataModule(
                train_path=demonstrations, tokenizer_name_or_path=sft_dir, batch_size=4, max_length=48, val_fraction=0
            ),
        ),
        "rm": lambda export: (
            RewardModule(sft_dir, optimizer=adamw, export_dir=export),
            ComparisonDataModule(
                train_path=comparisons,
                tokenizer_name_or_path=sft_dir,
                batch_size=4,
                max_length=48,
                val_fraction=0,
                normalize_path=demonstrations,
            ),
        ),
        "dpo": lambda export: (
            DPOModule(sft_dir, optimizer=adamw, export_dir=export),
            ComparisonDataModule(
                train_path=comparisons, tokenizer_name_or_path=sft_dir, batch_size=4, max_length=48, val_fraction=0
            ),
        ),
    }
    n = int(devices)
    fsdp1 = CPUFSDPStrategy if accelerator == "cpu" else FSDPStrategy
    strategies = {
        "ddp": lambda: "ddp",
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1),
        "fsdp2_offload": lambda: FSDP2Strategy(data_parallel_size=n, tensor_parallel_size=1, cpu_offload=True),
        "fsdp1": lambda: fsdp1(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full"),
    }
    offload = {}
    for stage, build in stages.items():
        for name, strategy in strategies.items():
            L.seed_everything(0)
            module, data = build(f"{root}/{stage}_{name}")
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=n,
                strategy=strategy(),
                max_steps=3,
                gradient_clip_val=1.0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
                limit_val_batches=0,
            )
            trainer.fit(module, data)
            if name == "fsdp2_offload":
                offload[stage] = offloaded_parameters(module)
    if trainer.is_global_zero:
        with open(f"{root}/offload.json", "w") as out:
            json.dump(offload, out)
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
