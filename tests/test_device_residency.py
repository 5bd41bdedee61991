"""The decoding loop keeps its state on the device: one host synchronisation per round."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dspark

from helpers import ragged_prompts, tiny_hf_model

# ops whose result the host must wait for (data-dependent values or shapes)
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.unique_consecutive", "aten.item", "aten.equal", "aten.is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts data-dependent ops and ``Tensor.tolist`` calls (which do not dispatch)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter, original = self, torch.Tensor.tolist

        def tolist(tensor):
            counter.syncs.append("tolist")
            return original(tensor)

        self._original, torch.Tensor.tolist = original, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._original
        return super().__exit__(*exc)


def count_syncs_inside_rounds(engine) -> list[str]:
    """Wrap ``engine._round`` so that the syncs inside each round land in the returned list."""
    inside_rounds: list[str] = []
    original_round = engine._round

    def counted_round(*args, **kwargs):
        with SyncCounter() as counter:
            drafted = original_round(*args, **kwargs)
        inside_rounds.extend(counter.syncs)
        return drafted

    engine._round = counted_round
    return inside_rounds


@pytest.mark.parametrize("drafter", [{"name": "none"}, {"name": "ngram", "num_speculative_tokens": 4},
                                     {"name": "draft_model", "num_speculative_tokens": 3},
                                     {"name": "dspark", "num_speculative_tokens": 3, "path": None, "head": "rnn"}])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")]), pytest.param("cuda_graphs", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_no_sync_inside_a_round_and_one_per_round(drafter, temperature, device):
    """On CUDA the rounds run the Triton kernels (and, with engine.cuda_graphs, replayed graphs)."""
    target = tiny_hf_model("qwen3", scale=3.0)
    draft = tiny_hf_model("qwen3", seed=4, scale=3.0) if drafter["name"] == "draft_model" else None
    overrides = ["engine.cuda_graphs=true"] if device == "cuda_graphs" else []
    pipe = dspark.build_pipeline({"target": {"device": device.split("_")[0]}, "drafter": drafter}, target_model=target,
                                 draft_model=draft, overrides=overrides)
    inside_rounds = count_syncs_inside_rounds(pipe.engine)
    prompts = ragged_prompts(101, lengths=(5, 2, 8, 3))
    with SyncCounter() as total:
        result = pipe.generate(prompts, max_new_tokens=20, temperature=temperature, seed=0, ignore_eos=True)
    if device == "cuda_graphs":  # the first rounds capture graphs (warm-up on a side stream); count the rest
        with SyncCounter() as total:
            inside_rounds.clear()
            result = pipe.generate(prompts, max_new_tokens=20, temperature=temperature, seed=0, ignore_eos=True)
    assert inside_rounds == []
    rounds = result.stats.rounds
    assert rounds > 3
    # one status read per round (+1 before the first), then one read of the outputs and one of the stats
    assert total.syncs == ["tolist"] * (rounds + 3)


@pytest.mark.parametrize("scheduler", ["dspark", "dspark_async"])
def test_the_asynchronous_scheduler_reads_nothing_inside_rounds(scheduler, tmp_path):
    """The synchronous scheduler reads the verify width inside every drafted round; the asynchronous
    one reads its capacity with the status read, so only a batch's first drafted round reads."""
    from dspark.scheduling import ThroughputProfile

    ThroughputProfile([1, 8, 16, 64], [1.0, 0.95, 0.7, 0.2]).save(tmp_path / "sps.json")
    pipe = dspark.build_pipeline(
        {"target": {"device": "cpu"}, "drafter": {"name": "dspark", "num_speculative_tokens": 3, "path": None},
         "scheduler": {"name": scheduler, "profile": str(tmp_path / "sps.json"), "measured_fallback": False,
                       "idle_backoff": 0}}, target_model=tiny_hf_model("qwen3", scale=3.0))
    inside_rounds = count_syncs_inside_rounds(pipe.engine)
    prompts = ragged_prompts(101, lengths=(5, 2, 8, 3))
    with SyncCounter() as total:
        result = pipe.generate(prompts, max_new_tokens=20, seed=0, ignore_eos=True)
    rounds = result.stats.rounds
    assert rounds > 3 and result.stats.drafted_tokens == 3 * result.stats.target_forwards  # every round drafts
    # + 1: the load bound reads the (host-side) cost table once per batch size
    assert inside_rounds == ["tolist"] * (1 + (1 if scheduler == "dspark_async" else rounds))
    assert total.syncs == ["tolist"] * (rounds + 3 + len(inside_rounds))
