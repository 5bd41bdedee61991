"""dspark.models.linear: F.linear, through oneDNN for CPU float32 inference — the same product."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dspark.models.linear as linear_module
from dspark.models import load_model
from dspark.models.linear import Linear, linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def reference(x, weight, bias=None):
    """The product in float64."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setattr(linear_module, "ONEDNN", True)


def onednn_calls(monkeypatch) -> list:
    """Record every call of oneDNN's op (the eager path)."""
    calls, real = [], torch.ops.mkldnn._linear_pointwise

    def recording(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(linear_module.torch.ops.mkldnn, "_linear_pointwise", recording)
    return calls


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (2, 1, 3, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_products_run_on_onednn_and_equal_the_exact_product(onednn, monkeypatch, shape, with_bias):
    calls = onednn_calls(monkeypatch)
    x, weight = torch.randn(shape), torch.randn(40, 48)
    bias = torch.randn(40) if with_bias else None
    out = linear(x, weight, bias)
    assert calls == [x.shape]
    assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_row_slice_of_a_weight_and_a_strided_input(onednn, monkeypatch):
    """The native model projects keys/values with the lower rows of its fused q/k/v weight."""
    calls = onednn_calls(monkeypatch)
    weight, x = torch.randn(96, 32), torch.randn(4, 3, 32).transpose(0, 1)
    out = linear(x, weight[64:])
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), reference(x, weight[64:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float64", "bfloat16", "one-dimensional input", "transposed weight",
                                  "switched off", "float64 bias"])
def test_everything_else_is_exactly_f_linear(onednn, monkeypatch, case):
    calls = onednn_calls(monkeypatch)
    x, weight, bias = torch.randn(3, 16), torch.randn(8, 16), None
    if case == "float64":
        x, weight = x.double(), weight.double()
    elif case == "bfloat16":
        x, weight = x.bfloat16(), weight.bfloat16()
    elif case == "one-dimensional input":
        x = x[0]
    elif case == "transposed weight":
        weight = torch.randn(16, 8).t()
    elif case == "switched off":
        monkeypatch.setattr(linear_module, "ONEDNN", False)
    else:
        x, weight, bias = x.double(), weight.double(), torch.randn(8, dtype=torch.float64)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert calls == []


def test_training_takes_f_linear_and_its_gradients(onednn, monkeypatch):
    """oneDNN's op has no autograd formula: a product that needs gradients never runs on it."""
    calls = onednn_calls(monkeypatch)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    expected = nn.Linear(16, 8)
    expected.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    expected(x2).square().sum().backward()
    assert calls == []
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, expected.weight.grad)
    with torch.no_grad():  # the same layer at inference
        layer(x)
    assert len(calls) == 1


def test_linear_keeps_nn_linear_parameters_and_state_dict_keys():
    layer = Linear(6, 3)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(nn.Linear(6, 3).state_dict()) == ["weight", "bias"]


def test_compiled_functions_call_the_opaque_op():
    """Inductor lowers oneDNN's own op only for frozen weights; the compiled graph holds dspark's op."""
    targets = []

    def capture(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    x, weight, bias = torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8)
    with torch.inference_mode():
        out = torch.compile(lambda *a: linear(*a).relu(), backend=capture, fullgraph=True)(x, weight, bias)
        compiled = torch.compile(lambda *a: linear(*a).relu(), dynamic=False, options={"cpp_wrapper": True})
        torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias).relu(), rtol=1e-5, atol=1e-5)
    assert torch.ops.dspark.onednn_linear.default in targets
    torch.testing.assert_close(out, F.linear(x, weight, bias).relu(), rtol=1e-5, atol=1e-5)


def test_the_embedded_target_gives_the_same_logits_either_way(monkeypatch):
    model = load_model("dspark-tiny")
    tokens = torch.randint(2, model.vocab_size, (2, 12))
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(linear_module, "ONEDNN", enabled)
        with torch.inference_mode():
            logits[enabled] = model(tokens, model.new_cache(2, 16)).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits[True], logits[False])  # a different library did compute them


def test_an_unknown_environment_setting_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match=r"DSPARK_CPU_LINEAR='mkl' is not a choice: onednn or blas"):
        linear_module._setting_from_environment()
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "blas")
    assert linear_module._setting_from_environment() is False
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "onednn")
    assert linear_module._setting_from_environment() is True
