"""Every public class and function of dspark has a docstring.

Public means: exported in some module's ``__all__`` (classes and functions; constants and
registry instances are not checked), plus the public methods and properties those classes
define. An override counts as documented when the dspark base class it overrides documents the
same name (e.g. ``NgramDrafter.propose`` inherits ``Drafter.propose``'s contract).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dspark


def _modules():
    yield dspark
    for info in pkgutil.walk_packages(dspark.__path__, prefix="dspark."):
        yield importlib.import_module(info.name)


def _own_doc(obj) -> str | None:
    """A docstring written for ``obj`` (not one synthesised by ``dataclasses``)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and getattr(obj, "__dataclass_fields__", None) is not None and doc.startswith(obj.__name__ + "("):
            return None  # dataclasses' signature stand-in
        return doc
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return getattr(obj, "__doc__", None)


def _is_method(value) -> bool:
    return isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(value)


def _method_documented(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if not klass.__module__.startswith("dspark") or name not in klass.__dict__:
            continue
        doc = _own_doc(klass.__dict__[name])
        if doc and doc.strip():
            return True
    return False


def public_items():
    """``(qualified name, object)`` of every exported class/function and of their public methods."""
    seen = set()
    for module in _modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            owner = getattr(obj, "__self__", None)  # register_drafter is DRAFTERS.register
            module_name = obj.__module__ if owner is None else type(owner).__module__
            yield f"{module_name}.{obj.__qualname__}", obj


def undocumented(items=None) -> list[str]:
    """Qualified names of the public items (default: :func:`public_items`) that lack a docstring."""
    missing = []
    for qualname, obj in (public_items() if items is None else items):
        doc = _own_doc(obj)
        if not (doc and doc.strip()):
            missing.append(qualname)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if not attr.startswith("_") and _is_method(value) and not _method_documented(obj, attr):
                    missing.append(f"{qualname}.{attr}")
    return sorted(set(missing))


def test_public_api_is_documented():
    missing = undocumented()
    assert not missing, "public items without a docstring:\n  " + "\n  ".join(missing)


def test_every_module_has_a_docstring():
    missing = [m.__name__ for m in _modules() if not (m.__doc__ and m.__doc__.strip())]
    assert not missing, f"modules without a docstring: {missing}"


def test_checker_sees_the_api():
    names = {q for q, _ in public_items()}
    assert "dspark.pipeline.build_pipeline" in names
    assert "dspark.drafters.base.Drafter" in names
    assert "dspark.drafters.ngram.NgramDrafter" in names
    assert "dspark.registry.Registry.register" in names  # register_drafter and friends


def test_checker_catches_missing_docstrings():
    import dataclasses

    from dspark.drafters import Drafter

    @dataclasses.dataclass
    class Bare:  # dataclasses would invent a docstring "Bare(x: int = 0)"
        x: int = 0

    class Mine(Drafter):
        """Documented class."""

        def propose(self, state, uniforms):  # documented by Drafter.propose
            return None

        def helper(self):
            return None

    def function():
        return None

    Bare.__module__ = Mine.__module__ = function.__module__ = "dspark.fake"
    found = undocumented([("Bare", Bare), ("Mine", Mine), ("function", function)])
    assert found == ["Bare", "Mine.helper", "function"]
