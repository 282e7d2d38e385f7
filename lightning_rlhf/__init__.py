"""lightning_rlhf: the InstructGPT pipeline (SFT, reward model, PPO, DPO) as PyTorch Lightning modules.

Every name a user imports is here: the stage modules, the DataModules that feed them, and the loading functions
for models and tokenizers (a local Hugging Face directory, or the embedded default when the path is ``None``).
"""

# ruff: noqa: E402  (the check below runs before the imports after it)
from lightning_rlhf.installation import refuse_mismatched_builds

refuse_mismatched_builds()  # before Lightning imports torchmetrics, which imports a torchvision that cannot load

from lightning_rlhf.data.datamodules import (
    ComparisonDataModule,
    DemonstrationDataModule,
    PromptDataModule,
    UnpairedDataModule,
)
from lightning_rlhf.data.tokenizer import byte_level_tokenizer, load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model, sequence_rewards
from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule

__all__ = [
    "ComparisonDataModule",
    "DemonstrationDataModule",
    "DPOModule",
    "PPOModule",
    "PromptDataModule",
    "RewardModule",
    "SFTModule",
    "UnpairedDataModule",
    "byte_level_tokenizer",
    "export_pretrained",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "sequence_rewards",
]
__version__ = "0.1.0"
