"""lightning_rlhf: the InstructGPT pipeline (SFT, reward model, PPO, DPO) as PyTorch Lightning modules."""

from lightning_rlhf.data.datamodules import ComparisonDataModule, DemonstrationDataModule, PromptDataModule
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
]
__version__ = "0.1.0"
