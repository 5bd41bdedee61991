"""Target and draft language models: the native Llama/Qwen2/Qwen3 decoder and the transformers adapter."""

from dspark.models.loading import CheckpointError, load_model, random_hf_model, read_checkpoint_tensors
from dspark.models.native import ModelArgs, NativeCausalLM, UnsupportedArchitectureError

__all__ = ["CheckpointError", "ModelArgs", "NativeCausalLM", "UnsupportedArchitectureError", "load_model",
           "random_hf_model", "read_checkpoint_tensors"]
