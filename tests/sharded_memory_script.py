"""Run by tests/test_sharded_loading.py (and by hand for bigger checkpoints): host memory of each rank while SFT loads
a checkpoint under FSDP2 (``ModelParallelStrategy``) on CPU processes.

    python tests/sharded_memory_script.py OUT.json ROOT_DIR CHECKPOINT [DEVICES] [cpu|gpu]

From the ``setup`` hook (before ``configure_model``) to fit start (models loaded, sharded, on their device; the
optimiser built, its AdamW state not yet), each rank measures the seconds, its peak RSS growth (Linux:
``/proc/self/clear_refs`` resets the peak, ``VmHWM`` reads it) and the bytes of its own parameter shards. Rank 0
writes them as JSON, and prints them (``scripts/gpu_check.py`` reports the output).
"""

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_rlhf import DemonstrationDataModule, SFTModule
from tests.helpers import finish

MIB = 2**20


def status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


class MemoryProbe(L.Callback):
    def setup(self, trainer, module, stage):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.rss_before = status_kib("VmRSS")
        self.start = time.perf_counter()

    def on_fit_start(self, trainer, module):
        from torch.distributed.tensor import DTensor

        local = [p.to_local() if isinstance(p, DTensor) else p for p in module.model.parameters()]
        self.report = {
            "load_seconds": round(time.perf_counter() - self.start, 2),
            "peak_growth_mib": (status_kib("VmHWM") - self.rss_before) / 1024,
            "shard_mib": sum(t.numel() * t.element_size() for t in local) / MIB,
        }
        trainer.should_stop = True


def main(out_path: str, root: str, checkpoint: str, devices: str = "2", accelerator: str = "cpu") -> None:
    L.seed_everything(0)
    probe = MemoryProbe()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=int(devices),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        strategy=ModelParallelStrategy(data_parallel_size=int(devices), tensor_parallel_size=1),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
        callbacks=[probe],
    )
    data = DemonstrationDataModule(tokenizer_name_or_path=checkpoint, batch_size=2, val_fraction=0.0)
    trainer.fit(SFTModule(checkpoint), data)
    ranks = [None] * trainer.world_size
    torch.distributed.all_gather_object(ranks, probe.report)
    checkpoint_mib = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors")) / MIB
    report = {"checkpoint_mib": checkpoint_mib, "ranks": ranks}
    if trainer.is_global_zero:
        print("sharded loading:", json.dumps(report))
    finish(trainer, out_path, report)


if __name__ == "__main__":
    main(*sys.argv[1:])
