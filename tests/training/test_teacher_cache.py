"""The teacher cache: the target's pass over a training sequence, written once and read back exactly;
a cache for another target, precision, dtype or set of layers is refused; a drafter trained from
the cache equals one trained with the target run on the fly."""

import json

import pytest
import torch

from dspark.models import load_model
from dspark.training import load_train_config, train
from dspark.training.block_drafter import target_outputs
from dspark.training.teacher_cache import TeacherCache, sequence_key
from drafter_runs import drafter_config
from helpers import corpus, tiny_hf_model


def target_pass(target):
    """The on-the-fly pass the training modules run, counting its calls."""
    calls = []

    def compute(tokens, layers):
        calls.append(tokens.shape[0])
        return target_outputs(target, tokens, layers)

    return compute, calls


def tokens_for(target, batch=3, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, target.vocab_size, (batch, length), generator=generator)


def test_a_second_fetch_reads_back_exactly_what_the_target_computed(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))  # 3 layers
    cache = TeacherCache(tmp_path, target, layers=(0, 1), precision="32-true")
    assert cache.layers == (0, 1, 2)  # the last layer is always kept: the logits come from it
    compute, calls = target_pass(target)
    tokens = tokens_for(target)
    hidden, logits = cache.fetch(tokens, (0, 1), compute)
    reference_hidden, reference_logits = compute(tokens, (0, 1))
    assert calls == [3, 3] and (cache.hits, cache.misses) == (0, 3)
    assert all(torch.equal(h, r) for h, r in zip(hidden, reference_hidden)) and torch.equal(logits, reference_logits)

    read_hidden, read_logits = cache.fetch(tokens, (0, 1), compute)
    assert calls == [3, 3] and (cache.hits, cache.misses) == (3, 3)  # no target pass
    assert all(torch.equal(h, r) for h, r in zip(read_hidden, reference_hidden))
    assert torch.equal(read_logits, reference_logits)
    assert len(list((tmp_path / "entries").glob("*/*.safetensors"))) == 3
    assert cache.disk_bytes() > 3 * cache.entry_bytes(24)  # + safetensors headers

    # a batch with one new sequence runs the target on the whole batch and writes only that one
    mixed = torch.cat([tokens[:2], tokens_for(target, batch=1, seed=1)])
    hidden, logits = cache.fetch(mixed, (1,), compute)
    assert calls[-1] == 3 and (cache.hits, cache.misses) == (5, 4) and len(hidden) == 1
    assert cache.entry_path(sequence_key(mixed[2])).is_file()
    assert torch.equal(logits, compute(mixed, (1,))[1])


