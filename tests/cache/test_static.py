"""StaticKVCache: O(1) rollback by lengths, capacity errors."""

import pytest
import torch

from dspark.cache import CacheCapacityError, StaticKVCache
from dspark.models import load_model

from helpers import tiny_hf_model


def test_rollback_then_reappend_equals_never_appended(family):
    model = load_model(tiny_hf_model(family, scale=3.0), dtype="float64")
    prompt = torch.randint(0, model.vocab_size, (2, 6))
    rejected = torch.randint(0, model.vocab_size, (2, 4))
    following = torch.randint(0, model.vocab_size, (2, 3))

    clean = model.new_cache(2, 16)
    model(prompt, clean)
    expected = model(following, clean).logits

    cache = model.new_cache(2, 16)
    model(prompt, cache)
    model(rejected, cache)
    buffer_before = cache.buffer.clone()
    cache.rollback(torch.tensor([4, 4]))
    assert cache.lengths.tolist() == [6, 6]
    assert torch.equal(cache.buffer, buffer_before)  # rollback moved lengths only: nothing copied
    assert torch.equal(model(following, cache).logits, expected)


def test_partial_rollback_per_request():
    model = load_model(tiny_hf_model("llama", scale=3.0), dtype="float64")
    tokens = torch.randint(0, model.vocab_size, (2, 8))
    cache = model.new_cache(2, 16)
    model(tokens, cache)
    cache.rollback(torch.tensor([3, 0]))  # request 0 forgets its last 3 tokens, request 1 keeps all
    nxt = torch.randint(0, model.vocab_size, (2, 1))
    got = model(nxt, cache).logits
    for b, keep in ((0, 5), (1, 8)):
        alone = model.new_cache(1, 16)
        ref = model(torch.cat([tokens[b, :keep], nxt[b]]).unsqueeze(0), alone).logits[0, -1]
        assert torch.allclose(got[b, 0], ref, atol=1e-12)


