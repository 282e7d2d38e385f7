"""Run by tests/test_vllm.py: GRPO with rollouts on vLLM fitted with DDP on 2 CPU processes, every rank its own
colocated engine (vLLM's ``external_launcher`` inside the trainer's process group).

    python tests/ddp_vllm_script.py OUT.json ROOT_DIR SFT_EXPORT [ddp|fsdp2]

Under ``fsdp2`` (``ModelParallelStrategy``) the policy is sharded: the engine is loaded one gathered parameter at a
time.

Rank 0 writes, for every rank: its policy's weight checksum after the run, whether its engine, synced, decodes
greedily exactly what its policy's ``generate`` decodes, and the first prompt it met (ranks sample their own prompts).
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.rl.engines import HFEngine, named_weights
from tests.helpers import finish
from tests.test_ppo import prompts_batch

STRATEGIES = {
    "ddp": lambda: "ddp",
    "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
}


class RecordingPPO(PPOModule):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.first_prompt = batch["input_ids"][0].float().sum()
        return super().training_step(batch, batch_idx)


def main(out_path: str, root: str, sft_dir: str, strategy: str = "ddp") -> None:
    L.seed_everything(0)
    module = RecordingPPO(
        sft_dir,
        reward_fn="tests.test_ppo.share_of_a",
        advantage_estimator="grpo",
        num_generations=2,
        max_new_tokens=6,
        ppo_epochs=1,
        num_mini_batches=1,
        rollout_engine="vllm",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    data = PromptDataModule(tokenizer_name_or_path=sft_dir, batch_size=2, max_length=32, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=STRATEGIES[strategy](),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
    )
    trainer.fit(module, data)

    batch = prompts_batch(["Reverse: abc\n", "Reverse: hello\n"])
    module.engine.sync(module.model)
    engine = module.engine.generate(module.model, module.tokenizer, batch["input_ids"], batch["attention_mask"], 8, 0.0)
    greedy = HFEngine().generate(
        module.model,
        module.tokenizer,
        batch["input_ids"],
        batch["attention_mask"],
        8,
        0.0,
        synced_gpus=strategy == "fsdp2",
    )

    def gathered(value: float) -> list[float]:
        return module.all_gather(torch.tensor([value], dtype=torch.float64)).flatten().tolist()

    report = {
        "world_size": trainer.world_size,
        "policy_checksums": gathered(sum(w.double().sum().item() for _, w in named_weights(module.model))),
        "engine_equals_policy": gathered(float(torch.equal(engine.sequences, greedy.sequences))),
        "first_prompts": gathered(float(module.first_prompt)),
    }
    finish(trainer, out_path, report)  # vLLM's exit-time shutdown then prints "Invalid process group" (harmless)


if __name__ == "__main__":
    main(*sys.argv[1:])
