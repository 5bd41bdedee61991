"""Shared fixtures: tiny randomly initialised models of each supported family (built in memory)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray download fails fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # (`pytest -n N`: the workers share the cores, not each take all)
    torch.set_num_threads(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU tensors; set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # any kernel module is imported (decoration reads it)
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from helpers import FAMILIES, tiny_hf_model  # noqa: E402


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core available to this process, at most 8 (each worker holds torch,
    its models and its compiled graphs in memory)."""
    return max(1, min(CORES, 8))


def pytest_collection_modifyitems(config, items) -> None:
    """The tests that compile graphs run first, then the other slow ones, then the rest (order kept
    within each): with ``--dist worksteal`` the workers end on short tests, not one of them on a
    two-minute compile while the others wait."""
    def rank(item) -> int:
        return 0 if "compil" in item.nodeid.lower() else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each model family with a native implementation."""
    return request.param


@pytest.fixture
def hf_model(family):
    """A tiny random ``transformers`` model of the family (float32)."""
    return tiny_hf_model(family)


@pytest.fixture(params=["torch", "triton"])
def kernel_backend(request):
    """Runs the test once with the torch twins and once with the Triton kernels (interpreted on CPU)."""
    from dspark.kernels import use_backend

    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _scalar_cpp_kernels(request):
    """Inductor writes scalar C++ kernels for the tests' compiled graphs (``cpp.simdlen=1``).

    The suite compiles about 160 graphs, nearly none alike (each drafter, setting and shape is a
    graph of its own); building one with inductor's vectorised kernels (``at::vec`` templates) took
    12–14 s here, with scalar ones 6–8 s. What the compiled tests check — dspark's graphs, guards,
    static shapes, in-place cache writes, compiled rounds equal eager ones — does not depend on how
    inductor vectorises a loop. Tests marked ``inductor_defaults`` compile as users do.
    """
    if request.node.get_closest_marker("inductor_defaults") is not None:
        yield
        return
    from torch._inductor import config as inductor

    with inductor.patch({"cpp.simdlen": 1}):
        yield
