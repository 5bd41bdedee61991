"""Samplers: logits → processed distribution → token."""

from dspark.samplers.base import SAMPLERS, Sampler, SamplerConfig, register_sampler, sample_from
from dspark.samplers.default import DefaultSampler

__all__ = ["SAMPLERS", "DefaultSampler", "Sampler", "SamplerConfig", "register_sampler", "sample_from"]
