"""dspark.models.linear: F.linear, through oneDNN for CPU float32 inference — the same product."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

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
    monkeypatch.setattr(linear_module, "PACK_WEIGHTS", True)
    linear_module.forget_packed_weights()
    yield
    linear_module.forget_packed_weights()


def packs_made(monkeypatch) -> list:
    """Record the weight of every packed copy made."""
    made, real = [], linear_module.pack

    def recording(weight):
        made.append(weight.shape)
        return real(weight)

    monkeypatch.setattr(linear_module, "pack", recording)
    return made


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


def test_compiled_functions_call_the_opaque_op(onednn):
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


def test_the_embedded_target_gives_the_same_logits_every_way(onednn, monkeypatch):
    model = load_model("dspark-tiny")
    tokens = torch.randint(2, model.vocab_size, (2, 12))
    logits = {}
    for name, enabled, packed in (("blas", False, False), ("plain", True, False), ("packed", True, True)):
        monkeypatch.setattr(linear_module, "ONEDNN", enabled)
        monkeypatch.setattr(linear_module, "PACK_WEIGHTS", packed)
        with torch.inference_mode():
            logits[name] = model(tokens, model.new_cache(2, 16)).logits
    for name in ("plain", "packed"):
        torch.testing.assert_close(logits[name], logits["blas"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits["plain"], logits["blas"])  # a different library did compute them
    # every projection's weight was packed (q/k/v, output, gate/up, down per layer, and the LM head)
    assert len(linear_module._packed) == 4 * model.args.num_layers + 1


def test_a_weight_is_packed_once_and_its_copy_reused(onednn, monkeypatch):
    made = packs_made(monkeypatch)
    layer, x = Linear(32, 24).requires_grad_(False), torch.randn(5, 32)
    for _ in range(3):
        torch.testing.assert_close(layer(x).double(), reference(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    fused = torch.randn(96, 32)  # a row slice is a new view at each call: the same copy serves it
    for _ in range(3):
        torch.testing.assert_close(linear(x, fused[64:]).double(), reference(x, fused[64:]), rtol=1e-5, atol=1e-5)
    assert made == [(24, 32), (32, 32)]


def test_compiled_calls_reuse_the_packed_copy(onednn, monkeypatch):
    made = packs_made(monkeypatch)
    layer = Linear(32, 24).requires_grad_(False)
    compiled = torch.compile(lambda x: layer(x).relu(), dynamic=False)
    with torch.inference_mode():
        for rows in (1, 1, 8, 8):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias).relu(), rtol=1e-5, atol=1e-5)
    assert made == [(24, 32)]


@pytest.mark.parametrize("change", ["copy_ without grad", "load_state_dict", "optimizer step"])
def test_a_weight_changed_in_place_is_packed_again(onednn, monkeypatch, change):
    made = packs_made(monkeypatch)
    layer, x = Linear(16, 8), torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
    if change == "copy_ without grad":
        with torch.no_grad():
            layer.weight.copy_(torch.randn(8, 16))
    elif change == "load_state_dict":
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": layer.bias.detach().clone()})
    else:
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(x).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after.double(), reference(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)
    assert made == [(8, 16), (8, 16)]


def test_a_new_weight_at_a_freed_weights_address_is_not_given_the_old_copy(onednn):
    """A freed weight's entry stays until swept; a new weight allocated at its address, of its
    shape and version, must not be multiplied by the dead weight's copy."""
    x, new_weight = torch.randn(3, 256), torch.randn(512, 256)
    dead_weight = torch.randn(512, 256)
    dead_storage = StorageWeakRef(dead_weight.untyped_storage())
    key = (new_weight.data_ptr(), new_weight.shape, new_weight.stride())
    linear_module._packed[key] = (dead_storage, new_weight._version, linear_module.pack(dead_weight))
    del dead_weight
    assert dead_storage.expired()
    torch.testing.assert_close(linear(x, new_weight).double(), reference(x, new_weight), rtol=1e-5, atol=1e-5)
    assert not linear_module._packed[key][0].expired()


def test_writes_through_data_need_forget_packed_weights(onednn):
    """``weight.data`` has its own version counter: the documented hole, and its remedy."""
    x, weight = torch.randn(3, 16), torch.randn(8, 16)
    linear(x, weight)
    weight.data.copy_(torch.randn(8, 16))
    assert not torch.allclose(linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)
    linear_module.forget_packed_weights()
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["inference tensor", "packing off"])
def test_untracked_or_unpacked_weights_are_multiplied_as_they_are(onednn, monkeypatch, case):
    made, calls = packs_made(monkeypatch), []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(linear_module.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *args: calls.append(args[1]) or real(*args))
    x = torch.randn(3, 16)
    if case == "inference tensor":
        with torch.inference_mode():
            weight = torch.randn(8, 16)
    else:
        weight = torch.randn(8, 16)
        monkeypatch.setattr(linear_module, "PACK_WEIGHTS", False)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert made == [] and calls[0] is weight


def test_the_environment_chooses_and_an_unknown_setting_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match=r"DSPARK_CPU_LINEAR='mkl' is not a choice: auto, onednn, onednn-unpacked, blas"):
        linear_module._setting_from_environment()
    for choice, expected in (("blas", (False, False)), ("onednn-unpacked", (True, False)), ("onednn", (True, True))):
        monkeypatch.setenv("DSPARK_CPU_LINEAR", choice)
        assert linear_module._setting_from_environment() == expected


@pytest.mark.parametrize("vendor, expected", [("AuthenticAMD", (True, True)), ("GenuineIntel", (False, False)),
                                              (None, (False, False))])
def test_auto_takes_onednn_on_amd_processors_only(monkeypatch, vendor, expected):
    monkeypatch.setattr(linear_module, "cpu_vendor", lambda: vendor)
    monkeypatch.delenv("DSPARK_CPU_LINEAR", raising=False)
    assert linear_module._setting_from_environment() == expected
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "auto")
    assert linear_module._setting_from_environment() == expected


def test_cpu_vendor_reads_proc_cpuinfo(monkeypatch, tmp_path):
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert linear_module.cpu_vendor() == "AuthenticAMD"
    cpuinfo.write_text("processor\t: 0\n")
    assert linear_module.cpu_vendor() is None
    cpuinfo.unlink()
    assert linear_module.cpu_vendor() is None
