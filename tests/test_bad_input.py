"""Bad input fails with a clear error before any compute."""

import pytest
import torch

import dspark

from helpers import tiny_hf_model


@pytest.fixture(scope="module")
def pipe():
    return dspark.build_pipeline({"target": {"device": "cpu"}, "cache": {"max_len": 32}},
                                 target_model=tiny_hf_model("llama"))


@pytest.fixture
def no_compute(pipe, monkeypatch):
    """Fail the test if the target model runs."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the target ran before the input was validated")
    monkeypatch.setattr(pipe.target, "forward", forbidden)


@pytest.mark.parametrize("prompts, kwargs, error, match", [
    ([[1, 2]], dict(max_new_tokens=0), ValueError, "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], dict(max_new_tokens=2.5), ValueError, "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], dict(max_new_tokens=4, temperature=-0.1), ValueError, r"temperature must be a number >= 0"),
    ([[1, 2]], dict(max_new_tokens=4, top_p=0.0), ValueError, r"top_p must be a number in \(0, 1\]"),
    ([[1, 2]], dict(max_new_tokens=4, top_p=1.5), ValueError, r"top_p must be a number in \(0, 1\]"),
    ([[1, 2]], dict(max_new_tokens=4, top_k=-1), ValueError, "top_k must be an integer in \\[0, 2147483647\\]"),
    ([[1, 2]], dict(max_new_tokens=4, min_p=2.0), ValueError, r"min_p must be a number in \[0, 1\]"),
    ([[1, 2]], dict(max_new_tokens=4, top_p=True), ValueError, r"top_p must be a number in \(0, 1\]"),
    ([[1, 2]], dict(max_new_tokens=4, min_p=True), ValueError, r"min_p must be a number in \[0, 1\]"),
    ([[1, 2], [3]], dict(max_new_tokens=4, top_k=[2**63, 5]), ValueError, r"request 0: top_k must be an integer in"),
    ([[1, 2]], dict(max_new_tokens=4, seed=1.5), TypeError, r"seed must be an int, a list of ints .* got 1.5"),
    ([[1, 2]], dict(max_new_tokens=4, seed="7"), TypeError, r"seed must be an int, a list of ints .* got '7'"),
    ([], dict(max_new_tokens=4), ValueError, "prompts is empty"),
    ([[1, 2], []], dict(max_new_tokens=4), ValueError, r"prompt 1 is empty \(0 tokens\)"),
    (["hi"], dict(max_new_tokens=4), ValueError, "prompt 0 is a string but this pipeline has no tokenizer"),
    ("hi", dict(max_new_tokens=4), TypeError, "prompts must be a list"),
    ([[1, 200]], dict(max_new_tokens=4), ValueError, r"token ids outside the vocabulary \[0, 101\): \[200\]"),
    ([list(range(40))], dict(max_new_tokens=4), ValueError, r"prompt 0 has 40 tokens, longer than the KV cache \(cache.max_len=32\)"),
    ([list(range(30))], dict(max_new_tokens=4), ValueError, r"needs 35 cache positions, more than cache.max_len=32"),
    ([[1, 2]], dict(max_new_tokens=4, seed=[1, 2]), ValueError, "one int per request"),
    ([[1, 5.7]], dict(max_new_tokens=4), TypeError, r"prompt 0 has values that are not integer token ids: \[5.7\]"),
    ([[1, 2], [True, 3]], dict(max_new_tokens=4), TypeError, r"prompt 1 has values that are not integer token ids: \[True\]"),
    ([[1, "5"]], dict(max_new_tokens=4), TypeError, r"not integer token ids: \['5'\]"),
    ([torch.tensor([5.9, 6.1])], dict(max_new_tokens=4), TypeError, r"prompt 0 is a torch.float32 tensor"),
    ([[1, 2]], dict(max_new_tokens=4, seed=2**70), ValueError, r"seed must lie in \[-2\*\*63, 2\*\*64 - 1\]"),
    ([[1, 2], [3]], dict(max_new_tokens=4, seed=2**64 - 1), ValueError, r"seed \+ i\), got 18446744073709551616"),
    ([[1, 2]], dict(max_new_tokens=4, seed=[-2**63 - 1]), ValueError, "seed must lie in"),
    ([[1, 2], [3]], dict(max_new_tokens=[4]), ValueError, "max_new_tokens has 1 budgets for 2 prompts"),
    ([[1, 2], [3]], dict(max_new_tokens=[4, 0]), ValueError, "max_new_tokens must be an integer >= 1, or a list"),
    ([[1, 2], [3]], dict(max_new_tokens=[]), ValueError, "max_new_tokens must be an integer >= 1, or a list"),
    ([[1, 2], [3]], dict(max_new_tokens=[4, 2], min_new_tokens=3), ValueError, r"min_new_tokens must be .* \[0, .*2\]"),
    ([[1, 2], list(range(20))], dict(max_new_tokens=[4, 12]), ValueError, r"prompt 1 \(20 tokens\) \+ max_new_tokens \(12\)"),
    ([[1, 2], [3]], dict(max_new_tokens=4, temperature=[0.5]), ValueError, "temperature has 1 values for 2 prompts"),
    ([[1, 2], [3]], dict(max_new_tokens=4, top_p=[0.9, 0.0]), ValueError, r"request 1: top_p must be a number in \(0, 1\]"),
    ([[1, 2], [3]], dict(max_new_tokens=4, logit_bias=[{1: 2.0}, {500: 1.0}]), ValueError,
     r"request 1: logit_bias token ids \[500\] are outside"),
    ([[1, 2], [3]], dict(max_new_tokens=4, no_repeat_ngram_size=[2, -1]), ValueError,
     r"request 1: no_repeat_ngram_size must be an integer in \[0, 2147483647\]"),
    ([[1, 2], [3]], dict(max_new_tokens=[4, 2], min_new_tokens=[3, 3]), ValueError,
     r"request 1: min_new_tokens must be an integer in \[0, max_new_tokens=2\]"),
    ([[1, 2], [3]], dict(max_new_tokens=4, stop_token_ids=[[1], [500]]), ValueError, r"stop_token_ids must be token ids"),
    ([[1, 2], [3]], dict(max_new_tokens=4, stop_token_ids=[[1]]), ValueError, "stop_token_ids has 1 entries for 2 prompts"),
    ([[1, 2], [3]], dict(max_new_tokens=4, ignore_eos=[True]), ValueError, "ignore_eos has 1 entries for 2 prompts"),
    ([[1, 2], [3]], dict(max_new_tokens=4, ignore_eos=[True, 1]), TypeError, "ignore_eos must be True or False"),
    ([[1, 2], [3]], dict(max_new_tokens=4, stop=[["x"], None]), ValueError, "stop strings need a tokenizer"),
    ([[1, 2]], dict(max_new_tokens=4, repetition_penalty=1e-40), ValueError,  # (÷ it overflows float32: NaN)
     r"repetition_penalty must be a number in \[1e-06, 1e\+06\] \(1 = disabled\), got 1e-40"),
    ([[1, 2], [3]], dict(max_new_tokens=4, min_new_tokens=[0, 1], stop_token_ids=[[], list(range(101))]), ValueError,
     r"request 1: its stop tokens \(EOS included\) are the whole vocabulary of 101 tokens, so min_new_tokens=1"),
])
def test_bad_generate_arguments(pipe, no_compute, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe.generate(prompts, **kwargs)


def test_prompt_beyond_max_position_embeddings():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}}, target_model=tiny_hf_model("llama"))
    with pytest.raises(ValueError, match=r"exceeds the target's max_position_embeddings \(256\)"):
        pipe.generate([list(range(2, 100)) * 2], max_new_tokens=100)


def test_no_target_is_an_error():
    with pytest.raises(ValueError, match=r"no target model: set target.name \(an embedded model\), target.path"):
        dspark.build_pipeline({"target": {"name": None}})


def test_unknown_component_fails_before_loading_the_model(monkeypatch):
    import dspark.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded before the config was checked"))
    with pytest.raises(KeyError, match="unknown sampler 'nucleus'"):
        dspark.build_pipeline({"sampler": "nucleus", "target": {"path": "/nonexistent"}})


def test_bad_dtype_and_backend():
    with pytest.raises(ValueError, match="unknown dtype 'float8'; allowed: float32"):
        dspark.build_pipeline({"target": {"dtype": "float8", "device": "cpu"}}, target_model=tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="target.backend must be one of auto, native, hf"):
        dspark.build_pipeline({"target": {"backend": "onnx", "device": "cpu"}}, target_model=tiny_hf_model("llama"))


def test_bad_devices_are_named():
    """An unknown device, or a CUDA one this machine lacks, is a ValueError naming it (the CLI
    prints it as an error; torch raised a RuntimeError, or an AssertionError for a CPU build)."""
    with pytest.raises(ValueError, match="unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        dspark.build_pipeline({"target": {"device": "tpu"}}, target_model=tiny_hf_model("llama"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = "cuda" if not count else f"cuda:{count}"
    with pytest.raises(ValueError, match=f"device '{missing}' asked for, but"):
        dspark.build_pipeline({"target": {"device": missing}}, target_model=tiny_hf_model("llama"))


def test_greedy_verifier_refuses_sampling():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "verifier": "greedy"}, target_model=tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="greedy verifier only supports temperature 0"):
        pipe.generate([[1, 2]], max_new_tokens=3, temperature=1.0)
    assert len(pipe.generate([[1, 2]], max_new_tokens=3).token_ids[0]) <= 3


@pytest.mark.parametrize("backend, temperature, broken_call, fill", [
    ("native", 0.0, 0, float("nan")), ("native", 1.0, 2, float("nan")), ("native", 0.0, 2, float("-inf")),
    ("hf", 1.0, 0, float("-inf")), ("hf", 0.0, 3, float("inf")),
])
def test_a_distribution_without_mass_ends_that_request_alone(backend, temperature, broken_call, fill, monkeypatch,
                                                             caplog):
    """NaN or infinite logits, or all −∞, leave nothing to sample: greedy would take token 0,
    sampling an index past the vocabulary (an out-of-range embedding next round: a device assert
    on CUDA). The request that drew there ends before that token with finish reason ``"error"``
    and a logged reason; the others decode as without it — at the first token (call 0: the
    prefill) or in a later round."""
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "backend": backend},
                                  "drafter": {"name": "ngram", "num_speculative_tokens": 3}},
                                 target_model=tiny_hf_model("llama"))
    prompts, settings = [[1, 2, 3, 1, 2, 3], [4, 5], [7]], dict(max_new_tokens=8, temperature=temperature, seed=0,
                                                                 ignore_eos=True)
    normal = pipe.generate(prompts, **settings)
    calls = [0]

    def breaking(forward):
        def broken(*args, **kwargs):
            result = forward(*args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            if calls[0] == broken_call:
                out.logits[1, 0] = fill  # request 1's first position: always drawn from
            calls[0] += 1
            return result
        return broken

    engine = pipe.engine
    monkeypatch.setattr(engine, "_round_forward", breaking(engine._round_forward))
    monkeypatch.setattr(engine, "_prefill", breaking(engine._prefill))
    result = pipe.generate(prompts, **settings)
    assert [r["finish_reason"] for r in result.stats.per_request] == ["length", "error", "length"]
    assert result.token_ids[0] == normal.token_ids[0] and result.token_ids[2] == normal.token_ids[2]
    kept = result.token_ids[1]
    assert kept == normal.token_ids[1][:len(kept)] and (kept == [] if broken_call == 0 else 0 < len(kept) < 8)
    assert "request 1: the target's distribution had no probability mass" in caplog.text


def test_numpy_integers_are_integers(pipe):
    """numpy ints were taken in prompts but refused as max_new_tokens, min_new_tokens and seeds."""
    np = pytest.importorskip("numpy")
    want = pipe.generate([[1, 2]], max_new_tokens=3, min_new_tokens=1, seed=3, temperature=1.0).token_ids
    assert pipe.generate([[1, 2]], max_new_tokens=np.int64(3), min_new_tokens=np.int32(1), seed=np.int64(3),
                         temperature=1.0).token_ids == want
    assert pipe.generate([[1, 2]], max_new_tokens=[np.int64(3)], seed=[np.int64(3)], min_new_tokens=1,
                         temperature=1.0).token_ids == want
    biased = pipe.generate([[1, 2]], max_new_tokens=3, seed=3, temperature=1.0, logit_bias={5: 50.0}).token_ids
    assert pipe.generate([[1, 2]], max_new_tokens=3, seed=3, temperature=1.0,
                         logit_bias={np.int64(5): 50.0}).token_ids == biased  # (keys were refused)


def test_numpy_integers_are_integer_sampling_settings(pipe):
    """numpy ints were refused as top_k and no_repeat_ngram_size (and a session's max_len)."""
    np = pytest.importorskip("numpy")
    settings = dict(max_new_tokens=6, seed=3, temperature=1.0, top_k=4, no_repeat_ngram_size=2)
    want = pipe.generate([[1, 2]], **settings).token_ids
    assert pipe.generate([[1, 2]], **{**settings, "top_k": np.int64(4), "no_repeat_ngram_size": np.int32(2)}
                         ).token_ids == want
    assert pipe.generate([[1, 2]], **{**settings, "top_k": [np.int64(4)]}).token_ids == want
    assert pipe.session(max_len=np.int64(16)).batch.max_len == 16
    with pytest.raises(ValueError, match="top_k must be an integer"):
        pipe.generate([[1, 2]], **{**settings, "top_k": np.bool_(True)})


def test_numpy_floats_are_number_settings(pipe):
    """numpy float32 (not a Python float, unlike float64) was refused as temperature, top_p and the
    other number settings; it makes the same parameters as the float, and numpy bools stay refused."""
    np = pytest.importorskip("numpy")
    settings = dict(max_new_tokens=6, seed=3, temperature=0.75, top_p=0.5, min_p=0.25, repetition_penalty=1.5,
                    presence_penalty=0.5, frequency_penalty=-0.5)
    want = pipe.generate([[1, 2]], **settings).token_ids
    as_numpy = {name: np.float32(value) if name not in ("max_new_tokens", "seed") else value
                for name, value in settings.items()}
    assert pipe.generate([[1, 2]], **as_numpy).token_ids == want
    assert pipe.generate([[1, 2]], **{**settings, "temperature": [np.float32(0.75)]}).token_ids == want
    with pytest.raises(ValueError, match="temperature must be a number"):
        pipe.generate([[1, 2]], **{**settings, "temperature": np.bool_(True)})
