"""compile_forward: one place that compiles dspark's forwards."""

import torch
from torch._dynamo.utils import counters

from dspark.models.compiled import RECOMPILE_LIMIT, compile_forward


def test_compiling_allows_a_graph_per_batch_size_and_verify_width():
    """A scheduler or a drafter that stops early verifies 1..γ+1 tokens per batch size; past
    dynamo's recompile limit (8 by default) a compiled forward silently runs eagerly."""
    dynamo = torch._dynamo.config
    before = dynamo.recompile_limit
    try:
        dynamo.recompile_limit = 8
        step = compile_forward(lambda x: x * 2 + 1, "cpu")
        assert dynamo.recompile_limit == RECOMPILE_LIMIT >= 4 * (7 + 1)  # batch sizes 1/8/16/32 at γ = 7
        graphs = counters["stats"]["unique_graphs"]
        for width in range(1, 10):  # one shape more than the default limit: every one compiled
            assert torch.equal(step(torch.ones(2, width)), torch.full((2, width), 3.0))
        assert counters["stats"]["unique_graphs"] - graphs == 9
        dynamo.recompile_limit = 1000
        compile_forward(lambda x: x, "cpu")
        assert dynamo.recompile_limit == 1000  # never lowered
    finally:
        dynamo.recompile_limit = before
