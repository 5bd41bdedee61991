"""Config composition: sections, component schemas, overrides, clear errors."""

from dataclasses import dataclass

import pytest
import torch

import dspark
from dspark.cache.static import StaticKVCache
from dspark.config import ConfigError, load_config
from dspark.drafters import Drafter, DrafterConfig, register_drafter
from dspark.samplers.default import DefaultSampler
from dspark.scheduling.schedulers import FixedScheduler
from dspark.verifiers.chain import ChainVerifier
from dspark.records import DraftProposal
from dspark.registry import UnknownComponentError


def test_defaults_and_bare_name_sections():
    cfg = load_config({"drafter": "none", "verifier": "greedy"})
    assert cfg.drafter.name == "none" and cfg.drafter.num_speculative_tokens == 0
    assert cfg.verifier.name == "greedy" and cfg.sampler.name == "default" and cfg.cache.name == "static"
    assert cfg.engine.max_batch_size == 64 and cfg.target.trust_remote_code is False


def test_repo_config_by_name_and_dotlist_override():
    cfg = load_config("ar", ["engine.max_batch_size=4", "target.dtype=float64"])
    assert cfg.engine.max_batch_size == 4 and cfg.target.dtype == "float64"
    assert cfg.target.name == "dspark-tiny" and cfg.target.random is None


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key drafter.num_speculatve_tokens .* allowed keys: name, _target_, num_speculative_tokens"):
        load_config({"drafter": {"name": "none", "num_speculatve_tokens": 0}})
    with pytest.raises(ConfigError, match=r"unknown key engine.max_batchsize"):
        load_config(None, ["engine.max_batchsize=3"])


def test_overrides_given_as_one_string_are_refused():
    from dspark.bench import load_bench_config

    with pytest.raises(ConfigError, match=r"overrides must be a list of section.key=value strings, got one string "
                                          r"'engine.max_batch_size=2': write \['engine.max_batch_size=2'\]"):
        load_config("ar", "engine.max_batch_size=2")
    with pytest.raises(ConfigError, match="overrides must be a list"):
        load_bench_config(None, "repeats=2")


def test_unknown_section_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['drafer'\]; allowed sections: target, drafter"):
        load_config({"drafer": "none"})


def test_unknown_component_lists_registered():
    with pytest.raises(UnknownComponentError, match=r"unknown drafter 'eagle9'; registered drafters: .*none"):
        load_config({"drafter": "eagle9"})
    with pytest.raises(UnknownComponentError, match=r"registered verifiers: (.*, )?chain, greedy"):
        load_config({"verifier": {"name": "tree"}})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="engine"):
        load_config(None, ["engine.max_batch_size=lots"])


def test_bad_engine_values_are_errors():
    from dspark.config import section_object

    with pytest.raises(ValueError, match="engine.max_batch_size must be >= 1"):
        section_object(load_config(None, ["engine.max_batch_size=0"]), "engine")


@dataclass
class EchoConfig(DrafterConfig):
    name: str = "echo_test"
    repeat_token: int = 7


@register_drafter("echo_test")
class EchoDrafter(Drafter):
    """Test drafter: proposes ``repeat_token`` γ times."""

    config_class = EchoConfig

    def propose(self, state, uniforms):
        tokens = torch.full((state.batch_size, self.gamma), self.config.repeat_token, device=state.tokens.device)
        return DraftProposal(tokens=tokens, num_tokens=torch.full((state.batch_size,), self.gamma))


