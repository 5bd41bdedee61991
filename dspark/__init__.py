"""dspark: lossless speculative decoding.

    pipe = dspark.build_pipeline("configs/ar.yaml")
    result = pipe.generate(["def fib(n):"], max_new_tokens=64)
"""

from dspark.cache import KVCache, StaticKVCache, register_cache
from dspark.config import load_config
from dspark.drafters import Drafter, DrafterConfig, register_drafter
from dspark.engine import Engine, EngineConfig
from dspark.stats import GenerationStats
from dspark.pipeline import GenerationResult, Pipeline, build_pipeline
from dspark.records import DecodingState, DraftProposal, ModelOutput, SamplingParams, VerificationResult
from dspark.samplers import Sampler, register_sampler
from dspark.session import RequestOutput, RequestUpdate, Session
from dspark.structured import Grammar
from dspark.verifiers import Verifier, register_verifier

__version__ = "0.1.0"

__all__ = [
    "DecodingState", "DraftProposal", "Drafter", "DrafterConfig", "Engine", "EngineConfig", "GenerationResult",
    "GenerationStats", "Grammar", "KVCache", "ModelOutput", "Pipeline", "RequestOutput", "RequestUpdate", "Sampler",
    "SamplingParams", "Session", "StaticKVCache",
    "VerificationResult", "Verifier", "build_pipeline", "load_config", "register_cache", "register_drafter",
    "register_sampler", "register_verifier",
]
