"""Fixtures of the drafter-training tests."""

import pytest

from dspark.data.tokenizer import train_tokenizer
from helpers import CODE, PROSE


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and a tiny Qwen3 target checkpoint trained for a few steps on a tiny corpus."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = train_tokenizer([CODE * 20, PROSE * 20], vocab_size=512)
    tokenizer.save_pretrained(root / "tok")
    from dspark.models import random_hf_model

    target = random_hf_model(dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=True), seed=0)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    return root
