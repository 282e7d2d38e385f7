"""lightning_rlhf: the InstructGPT pipeline (SFT, reward model, PPO, DPO) as PyTorch Lightning modules."""

from lightning_rlhf.data.datamodules import ComparisonDataModule, DemonstrationDataModule, PromptDataModule
from lightning_rlhf.modules.sft import SFTModule

__all__ = [
    "ComparisonDataModule",
    "DemonstrationDataModule",
    "PromptDataModule",
    "SFTModule",
]
__version__ = "0.1.0"
