"""Every YAML config in configs/ loads against its schema, and every pipeline config builds and
decodes greedily exactly like plain autoregressive decoding (with the embedded models)."""

from pathlib import Path

import pytest

import dspark
from dspark.bench import load_bench_config
from dspark.data.build import load_data_config
from dspark.training import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_training_configs_load(path):
    cfg = load_train_config(path)
    assert cfg.max_steps >= 1 and cfg.output_dir


@pytest.mark.parametrize("path", sorted((CONFIGS / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_configs_load(path):
    cfg = load_bench_config(path)
    assert any(p.label == "none" for p in cfg.pipelines)
    for spec in cfg.pipelines:  # every pipeline a bench config names exists
        assert spec.config is None or (CONFIGS / f"{spec.config}.yaml").is_file(), spec.config


def test_data_config_loads():
    assert load_data_config(CONFIGS / "data" / "stdlib.yaml")


@pytest.fixture(scope="module")
def autoregressive():
    pipe = dspark.build_pipeline(CONFIGS / "ar.yaml", overrides=["target.device=cpu"])
    return pipe.generate(["def fibonacci(n):", "The module"], max_new_tokens=16, ignore_eos=True).token_ids


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_configs_decode_like_autoregressive(path, autoregressive):
    pipe = dspark.build_pipeline(path, overrides=["target.device=cpu"])
    result = pipe.generate(["def fibonacci(n):", "The module"], max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == autoregressive
