"""Drafters: propose tokens for the target to verify."""

from dspark.drafters.base import DRAFTERS, Drafter, DrafterConfig, register_drafter
from dspark.drafters.none import NoDrafter

__all__ = ["DRAFTERS", "Drafter", "DrafterConfig", "NoDrafter", "register_drafter"]
