
from lightning_rlhf.data.datamodules import ComparisonDataModule, DemonstrationDataModule, PromptDataModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule

__all__ = [
    "ComparisonDataModule",
    "DemonstrationDataModule",
    "PromptDataModule",
    "RewardModule",
    "SFTModule",
]
__version__ = "0.1.0"
