"""Run by tests/test_sharded_loading.py: every stage's models loaded under FSDP2 (``ModelParallelStrategy``, sharded
loading: rank 0 reads, the others build on the meta device and receive their shards), compared on every rank with
the same stage loaded whole in that process (``configure_model`` with no strategy) from the same RNG state.

    python tests/sharded_load_script.py OUT.json ROOT_DIR SFT_EXPORT REWARD_MODEL_EXPORT COMPARISONS.jsonl

Rank 0 writes, per stage and per rank: whether the gathered full state dict of each model equals the whole one (bit
for bit), whether tied embeddings are still one parameter, whether every buffer (RoPE's float32 ``inv_freq``
included) equals the whole one, whether config and generation config are the same, and whether the RNG state after
``configure_model`` is the one loading whole leaves.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_rlhf import (
    ComparisonDataModule,
    DemonstrationDataModule,
    DPOModule,
    PPOModule,
    PromptDataModule,
    RewardModule,
    SFTModule,
)
from lightning_rlhf.models.lora import unwrap
from lightning_rlhf.training.strategies import has_tied_embeddings
from tests.helpers import finish

MODELS = ("model", "ref_model", "reward_model", "value_model", "value_head")


class Probe(L.Callback):
    """Records the RNG state around ``configure_model`` and compares each model with the whole load at fit start."""

    def __init__(self, build):
        self.build, self.report = build, {}

    def setup(self, trainer, module, stage):
        configure = module.configure_model

        def recorded():
            self.rng_before = torch.get_rng_state()
            configure()
            self.rng_after = torch.get_rng_state()

        module.configure_model = recorded

    def on_fit_start(self, trainer, module):
        whole, _ = self.build()
        torch.set_rng_state(self.rng_before)
        whole.configure_model()
        report = {"rng": torch.equal(torch.get_rng_state(), self.rng_after)}
        for name in MODELS:
            sharded, alone = getattr(module, name, None), getattr(whole, name, None)
            if sharded is None:
                continue
            gathered = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
            expected = alone.state_dict()
            buffers = dict(alone.named_buffers())
            inner, inner_alone = unwrap(sharded), unwrap(alone)
            report[name] = {
                "weights": gathered.keys() == expected.keys()
                and all(torch.equal(gathered[k].cpu(), v) for k, v in expected.items()),
                "buffers": all(torch.equal(b.cpu(), buffers[n]) for n, b in sharded.named_buffers()),
                "tied": has_tied_embeddings(inner) == has_tied_embeddings(inner_alone),
                "config": getattr(inner, "config", None) == getattr(inner_alone, "config", None)
                or inner.config.to_dict() == inner_alone.config.to_dict(),
                "generation_config": str(getattr(inner, "generation_config", None))
                == str(getattr(inner_alone, "generation_config", None)),
            }
        self.report = report
        trainer.should_stop = True  # loading is what is tested: no step


def main(out_path: str, root: str, sft_dir: str, rm_dir: str, comparisons: str) -> None:
    def prompts():
        return PromptDataModule(tokenizer_name_or_path=sft_dir, batch_size=2, max_length=32, val_fraction=0.0)

    def pairs():
        return ComparisonDataModule(
            train_path=comparisons, tokenizer_name_or_path=sft_dir, batch_size=2, val_fraction=0.0
        )

    demonstrations = DemonstrationDataModule(tokenizer_name_or_path=sft_dir, batch_size=2, val_fraction=0.0)
    lora = {"r": 4, "alpha": 8}
    stages = {
        "sft": lambda: (SFTModule(sft_dir), demonstrations),
        "sft_lora": lambda: (SFTModule(sft_dir, lora=lora), demonstrations),
        # A fresh head drawn from the RNG, and an added special token's embedding row.
        "rm": lambda: (RewardModule(sft_dir, reward_token="<|reward|>"), pairs()),
        "dpo": lambda: (DPOModule(sft_dir), pairs()),
        # Policy, reference, reward model, and a value model started from the SFT export (a fresh head).
        "ppo": lambda: (PPOModule(sft_dir, reward_model_name_or_path=rm_dir, max_new_tokens=4), prompts()),
        "ppo_value_head": lambda: (PPOModule(sft_dir, rm_dir, max_new_tokens=4, value_head=True), prompts()),
        "ppo_lora_fresh_value": lambda: (
            PPOModule(sft_dir, reward_fn="tests.test_ppo.share_of_a", max_new_tokens=4, lora=lora),
            prompts(),
        ),
    }
    report = {}
    for stage, build in stages.items():
        L.seed_everything(0)
        module, data = build()
        probe = Probe(build)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            limit_val_batches=0,
            callbacks=[probe],
        )
        trainer.fit(module, data)
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, probe.report)
        report[stage] = ranks
    finish(trainer, out_path, report)


if __name__ == "__main__":
    main(*sys.argv[1:])