class CountingScheduler(FixedScheduler):
    """Test scheduler: the fixed one, counting its calls (a user's subclass picked by ``_target_``)."""

    def schedule(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return super().schedule(*args, **kwargs)


class PlainVerifier(ChainVerifier):
    pass


class PlainSampler(DefaultSampler):
    pass


class PlainCache(StaticKVCache):
    pass


def test_every_component_section_takes_a_user_subclass_by_target():
    """The errors for an unknown name point to ``_target_`` for every kind: each section takes it."""
    from helpers import tiny_hf_model

    targets = {"scheduler": "test_config.CountingScheduler", "verifier": "test_config.PlainVerifier",
               "sampler": "test_config.PlainSampler", "cache": "test_config.PlainCache"}
    cfg = load_config({"drafter": {"name": "ngram", "num_speculative_tokens": 2}, "target": {"device": "cpu"},
                       **{section: {"_target_": path} for section, path in targets.items()}})
    assert {section: cfg[section]._target_ for section in targets} == targets
    pipe = dspark.build_pipeline(cfg, target_model=tiny_hf_model("llama", scale=2.0))
    assert type(pipe.engine.scheduler) is CountingScheduler and type(pipe.engine.verifier) is PlainVerifier
    assert type(pipe.engine.sampler) is PlainSampler and pipe.engine.cache_class is PlainCache
    pipe.generate([[1, 2, 3, 1, 2]], max_new_tokens=6)
    assert pipe.engine.scheduler.calls > 0


def test_component_schema_comes_from_the_named_class():
    cfg = load_config({"drafter": {"name": "echo_test", "num_speculative_tokens": 2, "repeat_token": 3}})
    assert cfg.drafter.repeat_token == 3
    with pytest.raises(ConfigError, match=r"unknown key drafter.repeat for EchoConfig"):
        load_config({"drafter": {"name": "echo_test", "repeat": 3}})


def test_target_path_selects_a_user_subclass():
    cfg = load_config({"drafter": {"_target_": "test_config.EchoDrafter", "num_speculative_tokens": 1}})
    assert cfg.drafter._target_ == "test_config.EchoDrafter" and cfg.drafter.repeat_token == 7
    with pytest.raises(TypeError, match="is not a subclass of Drafter"):
        load_config({"drafter": {"_target_": "test_config.EchoConfig"}})
    with pytest.raises(ImportError, match="cannot import module 'no_such_module'"):
        load_config({"drafter": {"_target_": "no_such_module.Thing"}})


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_drafter("none")(EchoDrafter)
    with pytest.raises(TypeError, match="needs a subclass of Drafter"):
        register_drafter("not_a_drafter")(EchoConfig)


def test_an_override_that_switches_a_component_starts_from_its_defaults():
    """``drafter.name=ngram`` over a draft-model config: the file's draft-model keys (``path``, its
    γ) are dropped, the other overrides of the section apply; the same name keeps them; a key the
    new component lacks, given with the switch, is still an error."""
    cfg = load_config("draft_model", ["drafter.name=ngram", "drafter.max_n=2"])
    assert cfg.drafter.name == "ngram" and cfg.drafter.max_n == 2 and "path" not in cfg.drafter
    assert cfg.drafter.num_speculative_tokens == load_config({"drafter": "ngram"}).drafter.num_speculative_tokens
    assert load_config("draft_model", ["drafter.name=early_exit"]).drafter.exit_layer is None
    for kept in (["drafter.num_speculative_tokens=5"], ["drafter.name=draft_model", "drafter.num_speculative_tokens=5"]):
        cfg = load_config("draft_model", kept)
        assert cfg.drafter.path == "dspark-tiny-draft" and cfg.drafter.num_speculative_tokens == 5
    with pytest.raises(ConfigError, match=r"unknown key drafter.path for NgramConfig"):
        load_config("draft_model", ["drafter.name=ngram", "drafter.path=elsewhere"])
    cfg = load_config({"drafter": {"name": "echo_test", "repeat_token": 3}}, ["drafter._target_=test_config.EchoDrafter"])
    assert cfg.drafter.repeat_token == 7  # a _target_ is another component too
    assert load_config({"drafter": "none"}, ["drafter.name=ngram"]).drafter.name == "ngram"  # a bare name
    assert load_config({"verifier": "chain"}, ["engine.max_batch_size=2"]).verifier.name == "chain"  # untouched


def test_an_override_of_a_key_keeps_a_section_written_as_a_bare_name():
    """``drafter: ngram`` then ``drafter.num_speculative_tokens=6``: still the n-gram drafter (the
    override used to replace the bare name, leaving the default ``none`` drafter with γ = 6)."""
    cfg = load_config({"drafter": "ngram", "verifier": "chain"}, ["drafter.num_speculative_tokens=6", "drafter.max_n=2"])
    assert (cfg.drafter.name, cfg.drafter.num_speculative_tokens, cfg.drafter.max_n) == ("ngram", 6, 2)
    assert load_config("ar", ["drafter.num_speculative_tokens=0"]).drafter.name == "none"  # configs/ar.yaml: drafter: none
    assert load_config({"drafter": "ngram"}, ["drafter=none"]).drafter.name == "none"  # a bare name over a bare name


@pytest.mark.parametrize("overrides", [["drafter=ngram", "drafter.max_n=5"], ["drafter.max_n=5", "drafter=ngram"]])
def test_a_component_switched_by_name_and_a_key_override_of_it_both_apply(overrides):
    """``drafter=ngram`` with ``drafter.max_n=5``, in either order, over a draft-model config: the
    n-gram drafter with max_n 5 (one of the two used to be silently dropped — the bench's own
    γ override once turned an ``ngram`` pipeline back into the config's draft model)."""
    cfg = load_config("draft_model", [*overrides, "drafter.num_speculative_tokens=3"])
    assert (cfg.drafter.name, cfg.drafter.max_n, cfg.drafter.num_speculative_tokens) == ("ngram", 5, 3)


def test_a_non_pipeline_config_is_found_from_any_directory(tmp_path, monkeypatch):
    """``dspark bench --config configs/bench/default.yaml`` (or ``bench/default``) from outside the
    repository reads the shipped file; a missing one is named, with where it was looked for."""
    from dspark.bench import load_bench_config

    monkeypatch.chdir(tmp_path)
    for name in ("configs/bench/default.yaml", "bench/default.yaml", "bench/default"):
        assert [p.label for p in load_bench_config(name).pipelines] == ["none", "ngram", "draft_model"]
    with pytest.raises(FileNotFoundError, match=r"config file 'bench/nope' not found \(searched also: .*configs"):
        load_bench_config("bench/nope")
    for name in ("configs/ar.yaml", "ar.yaml", "ar"):  # pipeline configs alike
        assert load_config(name).drafter.name == "none"
