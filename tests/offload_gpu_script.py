"""Run by tests/test_offload.py on a GPU (and by ``scripts/gpu_check.py``): SFT under FSDP2 in bf16 mixed precision,
two steps without and two with CPU offload (``FSDP2Strategy(cpu_offload=True)``) from the same start.

    python tests/offload_gpu_script.py OUT.json ROOT_DIR CHECKPOINT [DEVICES]

For each run, rank 0 writes: the peak GPU memory allocated over the training steps (``torch.cuda`` peak, reset when
training starts with the models placed), the bytes of its model state (parameter shards, gradients, AdamW state) and
where FSDP2 keeps them (``tests.helpers.offloaded_parameters``), the two losses, and the seconds per step. It prints
the JSON too (``scripts/gpu_check.py`` reports the output).
"""

import json
import sys
import time

import lightning as L
import torch

from lightning_rlhf import DemonstrationDataModule, SFTModule
from lightning_rlhf.training.strategies import FSDP2Strategy
from tests.helpers import end_distributed, offloaded_parameters

MIB = 2**20


class Probe(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_start(self, trainer, module):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module):
        from torch.distributed.tensor import DTensor

        torch.cuda.synchronize()
        local = [p.to_local() if isinstance(p, DTensor) else p for p in module.model.parameters()]
        shard_bytes = sum(t.numel() * t.element_size() for t in local)
        self.report = {
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB,
            "model_state_mib": 4 * shard_bytes / MIB,  # parameters, gradients, AdamW's two moments
            "parameter_device": str(local[0].device),
            "offloaded": offloaded_parameters(module)["model"],
            "losses": self.losses,
            "seconds_per_step": (time.perf_counter() - self.start) / max(1, len(self.losses)),
        }


def main(out_path: str, root: str, checkpoint: str, devices: str = "1") -> None:
    n = int(devices)
    report = {"devices": n, "device": torch.cuda.get_device_name()}
    for offload in (False, True):
        L.seed_everything(0)
        probe = Probe()
        trainer = L.Trainer(
            accelerator="gpu",
            devices=n,
            precision="bf16-mixed",
            max_steps=2,
            logger=False,
            strategy=FSDP2Strategy(data_parallel_size=n, tensor_parallel_size=1, cpu_offload=offload),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            limit_val_batches=0,
            callbacks=[probe],
        )
        data = DemonstrationDataModule(tokenizer_name_or_path=checkpoint, batch_size=4, val_fraction=0.0)
        module = SFTModule(checkpoint, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
        trainer.fit(module, data)
        report["offload" if offload else "plain"] = probe.report
    if trainer.is_global_zero:
        with open(out_path, "w") as out:
            json.dump(report, out)
        print(json.dumps(report))
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
