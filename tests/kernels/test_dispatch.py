"""The dispatch point: the only place that chooses between a Triton kernel and its torch twin."""

import ast
import inspect
from pathlib import Path

import pytest

import dspark
from dspark.kernels import dispatch, implementation, reference, use_backend

PACKAGE = Path(dspark.__file__).parent
OPS = sorted(dispatch.TRITON_MODULES)


@pytest.mark.parametrize("op", OPS)
def test_kernel_and_twin_share_a_signature(op):
    with use_backend("triton"):
        kernel = implementation(op, "cpu")
    with use_backend("torch"):
        twin = implementation(op, "cpu")
    assert twin is getattr(reference, op) and kernel is not twin
    assert kernel.__module__.startswith("dspark.kernels.triton_")
    assert inspect.signature(kernel) == inspect.signature(twin)


def test_auto_picks_the_twin_off_cuda_and_triton_on_cuda():
    with use_backend("auto"):
        assert dispatch.backend_for("cpu") == "torch"
        assert dispatch.backend_for("cuda") == ("triton" if dispatch.triton_available() else "torch")


def test_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, torch, triton"):
        with use_backend("cuda"):
            pass
    with pytest.raises(KeyError, match="verify_chain"):
        implementation("verify_tree", "cpu")


def test_forced_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.backend_for("cpu")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_call_site_chooses_an_implementation():
    """Outside dspark/kernels nothing imports Triton, a kernel module, the twins or the dispatcher:
    call sites use the ops of ``dspark.kernels`` and never branch on Triton availability."""
    private = ("triton", "dspark.kernels.triton_", "dspark.kernels.reference.verify", "dspark.kernels.reference.commit",
               "dspark.kernels.reference.gather", "dspark.kernels.dispatch")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "kernels":
            continue
        for name in imported_modules(path):
            if name.startswith(private):
                offenders.append(f"{path.relative_to(PACKAGE)}: {name}")
        if "TRITON_INTERPRET" in path.read_text() or "triton_available" in path.read_text():
            offenders.append(f"{path.relative_to(PACKAGE)}: checks Triton")
    assert offenders == []
    # inside the package, only the dispatcher loads kernel modules
    kernels = PACKAGE / "kernels"
    for path in kernels.glob("*.py"):
        if path.name not in ("dispatch.py",) and not path.name.startswith("triton_"):
            assert not any(n.startswith(("triton", "dspark.kernels.triton_")) for n in imported_modules(path)), path


def test_engine_rounds_run_through_the_selected_backend(monkeypatch):
    """A decoding call reaches the ops only through the dispatcher: counting its answers shows
    which implementation ran."""
    from helpers import ragged_prompts, tiny_hf_model

    calls = []
    original = dispatch.implementation
    monkeypatch.setattr(dispatch, "implementation", lambda op, device: calls.append((op, dispatch.backend_for(device)))
                        or original(op, device))
    import dspark.kernels as ops

    monkeypatch.setattr(ops, "implementation", dispatch.implementation)
    target = tiny_hf_model("qwen3")
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "ngram", "num_speculative_tokens": 2}},
                                 target_model=target)
    with use_backend("triton"):
        pipe.generate(ragged_prompts(101, lengths=(3, 5)), max_new_tokens=4, temperature=1.0, seed=[1, 2])
    assert {op for op, _ in calls} == {"verify_chain", "commit_tokens"}
    assert {backend for _, backend in calls} == {"triton"}
