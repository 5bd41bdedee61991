"""Drafters: propose tokens for the target to verify."""

from dspark.drafters.base import DRAFTERS, Drafter, DrafterConfig, register_drafter
from dspark.drafters.draft_model import DraftModelConfig, DraftModelDrafter
from dspark.drafters.dspark import DSparkConfig, DSparkDrafter
from dspark.drafters.early_exit import EarlyExitConfig, EarlyExitDrafter
from dspark.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from dspark.drafters.none import NoDrafter
from dspark.drafters.ngram import NgramConfig, NgramDrafter

__all__ = ["DRAFTERS", "DSparkConfig", "DSparkDrafter", "DraftModelConfig", "DraftModelDrafter", "Drafter", "DrafterConfig", "EarlyExitConfig", "EarlyExitDrafter", "Eagle3Config", "Eagle3Drafter", "NgramConfig", "NgramDrafter", "NoDrafter", "register_drafter"]