def test_capacity_overflow_is_a_clear_error():
    model = load_model(tiny_hf_model("llama"))
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(CacheCapacityError, match=r"needs 9 positions per request but the cache holds 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.lengths.tolist() == [6]  # the failed forward changed nothing


def test_shape_layout_and_bad_dimensions():
    cache = StaticKVCache(num_layers=2, batch_size=3, num_kv_heads=4, max_len=10, head_dim=8)
    assert cache.keys.shape == (2, 3, 4, 10, 8) and cache.values.shape == (2, 3, 4, 10, 8)
    assert cache.batch_size == 3 and cache.max_len == 10
    with pytest.raises(ValueError, match="dimensions must be >= 1"):
        StaticKVCache(num_layers=2, batch_size=0, num_kv_heads=4, max_len=10, head_dim=8)



def test_caches_made_in_and_out_of_inference_mode_share_compiled_graphs():
    """A compiled forward guards on its inputs' dispatch keys: caches of one shape made inside
    ``torch.inference_mode`` (a ``generate`` call, a drafter's start) and outside it (a session's
    first batch) are alike, so the second meets no new graph."""
    from torch._dynamo.utils import counters

    model = load_model(tiny_hf_model("qwen3"), dtype="float32")
    tokens = torch.randint(0, model.vocab_size, (2, 3))
    with torch.inference_mode():
        inside = model.new_cache(2, 16)
    outside = model.new_cache(2, 16)
    forward = torch.compile(model, dynamic=False, options={"cpp_wrapper": False})
    with torch.inference_mode():
        forward(tokens, inside, kv_len=16)
        before = counters["stats"]["unique_graphs"]
        forward(tokens, outside, kv_len=16)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.inductor_defaults
def test_compiled_forward_writes_the_cache_in_place():
    """Under torch.compile the cache write is a scatter into the buffer itself: no temporary the
    size of a layer's cache (a write through a view made inductor copy it twice per forward), and
    the buffer holds what the eager forward writes."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = load_model(tiny_hf_model("qwen3"), dtype="float32")
    batch, max_len = 3, 80
    prompt = torch.randint(0, model.vocab_size, (batch, 5))
    new = torch.randint(0, model.vocab_size, (batch, 4))
    eager, compiled = model.new_cache(batch, max_len), model.new_cache(batch, max_len)
    with torch.inference_mode():
        for cache in (eager, compiled):
            model(prompt, cache)
            cache.rollback(torch.tensor([0, 2, 1]))  # ragged lengths
        expected = model(new, eager, kv_len=max_len).logits
        buffer = compiled.buffer
        forward = torch.compile(model, dynamic=False, options={"cpp_wrapper": False})
        got, (code, *_) = run_and_get_code(forward, new, compiled, kv_len=max_len)
    assert compiled.buffer is buffer and torch.equal(compiled.lengths, eager.lengths)
    assert torch.allclose(compiled.buffer, eager.buffer, atol=1e-6)
    assert torch.allclose(got.logits, expected, atol=1e-5)
    layer_cache = compiled.buffer[0].numel()
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", code)
    assert shapes, "no allocations found: the generated code's format changed"
    sizes = [torch.Size(int(d) for d in s.split(",") if d.strip()).numel() for s in shapes]
    assert max(sizes) < layer_cache, f"a temporary of {max(sizes)} elements ≥ one layer's cache ({layer_cache})"


def test_a_row_view_prefills_some_requests_and_leaves_the_others():
    """A forward through ``cache.rows(index)`` over new prompts fills those rows as a cache of
    their own would be filled; the other rows' keys, values and lengths do not change, and the
    whole cache then decodes every row as if each had been prefilled alone."""
    model = load_model(tiny_hf_model("qwen3", scale=3.0), dtype="float64")
    cache = model.new_cache(3, 16)
    model(torch.randint(0, model.vocab_size, (3, 7)), cache)
    other = cache.buffer[:, 1].clone()
    new = torch.randint(0, model.vocab_size, (2, 5))
    rows = torch.tensor([2, 0])
    view = cache.rows(rows)
    view.set_lengths(torch.zeros(2, dtype=torch.long))
    got = model(new, view, torch.tensor([5, 3])).logits
    alone = model.new_cache(2, 16)
    expected = model(new, alone, torch.tensor([5, 3])).logits
    assert torch.allclose(got, expected, atol=1e-12)
    assert cache.lengths.tolist() == [3, 7, 5] and view.lengths.tolist() == [5, 3]
    assert torch.equal(cache.buffer[:, 1], other)
    assert torch.equal(cache.buffer[:, 2, :, :, :5], alone.buffer[:, 0, :, :, :5])
    step = torch.randint(0, model.vocab_size, (3, 1))
    decoded = model(step, cache).logits
    assert torch.allclose(decoded[[2, 0]], model(step[[2, 0]], alone).logits, atol=1e-12)


def test_a_head_view_decodes_its_rows_in_place_and_leaves_the_others():
    """``cache.head(k)``: a cache of the first ``k`` rows whose buffer and lengths are the parent's
    own memory. Forwards through it — eager, and compiled (no temporary the size of a layer's
    cache: the write is a scatter into the parent's buffer) — decode those rows as a cache of their
    own would, rollbacks move the parent's lengths, and the rows past it do not change."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = load_model(tiny_hf_model("qwen3", scale=3.0), dtype="float64")
    cache, alone = model.new_cache(4, 32), model.new_cache(2, 32)
    prompts = torch.randint(0, model.vocab_size, (4, 6))
    model(prompts, cache)
    model(prompts[:2], alone)
    head = cache.head(2)
    assert cache.head(2) is head and cache.head(4) is cache and head.batch_size == 2 and head.max_len == 32
    assert head.buffer.data_ptr() == cache.buffer.data_ptr()
    rest = cache.buffer[:, 2:].clone()
    step = torch.randint(0, model.vocab_size, (2, 3))
    assert torch.allclose(model(step, head, kv_len=32).logits, model(step, alone, kv_len=32).logits, atol=1e-12)
    assert cache.lengths.tolist() == [9, 9, 6, 6]
    head.rollback(torch.tensor([2, 1]))
    alone.rollback(torch.tensor([2, 1]))
    assert cache.lengths.tolist() == [7, 8, 6, 6]
    forward = torch.compile(model, dynamic=False, options={"cpp_wrapper": False})
    step = torch.randint(0, model.vocab_size, (2, 2))
    expected = model(step, alone, kv_len=32).logits
    got, (code, *_) = run_and_get_code(forward, step, head, kv_len=32)
    # (compiled kernels evaluate the float32 rotary angles' cos/sin themselves: float32-ulp differences)
    assert torch.allclose(got.logits, expected, atol=1e-6)
    for b, length in enumerate(alone.lengths.tolist()):  # (what lies past a row's length is never read)
        assert torch.allclose(cache.buffer[:, b, :, :, :length], alone.buffer[:, b, :, :, :length], atol=1e-6)
    assert cache.lengths.tolist() == [9, 10, 6, 6] and torch.equal(cache.buffer[:, 2:], rest)
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", code)
    sizes = [torch.Size(int(d) for d in s.split(",") if d.strip()).numel() for s in shapes]
    assert shapes and max(sizes) < head.buffer[0].numel(), "a temporary as large as a layer's cache"
    with pytest.raises(ValueError, match="a head of 5 rows of a cache of 4 rows"):
        cache.head(5)
