"""Component registries: a config picks a drafter, verifier, sampler or cache by name.

Each component class carries a ``config_class`` (a dataclass) describing the keys its config
section accepts; :mod:`dspark.config` merges the user's section into that schema so a
misspelled key is an error. A section may instead name a user's subclass by dotted path with
``_target_: my_pkg.module.MyDrafter``.

    @register_drafter("ngram")
    class NgramDrafter(Drafter): ...
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class UnknownComponentError(KeyError):
    """A config names a component that is not registered (the message lists those that are)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A name → class table for one kind of component (``kind`` is used in error messages)."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that registers ``cls`` under ``name`` (names are unique per kind)."""

        def decorator(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@register_{self.kind}({name!r}) needs a subclass of {self.base.__name__}, got {cls!r}")
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {existing.__qualname__}")
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        _import_builtin_components()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """The class registered under ``name``; raises :class:`UnknownComponentError` listing the options."""
        _import_builtin_components()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())} "
                f"(or give `_target_: package.module.ClassName` for your own {self.base.__name__} subclass)"
            ) from None

    def resolve(self, name: str | None, target: str | None) -> T:
        """The class a config section selects: ``_target_`` (dotted path) wins over ``name``."""
        if target:
            cls = import_object(target)
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"_target_ {target!r} is not a subclass of {self.base.__name__}")
            return cls
        if name is None:
            raise UnknownComponentError(f"the {self.kind} section needs `name` (one of: {', '.join(self.names())})")
        return self.get(name)


def import_object(dotted: str):
    """Import ``package.module.Attr`` (the last component is an attribute of the module)."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"_target_ must be a dotted path like 'package.module.ClassName', got {dotted!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import module {module_name!r} for _target_ {dotted!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from _target_ {dotted!r})") from None


_BUILTINS_IMPORTED = False


def _import_builtin_components() -> None:
    """Import the modules that register the built-in components (lazily, to avoid import cycles)."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    _BUILTINS_IMPORTED = True
    importlib.import_module("dspark.drafters")
    importlib.import_module("dspark.verifiers")
    importlib.import_module("dspark.samplers")
    importlib.import_module("dspark.cache")
    importlib.import_module("dspark.scheduling")
    importlib.import_module("dspark.models.hf_adapter")  # registers the "hf_dynamic" cache