def test_a_bfloat16_cache_rounds_the_features_alike_on_every_run(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    compute, _ = target_pass(target)
    tokens = tokens_for(target)
    first = TeacherCache(tmp_path, target, layers=(1,), dtype="bfloat16", precision="32-true")
    written_hidden, written_logits = first.fetch(tokens, (1,), compute)
    exact_hidden, _ = compute(tokens, (1,))
    assert torch.equal(written_hidden[0], exact_hidden[0].bfloat16().float())
    assert not torch.equal(written_hidden[0], exact_hidden[0])
    later = TeacherCache(tmp_path, target, layers=(1,), dtype="bfloat16", precision="32-true")
    read_hidden, read_logits = later.fetch(tokens, (1,), compute)
    assert later.hits == 3 and torch.equal(read_hidden[0], written_hidden[0]) and torch.equal(read_logits, written_logits)


def test_a_cache_for_another_target_precision_dtype_or_layers_is_refused(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    TeacherCache(tmp_path, target, layers=(0,), precision="bf16-mixed")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["layers"] == [0, 2] and meta["precision"] == "bf16-mixed" and meta["dtype"] == "float32"

    retrained = load_model(tiny_hf_model("qwen3", seed=1))  # same architecture, other weights
    with pytest.raises(ValueError, match="another target .*the weights differ"):
        TeacherCache(tmp_path, retrained, layers=(0,), precision="bf16-mixed")
    wider = load_model(tiny_hf_model("qwen3", hidden_size=32, head_dim=8))
    with pytest.raises(ValueError, match="hidden_size: 64 there, 32 here"):
        TeacherCache(tmp_path, wider, layers=(0,), precision="bf16-mixed")
    with pytest.raises(ValueError, match="precision 'bf16-mixed', this run uses '32-true'"):
        TeacherCache(tmp_path, target, layers=(0,), precision="32-true")
    with pytest.raises(ValueError, match="dtype 'float32', this run uses 'bfloat16'"):
        TeacherCache(tmp_path, target, layers=(0,), dtype="bfloat16", precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"holds target layers \[0, 2\], this run needs \[1\]"):
        TeacherCache(tmp_path, target, layers=(0, 1), precision="bf16-mixed")
    with pytest.raises(ValueError, match="teacher_cache.dtype must be one of float32, bfloat16"):
        TeacherCache(tmp_path / "other", target, layers=(0,), dtype="float16", precision="32-true")
    assert TeacherCache(tmp_path, target, layers=(2,), precision="bf16-mixed").layers == (0, 2)  # a subset is fine


def test_an_unreadable_entry_is_named(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    compute, _ = target_pass(target)
    tokens = tokens_for(target, batch=2)
    cache = TeacherCache(tmp_path, target, layers=(1,), precision="32-true")
    cache.fetch(tokens, (1,), compute)
    entry = cache.entry_path(sequence_key(tokens[1]))
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=rf"teacher cache entry '{entry}' is unreadable .*delete it"):
        cache.fetch(tokens, (1,), compute)
    from safetensors.torch import save_file

    save_file({"layer_1": torch.zeros(24, 64)}, entry)  # the last layer (2) is missing
    with pytest.raises(ValueError, match=r"lacks target layers \[2\]; delete it"):
        cache.fetch(tokens, (1,), compute)
    entry.unlink()  # deleted: recomputed and written again
    cache.fetch(tokens, (1,), compute)
    assert entry.is_file()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_from_the_cache_equals_training_with_the_target_on_the_fly(assets, tmp_path, precision):
    """Three runs with the same seed: without a cache, filling one, reading it (no target pass on any
    training sequence). Their test metrics and exported weights are equal; a DFlash run (another
    drafter on the same data and layers) reads the cache too."""
    from safetensors.torch import load_file

    def run(name, *extra):
        cfg = load_train_config(None, drafter_config(assets, tmp_path / name, "max_steps=6", "val_every=3",
                                                     f"precision={precision}", *extra))
        report = train(cfg, documents=corpus())
        return report, load_file(tmp_path / name / "out" / "model.safetensors")

    cache_dir = tmp_path / "teacher"
    plain, plain_weights = run("plain")
    filling, filled_weights = run("fill", f"teacher_cache.dir={cache_dir}")
    reading, read_weights = run("read", f"teacher_cache.dir={cache_dir}")
    assert "teacher_cache" not in plain
    assert filling["teacher_cache"]["computed"] > 0
    assert reading["teacher_cache"] == {"dir": str(cache_dir), "read": filling["teacher_cache"]["read"]
                                        + filling["teacher_cache"]["computed"], "computed": 0}
    for weights in (filled_weights, read_weights):
        assert weights.keys() == plain_weights.keys()
        assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)
    assert reading["test"] == plain["test"]

    dflash, _ = run("dflash", f"teacher_cache.dir={cache_dir}",
                    "model={gamma: 3, head: none, num_layers: 1, rank: 8, target_layers: [0, 2]}")
    assert dflash["teacher_cache"]["computed"] == 0


def test_the_teacher_cache_is_for_drafter_runs_only(assets, tmp_path):
    with pytest.raises(ValueError, match="teacher_cache is for `drafter` runs"):
        load_train_config(None, ["kind=draft", "teacher=dspark-tiny", f"teacher_cache.dir={tmp_path}"])
    with pytest.raises(ValueError, match="teacher_cache.dtype must be one of"):
        load_train_config(None, drafter_config(assets, tmp_path, "teacher_cache.dtype=int8"))
